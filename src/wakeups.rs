//! When each resource's next refresh (or owed restart) is due, and the pass that then comes.
//!
//! Hand-written instead of returning `Action::requeue` for these waits: kube-runtime's
//! scheduler keeps a delay-queue slot and a map entry of two `ReconcileRequest`s for every
//! resource waiting (~560 bytes each, 5.6 MiB at 10,000 identities, docs/benchmarks.md), and
//! nearly every resource is waiting for its refresh nearly all the time. Here a wait is ~150
//! bytes: the owner's UID, a second, and its namespace and name. Short waits (retries, a cache
//! that is behind) still go through kube-runtime's scheduler.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::Notify;

use crate::cached::CachedIdentity;
use crate::crd::CommunicationIdentity;
use crate::known_secrets::parse_uid;
use crate::turns::Turns;

/// The longest the firing loop sleeps before it looks at the clock again, so that a wall clock
/// stepped forward (a suspended VM) is noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Wakeups {
    inner: Mutex<Inner>,
    /// Told when a wait earlier than every other one is set.
    earlier: Notify,
}

#[derive(Default)]
struct Inner {
    by_owner: HashMap<u128, Wakeup>,
    /// (second due, owner), earliest first.
    queue: BTreeSet<(i64, u128)>,
}

struct Wakeup {
    at: i64,
    namespace: Box<str>,
    name: Box<str>,
}

impl Wakeups {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reconciles `resource` at `at` (rounded up to the second, so never early), in place of
    /// any wait set for it before.
    /// False when the resource has no UID in the API server's form; the caller then requeues.
    pub fn set(&self, resource: &CommunicationIdentity, at: Timestamp) -> bool {
        let (Some(owner), Some(namespace)) = (
            resource.uid().as_deref().and_then(parse_uid),
            resource.namespace(),
        ) else {
            return false;
        };
        let at = at.as_second() + i64::from(at.subsec_nanosecond() > 0);
        let mut inner = self.lock();
        if let Some(previous) = inner.by_owner.get(&owner) {
            let previous = previous.at;
            inner.queue.remove(&(previous, owner));
        }
        let earliest = inner.queue.first().is_none_or(|(first, _)| at < *first);
        inner.queue.insert((at, owner));
        let wakeup = Wakeup {
            at,
            namespace: namespace.into(),
            name: resource.name_any().into(),
        };
        inner.by_owner.insert(owner, wakeup);
        drop(inner);
        if earliest {
            self.earlier.notify_one();
        }
        true
    }

    /// Forgets the wait of the resource with `owner_uid` (it was deleted).
    pub fn cancel(&self, owner_uid: &str) {
        let Some(owner) = parse_uid(owner_uid) else {
            return;
        };
        let mut inner = self.lock();
        if let Some(wakeup) = inner.by_owner.remove(&owner) {
            inner.queue.remove(&(wakeup.at, owner));
        }
    }

    /// When the resource with `owner_uid` is to be reconciled next, if a wait is set.
    pub fn due(&self, owner_uid: &str) -> Option<Timestamp> {
        let owner = parse_uid(owner_uid)?;
        let at = self.lock().by_owner.get(&owner)?.at;
        Timestamp::from_second(at).ok()
    }

    /// Removes the waits due by `now` and returns their resources, with the second the next
    /// remaining wait is due.
    fn take_due(&self, now: Timestamp) -> (Vec<ObjectRef<CachedIdentity>>, Option<i64>) {
        let now = now.as_second();
        let mut inner = self.lock();
        let mut due = Vec::new();
        while let Some(&(at, owner)) = inner.queue.first()
            && at <= now
        {
            inner.queue.pop_first();
            if let Some(wakeup) = inner.by_owner.remove(&owner) {
                due.push(ObjectRef::new(&wakeup.name).within(&wakeup.namespace));
            }
        }
        (due, inner.queue.first().map(|(at, _)| *at))
    }

    /// Sends each resource to `turns` once its wait is due by `clock`; runs until dropped.
    pub async fn fire(&self, turns: &Turns, clock: impl Fn() -> Timestamp) {
        loop {
            let now = clock();
            let (due, next) = self.take_due(now);
            for resource in due {
                turns.send(resource);
            }
            let until = |at: i64| {
                let at = Timestamp::from_second(at).unwrap_or(now);
                Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
            };
            let sleep = next.map_or(MAX_SLEEP, until).min(MAX_SLEEP);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.earlier.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::json;

    const ALICE: &str = "00000000-0000-0000-0000-00000000000a";
    const BOB: &str = "00000000-0000-0000-0000-00000000000b";

    fn identity(name: &str, uid: &str) -> CommunicationIdentity {
        serde_json::from_value(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": { "name": name, "namespace": "team", "uid": uid },
            "spec": { "connectionSecretRef": { "name": "acs" }, "scopes": ["chat"] }
        }))
        .unwrap()
    }

    fn second(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn waits_come_due_in_order_and_a_new_wait_replaces_the_old() {
        let wakeups = Wakeups::default();
        assert!(wakeups.set(&identity("alice", ALICE), second(30)));
        assert!(wakeups.set(&identity("bob", BOB), second(20)));
        assert!(wakeups.set(&identity("alice", ALICE), second(10)));
        assert_eq!(wakeups.due(ALICE), Some(second(10)));
        assert_eq!(wakeups.due(BOB), Some(second(20)));
        // Never early: a wait within a second is due at its end.
        let almost = second(25) + jiff::SignedDuration::from_millis(300);
        wakeups.set(&identity("bob", BOB), almost);
        assert_eq!(wakeups.due(BOB), Some(second(26)));
        wakeups.set(&identity("bob", BOB), second(20));

        assert_eq!(
            wakeups.take_due(second(9)),
            (vec![], Some(second(10).as_second()))
        );
        let alice = ObjectRef::new("alice").within("team");
        let bob = ObjectRef::new("bob").within("team");
        assert_eq!(
            wakeups.take_due(second(10)),
            (vec![alice], Some(second(20).as_second()))
        );
        assert_eq!(wakeups.take_due(second(99)), (vec![bob], None));
        assert_eq!(wakeups.due(BOB), None);
    }

    #[test]
    fn a_cancelled_wait_never_comes() {
        let wakeups = Wakeups::default();
        wakeups.set(&identity("alice", ALICE), second(10));
        wakeups.cancel(ALICE);
        assert_eq!(wakeups.due(ALICE), None);
        assert_eq!(wakeups.take_due(second(99)), (vec![], None));
    }

    #[test]
    fn a_resource_without_an_api_server_uid_is_left_to_the_caller() {
        let wakeups = Wakeups::default();
        assert!(!wakeups.set(&identity("alice", "not-a-uid"), second(10)));
        assert_eq!(wakeups.take_due(second(99)), (vec![], None));
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_fires_a_wait_set_while_it_sleeps() {
        let wakeups = std::sync::Arc::new(Wakeups::default());
        let (turns, mut fired) = Turns::new();
        let start = tokio::time::Instant::now();
        let clock = move || second(start.elapsed().as_secs() as i64);
        let firing = {
            let wakeups = wakeups.clone();
            tokio::spawn(async move { wakeups.fire(&turns, clock).await })
        };
        tokio::task::yield_now().await;
        wakeups.set(&identity("alice", ALICE), second(5));
        let alice = fired.next().await;
        assert_eq!(alice, Some(ObjectRef::new("alice").within("team")));
        assert_eq!(start.elapsed().as_secs(), 5);
        firing.abort();
    }
}
