//! Which resources' passes start next, and how many run at once.
//!
//! Hand-written in front of kube-runtime's scheduler rather than leaving the order to it: once
//! its workers are all busy, kube-runtime holds the requests that came due in a `HashSet` and
//! starts them in hash order, so a burst of thousands in one namespace delays another
//! namespace's due refresh by however many of the burst the hash puts first (10–13 s with 5,000,
//! docs/benchmarks.md, eleventh round). Here:
//!
//! - the namespaces with passes waiting take turns, so one namespace's burst costs another
//!   namespace one pass in two, not a wait behind all of it (not even behind the burst's
//!   passes called back for ACS slots: a window's budget granted to a burst at once is a
//!   thousand of those);
//! - within a namespace, passes the ACS queues called back (a granted slot) and due wake-ups
//!   come first, then changes (watch events), each in the order they came;
//! - a resource is queued once; a trigger while its pass runs queues it again for after;
//! - at most `capacity` passes are handed to the controller at once, so its own scheduler never
//!   has to hold any.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::ObjectRefExtra as Extra;

use crate::cached::CachedIdentity;
use crate::metrics::Metrics;

type Resource = ObjectRef<CachedIdentity>;

/// Why a pass is wanted, which decides its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    /// The ACS queue granted it a slot, or its refresh (or owed restart) is due.
    Called,
    /// The resource or its Secret changed.
    Changed,
}

impl Lane {
    const ALL: [Lane; 2] = [Lane::Called, Lane::Changed];

    fn label(self) -> &'static str {
        match self {
            Lane::Called => "called",
            Lane::Changed => "changed",
        }
    }
}

pub struct PassQueue {
    inner: Mutex<Queue>,
    handed: UnboundedSender<Resource>,
    metrics: Arc<Metrics>,
}

impl PassQueue {
    /// A queue that runs at most `capacity` passes at once; the controller reconciles on the
    /// stream returned beside it.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> (Self, UnboundedReceiver<Resource>) {
        let (handed, receiver) = unbounded();
        let queue = Self {
            inner: Mutex::new(Queue::new(capacity)),
            handed,
            metrics,
        };
        queue.hand_out(&mut queue.lock());
        (queue, receiver)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wants a pass of `resource`.
    pub fn push(&self, resource: Resource, lane: Lane) {
        let mut queue = self.lock();
        queue.push(bare(resource), lane);
        self.hand_out(&mut queue);
    }

    /// A pass of `resource` started (one this queue handed out, or a retry the controller
    /// scheduled itself).
    pub fn started(&self, resource: &Resource) {
        let mut queue = self.lock();
        queue.started(&bare(resource.clone()));
        self.hand_out(&mut queue);
    }

    /// A pass of `resource` ended, or the controller found no such resource to pass.
    pub fn finished(&self, resource: &Resource) {
        let mut queue = self.lock();
        queue.finished(resource);
        self.hand_out(&mut queue);
    }

    /// `resource` was deleted: no pass of it is wanted any more.
    pub fn forget(&self, resource: &Resource) {
        let mut queue = self.lock();
        queue.forget(resource);
        self.hand_out(&mut queue);
    }

    /// Hands out what may start, and shows what waits.
    fn hand_out(&self, queue: &mut Queue) {
        while let Some(resource) = queue.next() {
            // Fails only once the controller stopped, when no pass is wanted any more.
            let _ = self.handed.unbounded_send(resource);
        }
        for lane in Lane::ALL {
            self.metrics
                .set_passes_waiting(lane.label(), queue.waiting(lane));
        }
    }
}

/// `resource` without its UID and resourceVersion, which take no part in comparing: kept in
/// the tables, they would only cost memory.
fn bare(mut resource: Resource) -> Resource {
    resource.extra = Extra::default();
    resource
}

/// The queue itself, without I/O.
struct Queue {
    capacity: usize,
    /// Each resource waiting, with its lane and the number of its place in that lane.
    queued: HashMap<Resource, (Lane, u64)>,
    /// What waits in each namespace, and the namespaces with passes waiting in the order they
    /// take turns.
    namespaces: HashMap<String, Lanes>,
    turns: VecDeque<String>,
    /// How many of `queued` wait in each lane.
    waiting: [usize; 2],
    /// Handed out or running, each with the lane to queue it in again once it ends.
    busy: HashMap<Resource, Option<Lane>>,
    next_place: u64,
}

