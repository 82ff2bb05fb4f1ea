//! Service limits: per operation, at most N admissions in any sliding 30-second window.
//!
//! The real limits are stated as "N requests per 30 s", and the tests check exactly that the
//! (N+1)th request inside any 30 s span is refused. A deque of admission times per operation
//! answers that exactly: drop the times older than the window, refuse when N remain, and the
//! oldest remaining time says precisely when a slot frees (the `Retry-After`). A token bucket
//! (e.g. `governor`'s GCRA) spreads admissions evenly and would refuse a legitimate burst of N,
//! and a fixed window admits up to 2N across a window edge. The memory cost is bounded by N
//! timestamps per operation (a few KiB at the documented numbers).

use std::collections::VecDeque;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::MAX_DURATION_SECONDS;

/// The largest limit accepted: every admission in a window is remembered (16 bytes each),
/// so this keeps the memory at most 16 MB per operation.
pub const MAX_LIMIT: u32 = 1_000_000;

/// The throttled operations of the API (reading an identity has no documented limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitedOperation {
    CreateIdentity,
    CreateIdentityWithToken,
    IssueAccessToken,
    DeleteIdentity,
    RevokeAccessTokens,
}

impl LimitedOperation {
    const ALL: [Self; 5] = [
        Self::CreateIdentity,
        Self::CreateIdentityWithToken,
        Self::IssueAccessToken,
        Self::DeleteIdentity,
        Self::RevokeAccessTokens,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The JSON (camelCase) name, as in `--limit issueAccessToken=5` and the admin config.
    pub fn name(self) -> &'static str {
        match self {
            Self::CreateIdentity => "createIdentity",
            Self::CreateIdentityWithToken => "createIdentityWithToken",
            Self::IssueAccessToken => "issueAccessToken",
            Self::DeleteIdentity => "deleteIdentity",
            Self::RevokeAccessTokens => "revokeAccessTokens",
        }
    }
}

/// The limit numbers; the defaults are the documented ACS limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    pub enabled: bool,
    pub window_seconds: u64,
    pub create_identity: u32,
    pub create_identity_with_token: u32,
    pub issue_access_token: u32,
    pub delete_identity: u32,
    pub revoke_access_tokens: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            enabled: true,
            window_seconds: 30,
            create_identity: 1000,
            create_identity_with_token: 1000,
            issue_access_token: 1000,
            delete_identity: 500,
            revoke_access_tokens: 500,
        }
    }
}

impl Limits {
    pub fn limit(&self, op: LimitedOperation) -> u32 {
        match op {
            LimitedOperation::CreateIdentity => self.create_identity,
            LimitedOperation::CreateIdentityWithToken => self.create_identity_with_token,
            LimitedOperation::IssueAccessToken => self.issue_access_token,
            LimitedOperation::DeleteIdentity => self.delete_identity,
            LimitedOperation::RevokeAccessTokens => self.revoke_access_tokens,
        }
    }

    /// Sets one limit by its JSON (camelCase) name, as `--limit issueAccessToken=5` gives it.
    pub fn set_by_name(&mut self, name: &str, value: u32) -> Result<(), String> {
        let slot = match name {
            "createIdentity" => &mut self.create_identity,
            "createIdentityWithToken" => &mut self.create_identity_with_token,
            "issueAccessToken" => &mut self.issue_access_token,
            "deleteIdentity" => &mut self.delete_identity,
            "revokeAccessTokens" => &mut self.revoke_access_tokens,
            _ => {
                return Err(format!(
                    "unknown limit `{name}` (expected createIdentity, createIdentityWithToken, issueAccessToken, deleteIdentity or revokeAccessTokens)"
                ));
            }
        };
        *slot = value;
        Ok(())
    }

    /// A window of 1 s to ten years and every limit from 1 to [`MAX_LIMIT`]: a limit of 0
    /// would refuse the operation forever, which no ACS limit does (`enabled: false` turns
    /// limits off).
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_DURATION_SECONDS).contains(&self.window_seconds) {
            return Err(format!(
                "limits.windowSeconds must be between 1 and {MAX_DURATION_SECONDS} (ten years)"
            ));
        }
        if let Some(op) = LimitedOperation::ALL
            .into_iter()
            .find(|&op| !(1..=MAX_LIMIT).contains(&self.limit(op)))
        {
            return Err(format!(
                "limits.{} must be between 1 and {MAX_LIMIT} (`\"enabled\": false` turns the limits off)",
                op.name()
            ));
        }
        Ok(())
    }
}

/// The admission times of each operation within the current window.
#[derive(Debug, Default)]
pub struct SlidingWindows {
    admitted: [VecDeque<Timestamp>; LimitedOperation::ALL.len()],
}

