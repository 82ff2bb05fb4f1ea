//! When to replace a token, and how long to wait after a failure. Pure: time comes in as values.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// A workload must never be handed a token with less than this left (ACS SDKs refresh 10
/// minutes before expiry).
pub const MIN_REMAINING: Duration = Duration::from_secs(10 * 60);
/// Room on top of [`MIN_REMAINING`] for the refresh itself and for clock skew.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Latency and clock skew make a token look a little shorter than asked; only a shortfall
/// beyond this is ACS issuing a shorter lifetime.
const SHORTFALL_TOLERANCE: Duration = Duration::from_secs(2 * 60);
/// Refreshes are spread over up to 5% of the refresh lead, at most 10 minutes, so identities
/// created together do not refresh together.
const JITTER_PERCENT: u32 = 5;
const MAX_JITTER: Duration = Duration::from_secs(10 * 60);

/// When the token in the Secret is to be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPlan {
    /// The refresh time; at or before "now" means at once.
    pub at: Timestamp,
    /// ACS returned a token living shorter than requested, so the plan follows the actual
    /// lifetime (two thirds of it); worth a Warning event.
    pub shortened: bool,
}

/// How long from `now` until `at`; zero when it has passed.
pub fn wait_until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// `now + delay`, saturating instead of overflowing: delays can come from outside (a
/// `Retry-After`), and an overflow panics.
pub fn later(now: Timestamp, delay: Duration) -> Timestamp {
    now.checked_add(signed(delay)).unwrap_or(Timestamp::MAX)
}

/// Beyond the longest lifetime ACS issues, how far ahead an `expiresOn` may lie (clock skew).
const EXPIRY_SKEW: Duration = Duration::from_secs(5 * 60);

/// Checks an `expiresOn` that ACS answered: a token already expired, or one said to live
/// longer than ACS ever issues, is an answer to distrust (and to retry with backoff), not a
/// token to hand to workloads or to plan refreshes by.
pub fn check_expiry(expires_on: Timestamp, now: Timestamp) -> Result<(), String> {
    if expires_on <= now {
        return Err(format!(
            "ACS returned a token that had already expired (expiresOn {expires_on})"
        ));
    }
    if expires_on > later(now, crate::crd::MAX_TOKEN_LIFETIME + EXPIRY_SKEW) {
        return Err(format!(
            "ACS returned a token said to expire at {expires_on}, more than 24 hours ahead"
        ));
    }
    Ok(())
}

/// Plans the refresh of a token issued at `issued_at` that ACS said expires at `expires_on`.
///
/// Normally at `expires_on - refresh_before - jitter`. If the token lives noticeably shorter
/// than `requested_lifetime`, at two thirds of its actual lifetime instead. Never later than
/// [`MIN_REMAINING`] (plus a margin) before expiry. `jitter_seed` (the resource's UID) makes the
/// jitter stable for one resource and different between resources.
pub fn refresh_at(
    issued_at: Timestamp,
    expires_on: Timestamp,
    requested_lifetime: Duration,
    refresh_before: Duration,
    jitter_seed: &str,
) -> RefreshPlan {
    let actual_lifetime = expires_on.duration_since(issued_at);
    let shortened =
        actual_lifetime < signed(requested_lifetime.saturating_sub(SHORTFALL_TOLERANCE));
    let lead = if shortened {
        // Refreshing at two thirds of the actual lifetime leaves one third before expiry.
        (actual_lifetime / 3).max(SignedDuration::ZERO)
    } else {
        signed(refresh_before)
    };
    let jitter = jitter(lead, jitter_seed);
    let planned = saturating_sub(expires_on, lead + jitter);
    // A token too short to keep the floor (seen with the emulator's compressed time) would be
    // refreshed at once, over and over: two thirds of its life it is.
    let at = if can_keep_min_remaining(issued_at, expires_on) {
        planned.min(saturating_sub(
            expires_on,
            signed(MIN_REMAINING + REFRESH_MARGIN),
        ))
    } else {
        planned
    };
    RefreshPlan { at, shortened }
}

