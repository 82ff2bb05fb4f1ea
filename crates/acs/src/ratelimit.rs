//! Client-side rate limits per ACS resource, so a busy operator waits locally instead of
//! collecting 429s from the service.
//!
//! The service counts each operation in a 30-second window (1000 creates, 1000 issues, 500
//! deletes, 500 revokes). Governor implements GCRA: a bucket of `burst` cells, one cell back
//! every `interval`. In any window of length W such a limiter admits at most
//! `burst + W / interval` requests, so a quota of "N per 30 s with burst N" lets through up to
//! 2N in one 30-s window (N at once, then N more as the bucket refills), and even "burst N/2,
//! N per 30 s" lets through 1.5N. To never exceed N in any sliding window we need
//! `burst + 30 s / interval <= N`, and everything given to the burst is taken from the sustained
//! rate. Big provisioning runs are bound by the sustained rate, so the burst stays small:
//!
//! - `burst = N/50` (20 for creates): a handful of reconciles start at once without queueing;
//! - `headroom = N/50` cells are never used: requests we send evenly can arrive bunched up
//!   (latency jitter; 20 cells at 32/s absorb 0.6 s of it), and a restarted process starts with
//!   a full burst while the service still counts the previous process's last 30 s;
//! - the sustained rate takes the rest: `N - burst - headroom` per 30 s (960 creates per 30 s).
//!
//! 10,000 creates then take (10,000 - 20) / 32 per s ≈ 312 s, against the service's floor of
//! ≈ 270 s (a full window of 1000 every 30 s), with no 429 even under a sliding-window count.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

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

/// The GCRA quota that never admits more than `limit` requests in any sliding [`WINDOW`],
/// with `limit/50` of them kept as headroom (see the module documentation).
pub fn window_safe_quota(limit: u32) -> Quota {
    let burst = (limit / 50).max(1);
    let headroom = limit / 50;
    let sustained = limit.saturating_sub(burst + headroom).max(1);
    let interval = WINDOW / sustained;
    Quota::with_period(interval)
        .expect("a 30 s window divided by at most u32::MAX requests is non-zero")
        .allow_burst(NonZeroU32::new(burst).expect("burst is at least 1"))
}

/// Governor's clock on tokio's time, so the limiter waits with `tokio::time::sleep` and the
/// tests can drive it with paused time.
#[derive(Debug, Clone)]
struct TokioClock {
    origin: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(tokio::time::Instant::now().saturating_duration_since(self.origin))
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// One operation's limiter and the queue of callers waiting for it.
#[derive(Debug)]
struct Lane {
    /// Callers wait their turn here (tokio's mutex is FIFO), so only the head of the queue
    /// sleeps on the limiter: fair, and no herd of waiters waking for every freed cell.
    queue: tokio::sync::Mutex<()>,
    limiter: Limiter,
}

/// The limiters of one ACS resource, one per operation. Share one per endpoint: every client
/// built for the same endpoint uses [`RateLimits::for_endpoint`] unless given its own.
#[derive(Debug)]
pub struct RateLimits {
    clock: TokioClock,
    /// Indexed by `operation as usize`: [`Operation::ALL`] is in declaration order.
    lanes: [Lane; Operation::ALL.len()],
}

impl Default for RateLimits {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimits {
    /// Limiters at the published limits, each with a full (small) burst available.
    pub fn new() -> Self {
        let clock = TokioClock {
            origin: tokio::time::Instant::now(),
        };
        let lanes = Operation::ALL.map(|operation| Lane {
            queue: tokio::sync::Mutex::new(()),
            limiter: RateLimiter::direct_with_clock(
                window_safe_quota(operation.published_limit()),
                clock.clone(),
            ),
        });
        Self { clock, lanes }
    }

