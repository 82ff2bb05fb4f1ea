//! How urgent the ACS calls of a pass are: their class and deadline in the endpoint's queue
//! (`acs::schedule`). Pure.

use jiff::{SignedDuration, Timestamp};

use acs::Class;

use crate::crd::CommunicationIdentityStatus;
use crate::decide::{Decision, IssueReason};
use crate::refresh::MIN_REMAINING;
use crate::tokens::{token_state, token_states};

/// The class and deadline of the calls `decision` makes, decided at `now`:
///
/// - a revoke the annotation asked for (a leaked token), and the reissue after it:
///   [`Class::LeakedRevoke`];
/// - a token within [`MIN_REMAINING`] of its expiry or past it: [`Class::Expiring`], by the
///   expiry minus that floor; a token lost from its Secret likewise, due now;
/// - a refresh: [`Class::Refresh`], by its planned time (an asked-for refresh: now);
/// - a new identity, a spec change, a cleanup: [`Class::New`], by `now`.
///
/// Several tokens issued in one pass take the most urgent place among them.
pub fn urgency(
    decision: &Decision,
    status: &CommunicationIdentityStatus,
    now: Timestamp,
) -> (Class, Timestamp) {
    let Decision::IssueTokens {
        tokens,
        revoke_first,
        ..
    } = decision
    else {
        return (Class::New, now);
    };
    if *revoke_first {
        return (Class::LeakedRevoke, now);
    }
    let states = token_states(status);
    let floor = SignedDuration::try_from(MIN_REMAINING).expect("ten minutes");
    tokens
        .iter()
        .map(|(name, reason)| {
            let state = token_state(&states, name);
            let expiring = state
                .and_then(|state| state.expires_on.as_ref())
                .map(|expires_on| expires_on.0.saturating_sub(floor).unwrap_or(Timestamp::MIN))
                .filter(|deadline| *deadline <= now);
            let planned = state
                .and_then(|state| state.next_refresh_time.as_ref())
                .map_or(now, |at| at.0);
            match (expiring, reason) {
                (Some(deadline), _) => (Class::Expiring, deadline),
                (None, IssueReason::SecretLost) => (Class::Expiring, now),
                (None, IssueReason::Refresh) => (Class::Refresh, planned.min(now)),
                (None, IssueReason::RefreshRequested) => (Class::Refresh, now),
                (None, IssueReason::RevokeRequested) => (Class::LeakedRevoke, now),
                (None, IssueReason::Initial | IssueReason::SpecChanged) => (Class::New, now),
            }
        })
        .min()
        .unwrap_or((Class::New, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::TokenStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const T0: i64 = 1_800_000_000;

    fn at(minute: i64) -> Timestamp {
        Timestamp::from_second(T0 + 60 * minute).unwrap()
    }

    /// A status of two named tokens: `a` expiring at minute `a_expires`, planned at
    /// `a_planned`; `b` expiring at minute 60, planned at minute 45.
    fn status(a_expires: i64, a_planned: i64) -> CommunicationIdentityStatus {
        let token = |name: &str, expires: i64, planned: i64| TokenStatus {
            name: name.into(),
            expires_on: Some(Time(at(expires))),
            next_refresh_time: Some(Time(at(planned))),
            ..TokenStatus::default()
        };
        CommunicationIdentityStatus {
            tokens: vec![token("a", a_expires, a_planned), token("b", 60, 45)],
            ..CommunicationIdentityStatus::default()
        }
    }

    fn issue(tokens: &[(&str, IssueReason)], revoke_first: bool) -> Decision {
        Decision::IssueTokens {
            identity_id: "8:acs:x".into(),
            tokens: tokens.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
            revoke_first,
        }
    }

    #[test]
    fn each_decision_takes_its_place() {
        use IssueReason::*;
        let now = at(0);
        let cases = [
            (
                "a new identity",
                Decision::CreateIdentity,
                status(60, 45),
                (Class::New, now),
            ),
            (
                "a spec change",
                issue(&[("a", SpecChanged)], false),
                status(60, 45),
                (Class::New, now),
            ),
            (
                "a due refresh, by its planned time",
                issue(&[("a", Refresh)], false),
                status(30, -3),
                (Class::Refresh, at(-3)),
            ),
            (
                "an asked-for refresh, due now",
                issue(&[("a", RefreshRequested)], false),
                status(60, 45),
                (Class::Refresh, now),
            ),
            (
                "a token inside the floor: expiry minus the floor",
                issue(&[("a", Refresh)], false),
                status(8, -3),
                (Class::Expiring, at(-2)),
            ),
            (
                "an expired token, spec changed or not",
                issue(&[("a", SpecChanged)], false),
                status(-5, -20),
                (Class::Expiring, at(-15)),
            ),
            (
                "a token lost from its Secret",
                issue(&[("a", SecretLost)], false),
                status(60, 45),
                (Class::Expiring, now),
            ),
            (
                "a revoke asked for: leaked",
                issue(&[("a", RevokeRequested), ("b", RevokeRequested)], true),
                status(-5, -20),
                (Class::LeakedRevoke, now),
            ),
            (
                "several tokens: the most urgent",
                issue(&[("b", Initial), ("a", Refresh)], false),
                status(30, -1),
                (Class::Refresh, at(-1)),
            ),
            (
                "a cleanup",
                Decision::WaitUntil(now),
                status(60, 45),
                (Class::New, now),
            ),
        ];
        for (name, decision, status, expected) in cases {
            assert_eq!(urgency(&decision, &status, now), expected, "{name}");
        }
    }
}
