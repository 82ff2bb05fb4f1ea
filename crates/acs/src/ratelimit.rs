//! Client-side rate limits per ACS resource, so a busy operator waits locally instead of
//! collecting 429s from the service.
//!
//! The service counts each operation in a sliding 30-second window (1000 creates, 1000 issues,
//! 500 deletes, 500 revokes). The limiter here keeps the same count: a log of when requests
//! were *answered* in the last 30 s plus those still in flight, and admits a request only while
//! that total is under the limit. Counting answer times (not send times) makes it exact: the
//! service saw a request no later than its answer came back, so a request sent 30 s after that
//! answer can never share a window with it, whatever the latency.
//!
//! Written by hand rather than with `governor`: GCRA admits at most `burst + W / interval` per
//! window, so staying under the service's sliding window forces a small burst and a sustained
//! rate below the limit, and 10,000 creates took ≈ 312 s against the service's floor of ≈ 270 s
//! (full windows of 1000 every 30 s). A sliding-window log reaches that floor.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The window in which the service counts requests.
pub const WINDOW: Duration = Duration::from_secs(30);

/// One ACS identity operation; each has its own budget at the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    CreateIdentity,
    IssueToken,
    RevokeTokens,
    DeleteIdentity,
    GetIdentity,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::CreateIdentity,
        Operation::IssueToken,
        Operation::RevokeTokens,
        Operation::DeleteIdentity,
        Operation::GetIdentity,
    ];

    /// A bounded label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::CreateIdentity => "create_identity",
            Operation::IssueToken => "issue_token",
            Operation::RevokeTokens => "revoke_tokens",
            Operation::DeleteIdentity => "delete_identity",
            Operation::GetIdentity => "get_identity",
        }
    }

    /// Requests the service allows per [`WINDOW`] and resource.
    pub fn published_limit(self) -> u32 {
        match self {
            Operation::CreateIdentity | Operation::IssueToken => 1000,
            Operation::RevokeTokens | Operation::DeleteIdentity => 500,
            // No limit is published for the preview GET. Assume the smaller published budget
            // rather than rely on an unpublished larger one; the operator reads identities
            // only to verify them, so the cap costs nothing.
            Operation::GetIdentity => 500,
        }
    }
}

/// One operation's budget: answers within the last [`WINDOW`] plus requests in flight.
#[derive(Debug, Default)]
struct Lane {
    /// Callers wait their turn here (tokio's mutex is FIFO): first come, first served, and only
    /// the head of the queue watches the budget.
    queue: tokio::sync::Mutex<()>,
    state: Mutex<LaneState>,
    /// Woken when a request in flight is answered.
    answered: Notify,
}

#[derive(Debug, Default)]
struct LaneState {
    /// When requests were answered, oldest first.
    answered_at: VecDeque<Instant>,
    in_flight: u32,
}

impl LaneState {
    fn forget_before(&mut self, now: Instant) {
        while self
            .answered_at
            .front()
            .is_some_and(|at| *at + WINDOW <= now)
        {
            self.answered_at.pop_front();
        }
    }

    fn used(&self) -> u32 {
        self.in_flight + self.answered_at.len() as u32
    }
}

/// How many requests per window the limiter admits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quota {
    /// The published limits times this factor: 1 for a resource with the default quotas, more
    /// for one whose quotas Microsoft raised.
    Scaled(f64),
    /// No client-side limit (`--acs-rate-limit off`, for an endpoint that sets none).
    Unlimited,
}

impl Default for Quota {
    fn default() -> Self {
        Quota::Scaled(1.0)
    }
}

impl Quota {
    /// Requests of `operation` admitted per [`WINDOW`].
    pub fn limit(self, operation: Operation) -> u32 {
        match self {
            // At least one, so that a tiny factor slows requests down instead of stopping them.
            Quota::Scaled(factor) => {
                (f64::from(operation.published_limit()) * factor).max(1.0) as u32
            }
            Quota::Unlimited => u32::MAX,
        }
    }
}

/// The limiters of one ACS resource, one per operation. Share one per endpoint: every client
/// built for the same endpoint uses [`RateLimits::for_endpoint`] unless given its own.
#[derive(Debug, Default)]
pub struct RateLimits {
    quota: Quota,
    /// Indexed by `operation as usize`: [`Operation::ALL`] is in declaration order.
    lanes: [Lane; Operation::ALL.len()],
}

