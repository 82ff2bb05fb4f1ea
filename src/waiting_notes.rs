//! How many passes write the `WaitingForAcs` condition at once. A burst of new resources queues
//! thousands behind the ACS budget, and each first pass writes that condition: unbounded, those
//! writes took every reconcile worker for tens of seconds, and the passes that spend the budget
//! (creates whose slot came, another namespace's due refresh) queued behind them
//! (docs/benchmarks.md, eleventh round). So a few at a time write it; a pass that finds them
//! all busy writes nothing and returns, and is called back, oldest first, as one finishes (its
//! ACS turn may come first, and then it has nothing to say).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use kube::runtime::reflector::ObjectRef;

use crate::cached::CachedIdentity;
use crate::turns::Turns;

/// Passes writing the condition at once: a quarter of the reconcile workers.
pub const MAX_WRITING: usize = 16;

#[derive(Default)]
struct State {
    writing: usize,
    /// Passes that found every place taken, oldest first, each once.
    deferred: VecDeque<ObjectRef<CachedIdentity>>,
    deferred_set: HashSet<ObjectRef<CachedIdentity>>,
}

#[derive(Clone, Default)]
pub struct WaitingNotes {
    state: Arc<Mutex<State>>,
}

/// A place to write the condition; giving it back calls back the oldest deferred pass.
pub struct Writing {
    notes: WaitingNotes,
    turns: Turns,
}

impl WaitingNotes {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere leaves it usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for `resource` to write its condition now, or `None`: it is called back through
    /// `turns` when one frees.
    pub fn enter(&self, resource: &ObjectRef<CachedIdentity>, turns: &Turns) -> Option<Writing> {
        let mut state = self.lock();
        if state.writing < MAX_WRITING {
            state.writing += 1;
            return Some(Writing {
                notes: self.clone(),
                turns: turns.clone(),
            });
        }
        if state.deferred_set.insert(resource.clone()) {
            state.deferred.push_back(resource.clone());
        }
        None
    }

    /// Passes deferred and not yet called back.
    pub fn deferred(&self) -> usize {
        self.lock().deferred.len()
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        let next = {
            let mut state = self.notes.lock();
            state.writing -= 1;
            let next = state.deferred.pop_front();
            if let Some(next) = &next {
                state.deferred_set.remove(next);
            }
            next
        };
        if let Some(next) = next {
            self.turns.send(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn called_back(
        receiver: &mut futures::channel::mpsc::UnboundedReceiver<ObjectRef<CachedIdentity>>,
    ) -> Vec<String> {
        std::iter::from_fn(|| receiver.try_recv().ok())
            .map(|reference| reference.name)
            .collect()
    }

    #[test]
    fn a_few_write_at_once_and_the_deferred_are_called_back_oldest_first() {
        let (turns, mut receiver) = Turns::new();
        let notes = WaitingNotes::default();
        let named = |name: &str| ObjectRef::new(name).within("team");
        let places: Vec<Writing> = (0..MAX_WRITING)
            .map(|i| notes.enter(&named(&format!("first-{i}")), &turns))
            .collect::<Option<_>>()
            .expect("a place for each of the first");
        assert!(notes.enter(&named("late-1"), &turns).is_none());
        assert!(notes.enter(&named("late-2"), &turns).is_none());
        assert!(
            notes.enter(&named("late-1"), &turns).is_none(),
            "deferred again"
        );
        assert_eq!(notes.deferred(), 2, "each deferred pass once");
        assert!(called_back(&mut receiver).is_empty());

        let mut places = places.into_iter();
        drop(places.next());
        assert_eq!(called_back(&mut receiver), ["late-1"]);
        drop(places.next());
        assert_eq!(called_back(&mut receiver), ["late-2"]);
        drop(places.next());
        assert!(called_back(&mut receiver).is_empty(), "nobody left waiting");
        assert!(
            notes.enter(&named("late-1"), &turns).is_some(),
            "places freed are free again"
        );
    }
}