/// Whether a token issued at `issued_at` and expiring at `expires_on` lives long enough to be
/// replaced while it still has [`MIN_REMAINING`] (plus a margin) left. Real ACS tokens (1 h at
/// least) always do.
pub fn can_keep_min_remaining(issued_at: Timestamp, expires_on: Timestamp) -> bool {
    expires_on.duration_since(issued_at) > signed(MIN_REMAINING + REFRESH_MARGIN)
}

/// What kind of failure a retry follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 5xx, timeouts, connection errors: pass by themselves, retried quickly with backoff.
    Transient,
    /// 429: wait at least what ACS asked for.
    Throttled { retry_after: Option<Duration> },
    /// 400, 401, missing or malformed connection Secret, Secret conflict: the user must fix
    /// something; retried slowly, yet often enough that a fix takes effect within a minute.
    UserError,
    /// Not a failure: waiting in the endpoint's queue, which calls the resource back when its
    /// turn comes; the delay is only a fallback should that call be missed.
    Queued,
}

const TRANSIENT_BASE: Duration = Duration::from_secs(5);
const TRANSIENT_CAP: Duration = Duration::from_secs(5 * 60);
const USER_ERROR_BASE: Duration = Duration::from_secs(15);
const USER_ERROR_CAP: Duration = Duration::from_secs(60);
/// How soon a resource waiting in the queue looks again if its turn never called it back (a
/// reserved slot it did not claim in time goes back to the budget and the place is lost).
/// Long: its turn calls it back, and each look of thousands waiting costs API reads (a
/// 30-s recheck of 4,000 queued creates kept every worker busy in scenario 8).
const QUEUED_RECHECK: Duration = Duration::from_secs(5 * 60);
/// Transient delays are shortened by up to this share, so failed resources spread out.
const RETRY_JITTER_PERCENT: u32 = 20;
/// The shortest retry while a token is about to run out, so a nearly expired token does not
/// turn into a busy loop against ACS.
const MIN_URGENT_RETRY: Duration = Duration::from_secs(5);
/// No requeue sooner than this.
const MIN_RETRY: Duration = Duration::from_secs(1);

/// How long to wait before retrying after the `failed_attempts`-th failure in a row.
///
/// Exponential backoff per [`FailureKind`]. While the Secret holds a token (`token_expires_on`
/// in the future), the delay is capped at half the time left before that token gets within
/// [`MIN_REMAINING`] of expiry, so several retries fit before it runs out. A `Retry-After` is
/// honoured even over that cap: retrying earlier would only earn another 429.
pub fn retry_delay(
    failed_attempts: i32,
    kind: FailureKind,
    now: Timestamp,
    token_expires_on: Option<Timestamp>,
    jitter_seed: &str,
) -> Duration {
    // The first failure waits the base delay.
    let exponent = failed_attempts.clamp(1, 32) as u32 - 1;
    let mut delay = match kind {
        FailureKind::Queued => return QUEUED_RECHECK,
        FailureKind::UserError => backoff(USER_ERROR_BASE, exponent, USER_ERROR_CAP),
        FailureKind::Transient | FailureKind::Throttled { .. } => {
            let full = backoff(TRANSIENT_BASE, exponent, TRANSIENT_CAP);
            let seed = format!("{jitter_seed}/{failed_attempts}");
            full - full * RETRY_JITTER_PERCENT / 100 * permille(&seed) / 1000
        }
    };
    // Also once the token has expired: workloads are failing, so the retries stay urgent.
    if let Some(expires_on) = token_expires_on {
        let deadline = saturating_sub(expires_on, signed(MIN_REMAINING));
        let before_deadline = Duration::try_from(deadline.duration_since(now)).unwrap_or_default();
        delay = delay.min((before_deadline / 2).max(MIN_URGENT_RETRY));
    }
    if let FailureKind::Throttled {
        retry_after: Some(retry_after),
    } = kind
    {
        delay = delay.max(retry_after);
    }
    delay.max(MIN_RETRY)
}