/// Leave to send one request; dropping it (when the answer, an error or a timeout came back)
/// counts the request as answered.
#[derive(Debug)]
#[must_use = "the request counts as answered when the permit is dropped"]
pub struct Permit<'a> {
    lane: &'a Lane,
    /// How long the caller waited for it.
    pub waited: Duration,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut state = self.lane.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight -= 1;
        state.answered_at.push_back(Instant::now());
        drop(state);
        self.lane.answered.notify_waiters();
    }
}

impl RateLimits {
    /// Limiters at the published limits, with nothing counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limiters admitting `quota`, with nothing counted yet.
    pub fn with_quota(quota: Quota) -> Self {
        Self {
            quota,
            ..Self::default()
        }
    }

    /// The process-wide limiters of the resource at `endpoint`, created with `quota` by the
    /// first caller (a process uses one quota). An entry outlives its clients while its window
    /// still counts requests (a fresh limiter would forget what the service still counts), and
    /// is dropped, when the next endpoint is added, once no client holds it and its window is
    /// empty: tenants name endpoints, so the registry must not grow with every one ever named.
    pub fn for_endpoint(endpoint: &str, quota: Quota) -> Arc<Self> {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<RateLimits>>>> = OnceLock::new();
        let key = endpoint.trim_end_matches('/').to_ascii_lowercase();
        let mut registry = REGISTRY
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(limits) = registry.get(&key) {
            return limits.clone();
        }
        // Under the registry's lock a count of one cannot grow: every other handle is a clone
        // of one handed out here.
        registry.retain(|_, limits| Arc::strong_count(limits) > 1 || !limits.is_idle());
        let limits = Arc::new(Self::with_quota(quota));
        registry.insert(key, limits.clone());
        limits
    }

    /// Nothing answered within the last [`WINDOW`] and nothing in flight, in any lane.
    fn is_idle(&self) -> bool {
        let now = Instant::now();
        self.lanes.iter().all(|lane| {
            let mut state = lane.state.lock().unwrap_or_else(|p| p.into_inner());
            state.forget_before(now);
            state.used() == 0
        })
    }

