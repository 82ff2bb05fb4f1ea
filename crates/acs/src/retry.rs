//! When to try an ACS request again, as pure functions of the failure and the time spent.
//!
//! Every operation the client sends is safe to repeat: create carries a `customId` (a repeat
//! answers 200 with the same identity), an extra issued token is harmless, and revoke and
//! delete are idempotent. So unlike azure-core (which retries a POST only on a few statuses),
//! every transient failure is retried.

use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::error::Error;

/// How persistently the client retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub max_retries: u32,
    /// Backoff before the first retry of a 5xx, timeout or connection failure; doubles each time.
    pub base_delay: Duration,
    /// Upper bound of one backoff.
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured by waiting; a longer one is returned to the caller as
    /// [`Error::Throttled`] so it can requeue instead of holding a task.
    pub max_retry_after: Duration,
    /// Bound on the whole call from its first attempt (attempts, backoffs and rate-limit waits
    /// between them): no retry starts that could not finish in time, and attempts are cut short
    /// at it. Waiting for the rate limiter before the first attempt is local queueing and is not
    /// counted.
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// No retries: every failure goes straight to the caller.
    pub const NEVER: RetryPolicy = RetryPolicy {
        max_retries: 0,
        base_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
        max_retry_after: Duration::ZERO,
        deadline: None,
    };

    /// Exponential backoff with full jitter: uniform in `[0, min(max_delay, base * 2^retry))`.
    /// `unit` is a random sample from `[0, 1)`, passed in to keep this pure. Full jitter spreads
    /// the retries of many reconciles that failed together.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// How long to wait before retry number `retry` (0-based) after `error`, `elapsed` into the
    /// call; `None` when the error must go to the caller.
    pub fn delay_for(
        &self,
        error: &Error,
        retry: u32,
        elapsed: Duration,
        unit: f64,
    ) -> Option<Duration> {
        if retry >= self.max_retries || !error.is_transient() {
            return None;
        }
        let delay = match error.retry_after() {
            Some(after) if after > self.max_retry_after => return None,
            Some(after) => after,
            None => self.backoff(retry, unit),
        };
        match self.deadline {
            Some(deadline) if elapsed + delay >= deadline => None,
            _ => Some(delay),
        }
    }

    /// The timeout of the next attempt: the per-request timeout, cut to what is left of the
    /// deadline. `None` when the deadline has passed.
    pub fn attempt_timeout(
        &self,
        request_timeout: Duration,
        elapsed: Duration,
    ) -> Option<Duration> {
        match self.deadline {
            None => Some(request_timeout),
            Some(deadline) => deadline
                .checked_sub(elapsed)
                .filter(|left| !left.is_zero())
                .map(|left| left.min(request_timeout)),
        }
    }
}