impl SlidingWindows {
    /// Admits one request at `now`, or says how long until a slot frees. Refused requests are
    /// not recorded: they did not consume the budget.
    pub fn try_admit(
        &mut self,
        op: LimitedOperation,
        now: Timestamp,
        limits: &Limits,
    ) -> Result<(), Duration> {
        if !limits.enabled {
            return Ok(());
        }
        // Saturating throughout: `Limits::validate` bounds the window, but this type is public.
        let window = SignedDuration::from_secs(
            i64::try_from(limits.window_seconds.max(1)).unwrap_or(i64::MAX),
        );
        let times = &mut self.admitted[op.index()];
        while times
            .front()
            .is_some_and(|&t| now.duration_since(t) >= window)
        {
            times.pop_front();
        }
        if times.len() < limits.limit(op) as usize {
            times.push_back(now);
            return Ok(());
        }
        // Only a zero limit (refused by `Limits::validate`, but this type is public) leaves
        // the window empty here: it admits nothing, so the wait is a whole window.
        let wait = times.front().map_or(window, |&oldest| {
            window.saturating_sub(now.duration_since(oldest))
        });
        Err(Duration::try_from(wait).unwrap_or(Duration::ZERO))
    }

    /// Forgets every admission (after the limits were changed at runtime).
    pub fn clear(&mut self) {
        self.admitted.iter_mut().for_each(VecDeque::clear);
    }
}

/// `Retry-After` in whole seconds, rounded up and at least 1, so a client that waits exactly
/// that long finds the slot free.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: f64) -> Timestamp {
        Timestamp::from_millisecond((seconds * 1000.0) as i64).unwrap()
    }

    #[test]
    fn the_1001st_issue_in_a_window_is_refused_until_the_oldest_leaves() {
        let limits = Limits::default();
        let mut windows = SlidingWindows::default();
        let op = LimitedOperation::IssueAccessToken;
        for i in 0..1000 {
            // Spread over 10 s: all inside one 30 s window.
            windows
                .try_admit(op, at(100.0 + i as f64 / 100.0), &limits)
                .unwrap();
        }
        let wait = windows.try_admit(op, at(110.0), &limits).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20));
        assert_eq!(retry_after_seconds(wait), 20);
        // Other operations keep their own budgets.
        windows
            .try_admit(
                LimitedOperation::CreateIdentityWithToken,
                at(110.0),
                &limits,
            )
            .unwrap();
        // Sliding, not fixed: at t=130 exactly the first admission (t=100) has left.
        windows.try_admit(op, at(130.0), &limits).unwrap();
        assert!(windows.try_admit(op, at(130.0), &limits).is_err());
    }

    #[test]
    fn refusals_do_not_consume_budget_and_disabled_limits_admit_everything() {
        let mut limits = Limits::default();
        limits.set_by_name("deleteIdentity", 1).unwrap();
        let mut windows = SlidingWindows::default();
        let op = LimitedOperation::DeleteIdentity;
        windows.try_admit(op, at(0.0), &limits).unwrap();
        for _ in 0..5 {
            assert!(windows.try_admit(op, at(29.5), &limits).is_err());
        }
        windows.try_admit(op, at(30.0), &limits).unwrap();
        limits.enabled = false;
        for _ in 0..10 {
            windows.try_admit(op, at(30.0), &limits).unwrap();
        }
    }

    #[test]
    fn a_zero_limit_refuses_a_full_window_without_panicking() {
        let mut limits = Limits::default();
        limits.set_by_name("issueAccessToken", 0).unwrap();
        let mut windows = SlidingWindows::default();
        let wait = windows
            .try_admit(LimitedOperation::IssueAccessToken, at(0.0), &limits)
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(30));
    }

    #[test]
    fn limits_and_the_window_must_be_at_least_1() {
        assert_eq!(Limits::default().validate(), Ok(()));
        for op in LimitedOperation::ALL {
            let mut limits = Limits::default();
            limits.set_by_name(op.name(), 0).unwrap();
            let err = limits.validate().unwrap_err();
            assert!(
                err.starts_with(&format!("limits.{} must be between 1 and", op.name())),
                "{err}"
            );
        }
        let zero_window = Limits {
            window_seconds: 0,
            ..Limits::default()
        };
        assert!(
            zero_window
                .validate()
                .unwrap_err()
                .contains("windowSeconds")
        );
    }

    #[test]
    fn limits_and_the_window_have_an_upper_bound() {
        let mut limits = Limits {
            window_seconds: MAX_DURATION_SECONDS,
            ..Limits::default()
        };
        limits.set_by_name("createIdentity", MAX_LIMIT).unwrap();
        assert_eq!(limits.validate(), Ok(()));
        limits.set_by_name("createIdentity", MAX_LIMIT + 1).unwrap();
        let err = limits.validate().unwrap_err();
        assert!(
            err.starts_with("limits.createIdentity must be between 1 and 1000000"),
            "{err}"
        );
        let long_window = Limits {
            window_seconds: MAX_DURATION_SECONDS + 1,
            ..Limits::default()
        };
        assert!(
            long_window
                .validate()
                .unwrap_err()
                .contains("windowSeconds")
        );
    }

    #[test]
    fn an_unvalidated_huge_window_with_a_clock_gone_backwards_does_not_panic() {
        let limits = Limits {
            window_seconds: i64::MAX as u64,
            issue_access_token: 1,
            ..Limits::default()
        };
        let mut windows = SlidingWindows::default();
        let op = LimitedOperation::IssueAccessToken;
        windows.try_admit(op, at(100.0), &limits).unwrap();
        assert!(windows.try_admit(op, at(0.0), &limits).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(29_001)), 30);
    }

    #[test]
    fn unknown_limit_names_are_reported() {
        let err = Limits::default().set_by_name("exchange", 3).unwrap_err();
        assert!(err.contains("unknown limit `exchange`"));
    }
}