    /// The process-wide limiters of the resource at `endpoint`. Entries are never dropped: a
    /// fresh limiter would forget what the service still counts, and endpoints are few.
    pub fn for_endpoint(endpoint: &str) -> Arc<Self> {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<RateLimits>>>> = OnceLock::new();
        let key = endpoint.trim_end_matches('/').to_ascii_lowercase();
        let mut registry = REGISTRY
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        registry.entry(key).or_default().clone()
    }

    /// Waits until `operation` may be sent; returns how long that took.
    pub async fn acquire(&self, operation: Operation) -> Duration {
        let lane = &self.lanes[operation as usize];
        let start = tokio::time::Instant::now();
        let _turn = lane.queue.lock().await;
        while let Err(not_until) = lane.limiter.check() {
            tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
        }
        start.elapsed()
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

    #[test]
    fn quotas_leave_room_in_every_window() {
        for limit in [500, 1000] {
            let quota = window_safe_quota(limit);
            let burst = quota.burst_size().get();
            let per_window = WINDOW.as_nanos() / quota.replenish_interval().as_nanos();
            assert_eq!(burst, limit / 50, "{limit}");
            assert_eq!(u128::from(burst) + per_window, u128::from(limit) * 49 / 50);
        }
        // Tiny limits still make progress.
        assert_eq!(window_safe_quota(1).burst_size().get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn greedy_callers_never_exceed_the_sliding_window() {
        let limits = RateLimits::new();
        for operation in [Operation::CreateIdentity, Operation::DeleteIdentity] {
            let limit = operation.published_limit() as usize;
            let origin = tokio::time::Instant::now();
            let mut admitted = Vec::new();
            for _ in 0..3 * limit {
                limits.acquire(operation).await;
                admitted.push(origin.elapsed());
            }
            // Even with 0.6 s of arrival jitter the service never counts more than the limit.
            let jittered = busiest_window(&admitted, WINDOW + Duration::from_millis(600));
            assert!(jittered <= limit, "{operation:?}: {jittered} > {limit}");
            // Throughput: the burst at once, then 96 % of the limit per window.
            let expected = WINDOW.mul_f64((3 * limit - limit / 50) as f64 / (limit as f64 * 0.96));
            let took = *admitted.last().unwrap();
            assert!(
                took >= expected - Duration::from_millis(100)
                    && took <= expected + Duration::from_secs(1),
                "{operation:?}: {took:?} vs {expected:?}"
            );
            // Let the bucket refill before the next operation's run starts its own clock.
            tokio::time::sleep(WINDOW).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn operations_have_separate_budgets_and_waits_are_reported() {
        let limits = RateLimits::new();
        let burst = window_safe_quota(Operation::DeleteIdentity.published_limit())
            .burst_size()
            .get();
        for _ in 0..burst {
            assert_eq!(
                limits.acquire(Operation::DeleteIdentity).await,
                Duration::ZERO
            );
        }
        let waited = limits.acquire(Operation::DeleteIdentity).await;
        assert!(waited >= WINDOW / 480, "{waited:?}");
        assert_eq!(
            limits.acquire(Operation::CreateIdentity).await,
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_budget_in_arrival_order() {
        let limits = Arc::new(RateLimits::new());
        let origin = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..1500)
            .map(|_| {
                let limits = limits.clone();
                tokio::spawn(async move {
                    limits.acquire(Operation::IssueToken).await;
                    origin.elapsed()
                })
            })
            .collect();
        let mut admitted = Vec::new();
        for task in tasks {
            admitted.push(task.await.unwrap());
        }
        // First come, first served: admissions follow the order the callers arrived in.
        assert!(admitted.windows(2).all(|pair| pair[0] <= pair[1]));
        assert!(busiest_window(&admitted, WINDOW + Duration::from_millis(600)) <= 1000);
    }

    #[test]
    fn one_registry_entry_per_endpoint() {
        let a = RateLimits::for_endpoint("https://r.communication.azure.com");
        let b = RateLimits::for_endpoint("https://R.communication.azure.com/");
        let other = RateLimits::for_endpoint("https://s.communication.azure.com");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
    }
}