/// One namespace's places, in arrival order per lane. An entry whose number no longer matches
/// `queued` (moved up, started, forgotten) is skipped when reached.
#[derive(Default)]
struct Lanes([VecDeque<(Resource, u64)>; 2]);

impl Queue {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            queued: HashMap::new(),
            namespaces: HashMap::new(),
            turns: VecDeque::new(),
            waiting: [0; 2],
            busy: HashMap::new(),
            next_place: 0,
        }
    }

    fn push(&mut self, resource: Resource, lane: Lane) {
        if let Some(again) = self.busy.get_mut(&resource) {
            // After the running pass, in the more urgent of the lanes asked for.
            *again = Some(again.map_or(lane, |before| before.min(lane)));
            return;
        }
        if let Some((queued_in, _)) = self.queued.get(&resource)
            && *queued_in <= lane
        {
            return;
        }
        let place = self.next_place;
        self.next_place += 1;
        self.unqueue(&resource);
        self.queued.insert(resource.clone(), (lane, place));
        self.waiting[lane as usize] += 1;
        let namespace = resource.namespace.clone().unwrap_or_default();
        let lanes = self.namespaces.entry(namespace.clone()).or_default();
        if lanes.0.iter().all(VecDeque::is_empty) {
            self.turns.push_back(namespace);
        }
        lanes.0[lane as usize].push_back((resource, place));
    }

    /// The next pass to hand out, if one is waiting and a place to run it is free: from the
    /// namespace whose turn it is, its called lane first.
    fn next(&mut self) -> Option<Resource> {
        if self.busy.len() >= self.capacity {
            return None;
        }
        let resource = loop {
            let namespace = self.turns.pop_front()?;
            let Some(lanes) = self.namespaces.get_mut(&namespace) else {
                continue;
            };
            let found = Lane::ALL.into_iter().find_map(|lane| {
                let waiting = &mut lanes.0[lane as usize];
                while let Some((resource, place)) = waiting.pop_front() {
                    if self.queued.get(&resource) == Some(&(lane, place)) {
                        return Some(resource);
                    }
                }
                None
            });
            if lanes.0.iter().all(VecDeque::is_empty) {
                self.namespaces.remove(&namespace);
            } else {
                self.turns.push_back(namespace);
            }
            if let Some(resource) = found {
                break resource;
            }
        };
        self.unqueue(&resource);
        self.busy.insert(resource.clone(), None);
        Some(resource)
    }

    fn started(&mut self, resource: &Resource) {
        // A pass that starts sees every change queued before it.
        self.unqueue(resource);
        self.busy.entry(resource.clone()).or_insert(None);
    }

    fn finished(&mut self, resource: &Resource) {
        if let Some(Some(again)) = self.busy.remove(resource) {
            self.push(resource.clone(), again);
        }
    }

    fn forget(&mut self, resource: &Resource) {
        self.unqueue(resource);
        if let Some(again) = self.busy.get_mut(resource) {
            *again = None;
        }
    }

    fn unqueue(&mut self, resource: &Resource) {
        if let Some((lane, _)) = self.queued.remove(resource) {
            self.waiting[lane as usize] -= 1;
            if self.queued.is_empty() {
                self.release_memory();
            }
        }
    }

    /// With nothing queued every place left in the lanes is stale: dropped, and a burst's
    /// tables give back their room instead of keeping it for the life of the process.
    fn release_memory(&mut self) {
        const KEPT: usize = 64;
        self.namespaces.clear();
        self.turns.clear();
        self.queued.shrink_to(KEPT);
        self.namespaces.shrink_to(KEPT);
        self.turns.shrink_to(KEPT);
    }

    fn waiting(&self, lane: Lane) -> usize {
        self.waiting[lane as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(namespace: &str, name: &str) -> Resource {
        ObjectRef::new(name).within(namespace)
    }

    /// Hands out everything the capacity allows, as names.
    fn drain(queue: &mut Queue) -> Vec<String> {
        std::iter::from_fn(|| queue.next())
            .map(|resource| resource.name)
            .collect()
    }

    #[test]
    fn within_a_namespace_called_passes_come_before_changes_each_in_arrival_order() {
        let mut queue = Queue::new(10);
        queue.push(r("a", "a1"), Lane::Changed);
        queue.push(r("a", "a2"), Lane::Changed);
        queue.push(r("a", "turn1"), Lane::Called);
        queue.push(r("a", "turn2"), Lane::Called);
        assert_eq!(drain(&mut queue), ["turn1", "turn2", "a1", "a2"]);
    }

    #[test]
    fn namespaces_take_turns_so_a_burst_costs_another_namespace_one_pass_in_two() {
        let mut queue = Queue::new(100);
        for i in 0..5 {
            queue.push(r("a", &format!("a{i}")), Lane::Changed);
        }
        // A window's budget granted to the burst: its called-back passes take turns too.
        queue.push(r("a", "granted"), Lane::Called);
        queue.push(r("b", "b0"), Lane::Changed);
        queue.push(r("b", "b1"), Lane::Changed);
        queue.push(r("c", "c0"), Lane::Called);
        assert_eq!(
            drain(&mut queue),
            ["granted", "b0", "c0", "a0", "b1", "a1", "a2", "a3", "a4"]
        );
    }

    #[test]
    fn a_resource_is_queued_once_and_moves_up_when_called() {
        let mut queue = Queue::new(10);
        queue.push(r("a", "x"), Lane::Changed);
        queue.push(r("a", "y"), Lane::Changed);
        queue.push(r("a", "x"), Lane::Changed);
        queue.push(r("a", "y"), Lane::Called);
        queue.push(r("a", "y"), Lane::Changed);
        assert_eq!(queue.waiting(Lane::Called), 1);
        assert_eq!(queue.waiting(Lane::Changed), 1);
        assert_eq!(drain(&mut queue), ["y", "x"]);
        assert_eq!(drain(&mut queue), Vec::<String>::new());
    }

    #[test]
    fn no_more_than_the_capacity_runs_and_a_finished_pass_frees_its_place() {
        let mut queue = Queue::new(2);
        for name in ["x", "y", "z"] {
            queue.push(r("a", name), Lane::Changed);
        }
        assert_eq!(drain(&mut queue), ["x", "y"]);
        queue.finished(&r("a", "x"));
        assert_eq!(drain(&mut queue), ["z"]);
    }

    #[test]
    fn a_trigger_while_its_pass_runs_queues_it_again_for_after() {
        let mut queue = Queue::new(10);
        queue.push(r("a", "x"), Lane::Changed);
        assert_eq!(drain(&mut queue), ["x"]);
        queue.push(r("a", "x"), Lane::Changed);
        queue.push(r("a", "x"), Lane::Called);
        assert_eq!(
            drain(&mut queue),
            Vec::<String>::new(),
            "never twice at once"
        );
        queue.push(r("a", "other"), Lane::Called);
        queue.finished(&r("a", "x"));
        assert_eq!(queue.waiting(Lane::Called), 2, "again, in the urgent lane");
        assert_eq!(drain(&mut queue), ["other", "x"]);
    }

    #[test]
    fn a_pass_the_controller_started_itself_takes_a_place_and_answers_what_was_queued() {
        let mut queue = Queue::new(1);
        queue.push(r("a", "x"), Lane::Changed);
        queue.started(&r("a", "x"));
        queue.push(r("a", "y"), Lane::Changed);
        assert_eq!(
            drain(&mut queue),
            Vec::<String>::new(),
            "its place is taken"
        );
        queue.finished(&r("a", "x"));
        assert_eq!(drain(&mut queue), ["y"], "x's change was seen by its pass");
    }

    #[test]
    fn a_deleted_resource_is_passed_no_more() {
        let mut queue = Queue::new(1);
        queue.push(r("a", "running"), Lane::Changed);
        queue.push(r("a", "waiting"), Lane::Changed);
        assert_eq!(drain(&mut queue), ["running"]);
        queue.push(r("a", "running"), Lane::Changed);
        queue.forget(&r("a", "running"));
        queue.forget(&r("a", "waiting"));
        queue.finished(&r("a", "running"));
        assert_eq!(drain(&mut queue), Vec::<String>::new());
        assert_eq!(queue.busy.len(), 0);
        assert!(
            queue.namespaces.is_empty() && queue.turns.is_empty(),
            "no stale places"
        );
    }
}