    /// Waits until `operation` may be sent without the service counting more than its limit.
    pub async fn acquire(&self, operation: Operation) -> Permit<'_> {
        let lane = &self.lanes[operation as usize];
        let limit = self.quota.limit(operation);
        let start = Instant::now();
        let _turn = lane.queue.lock().await;
        loop {
            // Registered before the budget is read, so an answer in between is not missed.
            let answered = lane.answered.notified();
            let oldest = {
                let mut state = lane.state.lock().unwrap_or_else(|p| p.into_inner());
                state.forget_before(Instant::now());
                if state.used() < limit {
                    state.in_flight += 1;
                    return Permit {
                        lane,
                        waited: start.elapsed(),
                    };
                }
                state.answered_at.front().copied()
            };
            match oldest {
                // The oldest answer leaves the window then (or an answer frees nothing sooner).
                Some(at) => tokio::time::sleep_until(at + WINDOW).await,
                // Everything counted is still in flight: wait for an answer first.
                None => answered.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most admissions in any half-open window `[t, t + width)`.
    fn busiest_window(admitted: &[Duration], width: Duration) -> usize {
        let mut busiest = 0;
        let mut first = 0;
        for (last, &time) in admitted.iter().enumerate() {
            while admitted[first] + width <= time {
                first += 1;
            }
            busiest = busiest.max(last - first + 1);
        }
        busiest
    }

    #[tokio::test(start_paused = true)]
    async fn greedy_callers_fill_each_window_and_never_exceed_it() {
        let limits = RateLimits::new();
        for operation in [Operation::CreateIdentity, Operation::DeleteIdentity] {
            let limit = operation.published_limit() as usize;
            let origin = Instant::now();
            let mut answered = Vec::new();
            for _ in 0..3 * limit {
                let permit = limits.acquire(operation).await;
                // Each request is answered 1 ms after it was sent.
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(permit);
                answered.push(origin.elapsed());
            }
            assert!(busiest_window(&answered, WINDOW) <= limit, "{operation:?}");
            // Three windows' worth go out in just over two windows: the service's own floor.
            let took = *answered.last().unwrap();
            let floor = 2 * WINDOW + Duration::from_millis(1) * limit as u32;
            assert!(
                took >= 2 * WINDOW && took <= floor + Duration::from_secs(1),
                "{operation:?}: {took:?}"
            );
            tokio::time::sleep(WINDOW).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_count_until_answered() {
        let limits = Arc::new(RateLimits::new());
        let limit = Operation::DeleteIdentity.published_limit();
        let mut held = Vec::new();
        for _ in 0..limit {
            held.push(limits.acquire(Operation::DeleteIdentity).await);
        }
        assert!(held.iter().all(|permit| permit.waited.is_zero()));
        // Other operations have budgets of their own.
        assert!(
            limits
                .acquire(Operation::CreateIdentity)
                .await
                .waited
                .is_zero()
        );
        // The next delete waits for the answers (5 s from now), then a full window after them.
        let next = tokio::spawn({
            let limits = limits.clone();
            async move { limits.acquire(Operation::DeleteIdentity).await.waited }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(held);
        assert_eq!(next.await.unwrap(), Duration::from_secs(5) + WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_budget_in_arrival_order() {
        let limits = Arc::new(RateLimits::new());
        let origin = Instant::now();
        let tasks: Vec<_> = (0..1500)
            .map(|_| {
                let limits = limits.clone();
                tokio::spawn(async move {
                    let permit = limits.acquire(Operation::IssueToken).await;
                    let sent = origin.elapsed();
                    drop(permit);
                    sent
                })
            })
            .collect();
        let mut admitted = Vec::new();
        for task in tasks {
            admitted.push(task.await.unwrap());
        }
        // First come, first served: admissions follow the order the callers arrived in.
        assert!(admitted.windows(2).all(|pair| pair[0] <= pair[1]));
        assert!(busiest_window(&admitted, WINDOW) <= 1000);
        assert_eq!(
            *admitted.last().unwrap(),
            WINDOW,
            "the 1001st waits exactly one window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_scales_or_lifts_the_published_limits() {
        assert_eq!(Quota::Scaled(2.5).limit(Operation::CreateIdentity), 2500);
        assert_eq!(Quota::Scaled(0.0001).limit(Operation::RevokeTokens), 1);
        for (quota, admitted_at_once) in [(Quota::Scaled(2.0), 1000), (Quota::Unlimited, 5000)] {
            let limits = RateLimits::with_quota(quota);
            let mut held = Vec::new();
            for _ in 0..5000 {
                let permit = tokio::time::timeout(
                    Duration::from_millis(1),
                    limits.acquire(Operation::DeleteIdentity),
                )
                .await;
                match permit {
                    Ok(permit) => held.push(permit),
                    Err(_) => break,
                }
            }
            assert_eq!(held.len(), admitted_at_once, "{quota:?}");
        }
    }

    #[test]
    fn one_registry_entry_per_endpoint() {
        let quota = Quota::default();
        let a = RateLimits::for_endpoint("https://r.communication.azure.com", quota);
        let b = RateLimits::for_endpoint("https://R.communication.azure.com/", quota);
        let other = RateLimits::for_endpoint("https://s.communication.azure.com", quota);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_drops_entries_nobody_uses_once_their_window_is_empty() {
        let quota = Quota::default();
        let endpoint = "https://evicted.communication.azure.com";
        let limits = RateLimits::for_endpoint(endpoint, quota);
        drop(limits.acquire(Operation::IssueToken).await);
        let unused = Arc::downgrade(&limits);
        drop(limits);
        // Another endpoint arrives while the answer still counts: the entry stays.
        let held = RateLimits::for_endpoint("https://held.communication.azure.com", quota);
        assert!(
            unused.upgrade().is_some(),
            "dropped while its window counted"
        );

        tokio::time::sleep(WINDOW).await;
        let _next = RateLimits::for_endpoint("https://next.communication.azure.com", quota);
        assert!(unused.upgrade().is_none(), "kept although idle and unused");
        // An entry a client still holds stays, idle as it is.
        let again = RateLimits::for_endpoint("https://held.communication.azure.com", quota);
        assert!(Arc::ptr_eq(&held, &again));
    }
}