/// The longest wait [`retry_after`] reports. The service counts requests in 30-second windows,
/// so an honest answer asks for about that; an hour is plenty, and the bound keeps whatever an
/// endpoint sends (`99999999999`, a date in the year 9999) from parking work for years or
/// overflowing the arithmetic of whoever schedules the retry.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// The wait a throttled response asks for: `retry-after-ms` or `x-ms-retry-after-ms`
/// (milliseconds, which Azure services send alongside, and azure-core prefers), else
/// `Retry-After` as seconds or an HTTP date. At most [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap, now: jiff::Timestamp) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let millis = ["retry-after-ms", "x-ms-retry-after-ms"]
        .into_iter()
        .find_map(|name| whole_number(text(name)?));
    let after = match millis {
        Some(millis) => Duration::from_millis(millis),
        None => {
            let value = text("retry-after")?;
            match whole_number(value) {
                Some(seconds) => Duration::from_secs(seconds),
                None => {
                    let at = crate::signing::parse_http_date(value)?;
                    // A date in the past asks for no wait at all.
                    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
                }
            }
        }
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// A run of ASCII digits (HTTP's `delay-seconds`), saturating at `u64::MAX` instead of failing:
/// a number too large for `u64` still asks for a long wait, which the caller then bounds.
/// `str::parse` would both reject it and accept a leading `+`, which HTTP does not allow.
fn whole_number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(text.bytes().fold(0u64, |number, digit| {
        number
            .saturating_mul(10)
            .saturating_add(u64::from(digit - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ServiceError;
    use reqwest::header::HeaderValue;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 5,
            base_delay: S,
            max_delay: 10 * S,
            max_retry_after: 30 * S,
            deadline: None,
        }
    }

    fn service(status: u16) -> ServiceError {
        ServiceError {
            status,
            code: "Code".into(),
            message: "message".into(),
        }
    }

    fn throttled(after: Option<Duration>) -> Error {
        Error::Throttled {
            error: service(429),
            retry_after: after,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let cases = [
            // (retry, unit, expected)
            (0, 0.999_999, S.mul_f64(0.999_999)),
            (1, 0.5, S),
            (2, 0.5, 2 * S),
            (3, 1.0, 8 * S),
            (4, 1.0, 10 * S),  // 16 s capped
            (40, 1.0, 10 * S), // no overflow
            (3, 0.0, Duration::ZERO),
            (3, 2.0, 8 * S), // out-of-range samples are clamped
        ];
        for (retry, unit, expected) in cases {
            assert_eq!(
                policy().backoff(retry, unit),
                expected,
                "retry {retry} unit {unit}"
            );
        }
    }

    #[test]
    fn which_errors_are_retried_and_how_long_after() {
        let p = policy();
        let zero = Duration::ZERO;
        let cases = [
            (
                "503 backs off",
                Error::Unavailable(service(503)),
                1,
                Some(S),
            ),
            (
                "timeout backs off",
                Error::Timeout { after: S },
                0,
                Some(S / 2),
            ),
            (
                "429 waits Retry-After",
                throttled(Some(7 * S)),
                0,
                Some(7 * S),
            ),
            (
                "429 without Retry-After backs off",
                throttled(None),
                0,
                Some(S / 2),
            ),
            (
                "too long a Retry-After goes to the caller",
                throttled(Some(31 * S)),
                0,
                None,
            ),
            ("401 never", Error::Unauthorized(service(401)), 0, None),
            ("400 never", Error::BadRequest(service(400)), 0, None),
            ("404 never", Error::NotFound(service(404)), 0, None),
            (
                "attempts are bounded",
                Error::Unavailable(service(500)),
                5,
                None,
            ),
        ];
        for (name, error, retry, expected) in cases {
            assert_eq!(p.delay_for(&error, retry, zero, 0.5), expected, "{name}");
        }
        assert_eq!(
            RetryPolicy::NEVER.delay_for(&throttled(Some(S)), 0, zero, 0.5),
            None
        );
    }

    #[test]
    fn the_deadline_stops_retries_and_cuts_attempts() {
        let p = RetryPolicy {
            deadline: Some(10 * S),
            ..policy()
        };
        let error = throttled(Some(3 * S));
        assert_eq!(p.delay_for(&error, 0, 6 * S, 0.5), Some(3 * S));
        assert_eq!(p.delay_for(&error, 0, 7 * S, 0.5), None);
        assert_eq!(p.attempt_timeout(5 * S, 2 * S), Some(5 * S));
        assert_eq!(p.attempt_timeout(5 * S, 8 * S), Some(2 * S));
        assert_eq!(p.attempt_timeout(5 * S, 10 * S), None);
        assert_eq!(policy().attempt_timeout(5 * S, 1000 * S), Some(5 * S));
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_milliseconds() {
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_static(value));
            }
            map
        };
        type Headers<'a> = &'a [(&'static str, &'static str)];
        let cases: [(Headers, Option<Duration>); 9] = [
            (&[("retry-after", "5")], Some(5 * S)),
            (&[("retry-after", " 0 ")], Some(Duration::ZERO)),
            (
                &[("retry-after", "Mon, 23 Nov 2026 10:00:12 GMT")],
                Some(12 * S),
            ),
            (
                &[("retry-after", "Mon, 23 Nov 2026 09:59:00 GMT")],
                Some(Duration::ZERO),
            ),
            (
                &[("retry-after", "5"), ("x-ms-retry-after-ms", "250")],
                Some(Duration::from_millis(250)),
            ),
            (
                &[("retry-after-ms", "1500")],
                Some(Duration::from_millis(1500)),
            ),
            (&[("retry-after", "-3")], None),
            (&[("retry-after", "+3")], None),
            (&[], None),
        ];
        for (pairs, expected) in cases {
            assert_eq!(retry_after(&headers(pairs), now), expected, "{pairs:?}");
        }
    }

    #[test]
    fn retry_after_never_exceeds_an_hour() {
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let cases = [
            ("retry-after", "99999999999"),
            ("retry-after", "18446744073709551616"),
            ("retry-after", "999999999999999999999999999999999999999999"),
            ("retry-after", "3601"),
            ("retry-after", "Thu, 30 Dec 9999 12:00:00 GMT"),
            ("retry-after-ms", "18446744073709551615"),
            ("retry-after-ms", "99999999999999999999999999999"),
            ("x-ms-retry-after-ms", "3600001"),
        ];
        for (name, value) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            assert_eq!(
                retry_after(&headers, now),
                Some(MAX_RETRY_AFTER),
                "{name}: {value}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("3600"));
        assert_eq!(retry_after(&headers, now), Some(MAX_RETRY_AFTER));
        headers.insert("retry-after", HeaderValue::from_static("3599"));
        assert_eq!(retry_after(&headers, now), Some(MAX_RETRY_AFTER - S));
    }
}