fn backoff(base: Duration, exponent: u32, cap: Duration) -> Duration {
    base.checked_mul(2u32.saturating_pow(exponent))
        .map_or(cap, |d| d.min(cap))
}

/// The deterministic share of the refresh lead to refresh earlier by.
fn jitter(lead: SignedDuration, seed: &str) -> SignedDuration {
    let spread = (lead * JITTER_PERCENT as i32 / 100).min(signed(MAX_JITTER));
    let spread_secs = spread.as_secs().max(0) as u64;
    SignedDuration::from_secs((fnv1a(seed.as_bytes()) % (spread_secs + 1)) as i64)
}

/// A stable number in 0..1000 derived from `seed`.
fn permille(seed: &str) -> u32 {
    (fnv1a(seed.as_bytes()) % 1000) as u32
}

/// FNV-1a: stable across Rust releases and processes, unlike `DefaultHasher`, so a resource's
/// jitter does not move on restart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn signed(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX)
}

fn saturating_sub(time: Timestamp, duration: SignedDuration) -> Timestamp {
    time.checked_sub(duration).unwrap_or(Timestamp::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn now() -> Timestamp {
        "2026-11-24T10:00:00Z".parse().unwrap()
    }

    fn at(offset: Duration) -> Timestamp {
        now() + signed(offset)
    }

    fn before(offset: Duration) -> Timestamp {
        now() - signed(offset)
    }

    #[test]
    fn answered_expiries_are_checked() {
        let cases = [
            ("an hour ahead", at(HOUR), true),
            ("a minute ahead (compressed time)", at(MINUTE), true),
            ("24 hours ahead", at(24 * HOUR), true),
            (
                "24 hours and a little skew",
                at(24 * HOUR + 4 * MINUTE),
                true,
            ),
            ("now", now(), false),
            ("in the past", before(HOUR), false),
            ("25 hours ahead", at(25 * HOUR), false),
            ("the end of time", Timestamp::MAX, false),
        ];
        for (name, expires_on, accepted) in cases {
            assert_eq!(check_expiry(expires_on, now()).is_ok(), accepted, "{name}");
        }
    }

    #[test]
    fn later_saturates() {
        assert_eq!(later(now(), HOUR), at(HOUR));
        assert_eq!(later(now(), Duration::MAX), Timestamp::MAX);
        assert_eq!(later(Timestamp::MAX, MINUTE), Timestamp::MAX);
        assert_eq!(wait_until(now(), before(HOUR)), Duration::ZERO);
        assert_eq!(wait_until(now(), at(HOUR)), HOUR);
    }

    #[test]
    fn refresh_plans() {
        struct Case {
            name: &'static str,
            expires_in: Duration,
            requested: Duration,
            refresh_before: Duration,
            // Refresh time as an offset from issuance, without jitter, and the jitter spread.
            expected_without_jitter: Duration,
            spread: Duration,
            shortened: bool,
        }
        let cases = [
            Case {
                name: "24h token, default refreshBefore 8h: refresh 8h before expiry",
                expires_in: 24 * HOUR,
                requested: 24 * HOUR,
                refresh_before: 8 * HOUR,
                expected_without_jitter: 16 * HOUR,
                spread: 10 * MINUTE, // 5% of 8h is 24m, capped at 10m
                shortened: false,
            },
            Case {
                name: "1h token, refreshBefore 20m",
                expires_in: HOUR,
                requested: HOUR,
                refresh_before: 20 * MINUTE,
                expected_without_jitter: 40 * MINUTE,
                spread: MINUTE, // 5% of 20m
                shortened: false,
            },
            Case {
                name: "a token a minute short of the request (latency, skew) is not shortened",
                expires_in: 24 * HOUR - MINUTE,
                requested: 24 * HOUR,
                refresh_before: 8 * HOUR,
                expected_without_jitter: 16 * HOUR - MINUTE,
                spread: 10 * MINUTE,
                shortened: false,
            },
            Case {
                name: "ACS returned 6h for 24h asked: refresh at two thirds of 6h",
                expires_in: 6 * HOUR,
                requested: 24 * HOUR,
                refresh_before: 8 * HOUR,
                expected_without_jitter: 4 * HOUR,
                spread: 6 * MINUTE, // 5% of the 2h lead
                shortened: true,
            },
            Case {
                name: "refreshBefore 15m leaves at least 11m: capped at expiry minus 11m",
                expires_in: HOUR,
                requested: HOUR,
                refresh_before: 15 * MINUTE,
                expected_without_jitter: 45 * MINUTE,
                spread: 45 * Duration::from_secs(1),
                shortened: false,
            },
            Case {
                name: "a 15-minute token: two thirds would leave 5m, so refresh 11m before expiry",
                expires_in: 15 * MINUTE,
                requested: HOUR,
                refresh_before: 20 * MINUTE,
                expected_without_jitter: 4 * MINUTE,
                spread: Duration::ZERO,
                shortened: true,
            },
            Case {
                name: "a 60-second token (compressed time) cannot leave 11m: two thirds of it",
                expires_in: MINUTE,
                requested: HOUR,
                refresh_before: 20 * MINUTE,
                expected_without_jitter: 40 * Duration::from_secs(1),
                spread: Duration::from_secs(1), // 5% of the 20 s lead
                shortened: true,
            },
        ];
        for case in cases {
            let plan = refresh_at(
                now(),
                at(case.expires_in),
                case.requested,
                case.refresh_before,
                "uid-1",
            );
            let latest = at(case.expires_in) - signed(MIN_REMAINING + REFRESH_MARGIN);
            let keeps_floor = can_keep_min_remaining(now(), at(case.expires_in));
            let unjittered = if keeps_floor {
                at(case.expected_without_jitter).min(latest)
            } else {
                at(case.expected_without_jitter)
            };
            assert!(
                plan.at <= unjittered && plan.at >= unjittered - signed(case.spread),
                "{}: {} not within {:?} before {}",
                case.name,
                plan.at,
                case.spread,
                unjittered
            );
            assert!(
                !keeps_floor || plan.at <= latest,
                "{}: leaves less than 11 minutes",
                case.name
            );
            assert_eq!(plan.shortened, case.shortened, "{}", case.name);
        }
    }

    #[test]
    fn a_token_with_less_than_eleven_minutes_is_due_now() {
        let plan = refresh_at(
            before(50 * MINUTE),
            at(5 * MINUTE),
            HOUR,
            20 * MINUTE,
            "uid-1",
        );
        assert!(plan.at <= now());
        assert_eq!(wait_until(now(), plan.at), Duration::ZERO);
    }

    #[test]
    fn a_token_already_expired_on_issue_is_due_at_once() {
        let plan = refresh_at(now(), before(MINUTE), HOUR, 20 * MINUTE, "uid-1");
        assert!(plan.shortened);
        assert_eq!(wait_until(now(), plan.at), Duration::ZERO);
    }

    #[test]
    fn jitter_is_stable_per_resource_and_differs_between_resources() {
        let plan = |uid: &str| refresh_at(now(), at(24 * HOUR), 24 * HOUR, 8 * HOUR, uid).at;
        assert_eq!(plan("uid-1"), plan("uid-1"));
        let distinct: std::collections::BTreeSet<Timestamp> =
            (0..100).map(|i| plan(&format!("uid-{i}"))).collect();
        assert!(
            distinct.len() > 50,
            "only {} distinct refresh times",
            distinct.len()
        );
    }

    #[test]
    fn the_wait_counts_down_to_the_plan() {
        let plan = refresh_at(now(), at(HOUR), HOUR, 20 * MINUTE, "uid-1");
        let wait = wait_until(now(), plan.at);
        assert!(wait <= 40 * MINUTE && wait >= 39 * MINUTE, "{wait:?}");
    }

    #[test]
    fn retry_delays() {
        const S: Duration = Duration::from_secs(1);
        struct Case {
            name: &'static str,
            failed_attempts: i32,
            kind: FailureKind,
            token_expires_in: Option<Duration>,
            // The jitter only ever shortens transient delays, by at most 20%.
            max: Duration,
            min: Duration,
        }
        assert_eq!(
            retry_delay(
                30,
                FailureKind::Transient,
                now(),
                Some(before(HOUR)),
                "uid-1"
            ),
            MIN_URGENT_RETRY,
            "an expired token: retry every 5s, not after the 5-minute cap"
        );
        let plenty = Some(24 * HOUR);
        let cases = [
            Case {
                name: "first transient failure: 5s",
                failed_attempts: 1,
                kind: FailureKind::Transient,
                token_expires_in: plenty,
                max: 5 * S,
                min: 4 * S,
            },
            Case {
                name: "fourth transient failure: 40s",
                failed_attempts: 4,
                kind: FailureKind::Transient,
                token_expires_in: plenty,
                max: 40 * S,
                min: 32 * S,
            },
            Case {
                name: "many transient failures: capped at 5m",
                failed_attempts: 30,
                kind: FailureKind::Transient,
                token_expires_in: None,
                max: 5 * MINUTE,
                min: 4 * MINUTE,
            },
            Case {
                name: "attempts beyond any exponent do not overflow",
                failed_attempts: i32::MAX,
                kind: FailureKind::Transient,
                token_expires_in: None,
                max: 5 * MINUTE,
                min: 4 * MINUTE,
            },
            Case {
                name: "zero attempts counts as the first",
                failed_attempts: 0,
                kind: FailureKind::Transient,
                token_expires_in: None,
                max: 5 * S,
                min: 4 * S,
            },
            Case {
                name: "first user error: 15s",
                failed_attempts: 1,
                kind: FailureKind::UserError,
                token_expires_in: plenty,
                max: 15 * S,
                min: 15 * S,
            },
            Case {
                name: "user errors are capped at 60s, so a fixed key takes effect within a minute",
                failed_attempts: 10,
                kind: FailureKind::UserError,
                token_expires_in: plenty,
                max: 60 * S,
                min: 60 * S,
            },
            Case {
                name: "Retry-After is honoured",
                failed_attempts: 1,
                kind: FailureKind::Throttled {
                    retry_after: Some(30 * S),
                },
                token_expires_in: plenty,
                max: 30 * S,
                min: 30 * S,
            },
            Case {
                name: "throttled without Retry-After backs off like a transient failure",
                failed_attempts: 2,
                kind: FailureKind::Throttled { retry_after: None },
                token_expires_in: plenty,
                max: 10 * S,
                min: 8 * S,
            },
            Case {
                name: "token gets within 10m of expiry in 6m: retry within 3m",
                failed_attempts: 30,
                kind: FailureKind::Transient,
                token_expires_in: Some(16 * MINUTE),
                max: 3 * MINUTE,
                min: 3 * MINUTE,
            },
            Case {
                name: "token already within 10m of expiry: retry every 5s",
                failed_attempts: 30,
                kind: FailureKind::Transient,
                token_expires_in: Some(8 * MINUTE),
                max: 5 * S,
                min: 5 * S,
            },
            Case {
                name: "Retry-After beats the expiry cap",
                failed_attempts: 1,
                kind: FailureKind::Throttled {
                    retry_after: Some(2 * MINUTE),
                },
                token_expires_in: Some(11 * MINUTE),
                max: 2 * MINUTE,
                min: 2 * MINUTE,
            },
        ];
        for case in cases {
            let expires_on = case.token_expires_in.map(at);
            let delay = retry_delay(case.failed_attempts, case.kind, now(), expires_on, "uid-1");
            assert!(
                delay >= case.min && delay <= case.max,
                "{}: {delay:?} not in {:?}..={:?}",
                case.name,
                case.min,
                case.max
            );
        }
    }

    #[test]
    fn an_expired_token_is_retried_urgently_so_it_is_replaced_soon_after_acs_returns() {
        // The contract: never an expired token while ACS is reachable. A 5-minute backoff
        // after an outage would leave one there for minutes.
        let expired = Some(before(MINUTE));
        let delay = retry_delay(30, FailureKind::Transient, now(), expired, "uid-1");
        assert_eq!(delay, MIN_URGENT_RETRY);
    }
}
