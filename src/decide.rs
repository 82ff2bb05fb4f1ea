//! What to do next for one CommunicationIdentity, decided from what was observed and `now`.
//! Pure: the reconciler gathers the inputs, acts on the decision and records the outcome.

use jiff::Timestamp;

use crate::crd::{CommunicationIdentityStatus, DeletionPolicy};
use crate::refresh::{MIN_REMAINING, can_keep_min_remaining};

/// The state of the resource's own Secret, as far as the token goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretState {
    /// No Secret, or one without the token status describes: a new token is needed.
    TokenMissing,
    /// Holds the token status describes, but something else (a key, a label, the owner) was
    /// edited away: rewriting it needs no ACS call.
    TokenIntactButEdited,
    /// Exactly as the operator wrote it.
    Current,
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub status: &'a CommunicationIdentityStatus,
    /// `spec.identityId`: an existing identity to adopt.
    pub adopt_identity_id: Option<&'a str>,
    /// Whether the token in the Secret was issued for the spec's current scopes and lifetime.
    pub token_matches_spec: bool,
    pub refresh_request: Option<&'a str>,
    pub revoke_request: Option<&'a str>,
    pub secret: SecretState,
    /// Set while the resource is being deleted (and still carries the operator's finalizer).
    pub deletion: Option<Deletion>,
}

/// What deletion was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deletion {
    /// The deletionPolicy in force (spec, or the default for how the identity came to be).
    pub policy: DeletionPolicy,
    /// The skip-cleanup annotation: release without touching ACS.
    pub skip_cleanup: bool,
    /// A create was sent to ACS at some point (the operator's annotation).
    pub create_attempted: bool,
}

/// What to do in ACS before a resource being deleted is released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing: asked to skip the cleanup (the credentials are gone for good).
    Skip,
    /// Nothing: no identity was ever created or adopted for it.
    NothingCreated,
    /// deletionPolicy Retain: the identity (if any is known) stays.
    Retain { identity_id: Option<String> },
    /// Delete the identity (which revokes its tokens) or only revoke its tokens.
    /// `identity_id: None`: a create was sent but its answer never recorded; repeating it (the
    /// same customId) tells the identity.
    InAcs {
        delete: bool,
        identity_id: Option<String>,
    },
}

/// Why a token is issued; each has its own event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueReason {
    /// The first token of an adopted identity, or after the previous one was lost.
    Initial,
    /// Scopes or lifetime changed.
    SpecChanged,
    /// The refresh time came.
    Refresh,
    /// The refresh annotation asked for it.
    RefreshRequested,
    /// The revoke annotation asked to revoke every token first.
    RevokeRequested,
    /// The Secret lost its token (deleted or edited).
    SecretLost,
}

/// The next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No identity yet: create one with its first token in the same call.
    CreateIdentity,
    /// Issue a new token for `identity_id` (after revoking all its tokens when `revoke_first`).
    IssueToken {
        identity_id: String,
        reason: IssueReason,
        revoke_first: bool,
    },
    /// The token in the Secret is fine; only the Secret itself needs restoring.
    RewriteSecret,
    /// Nothing to do before `until` (the refresh time, or the end of a failure backoff).
    WaitUntil(Timestamp),
    /// The resource is being deleted: clean up in ACS as this says, then release it.
    CleanUp(Cleanup),
}

/// Decides the next step. Order matters: explicit requests bypass a failure backoff, a spec
/// change restarts it, and nothing calls ACS while a backoff runs or before the refresh time.
pub fn decide(observed: &Observed<'_>, now: Timestamp) -> Decision {
    let status = observed.status;
    if let Some(deletion) = observed.deletion {
        return Decision::CleanUp(cleanup(deletion, status));
    }
    let revoke_requested = is_new_request(observed.revoke_request, &status.handled_revoke_request);
    let refresh_requested =
        is_new_request(observed.refresh_request, &status.handled_refresh_request);
    let spec_changed = observed.generation != status.observed_generation;
    let next_attempt = status.next_refresh_time.as_ref().map(|t| t.0);
    let backing_off = status.failed_attempts > 0
        && next_attempt.is_some_and(|at| at > now)
        && !spec_changed
        && !revoke_requested
        && !refresh_requested;

    let identity_id = status
        .identity_id
        .as_deref()
        .or(observed.adopt_identity_id)
        .map(str::to_owned);
    let Some(identity_id) = identity_id else {
        return match (backing_off, next_attempt) {
            (true, Some(at)) => Decision::WaitUntil(at),
            _ => Decision::CreateIdentity,
        };
    };
    let issue = |reason, revoke_first| Decision::IssueToken {
        identity_id: identity_id.clone(),
        reason,
        revoke_first,
    };
    if revoke_requested {
        return issue(IssueReason::RevokeRequested, true);
    }
    if refresh_requested {
        return issue(IssueReason::RefreshRequested, false);
    }
    if let (true, Some(at)) = (backing_off, next_attempt) {
        // Restoring an edited Secret needs no ACS call, so a backoff does not delay it.
        if observed.secret == SecretState::TokenIntactButEdited {
            return Decision::RewriteSecret;
        }
        return Decision::WaitUntil(at);
    }
    let expires_on = status.token_expires_on.as_ref().map(|t| t.0);
    let Some(expires_on) = expires_on else {
        return issue(IssueReason::Initial, false);
    };
    if !observed.token_matches_spec {
        return issue(IssueReason::SpecChanged, false);
    }
    if observed.secret == SecretState::TokenMissing {
        return issue(IssueReason::SecretLost, false);
    }
    let issued_at = status.last_refresh_time.as_ref().map(|t| t.0);
    let floor_breached = expires_on.duration_since(now)
        < jiff::SignedDuration::try_from(MIN_REMAINING).unwrap()
        && issued_at.is_none_or(|issued| can_keep_min_remaining(issued, expires_on));
    let refresh_due = next_attempt.is_none_or(|at| at <= now) || floor_breached;
    if refresh_due {
        return issue(IssueReason::Refresh, false);
    }
    if observed.secret == SecretState::TokenIntactButEdited {
        return Decision::RewriteSecret;
    }
    Decision::WaitUntil(next_attempt.expect("refresh_due covers a missing refresh time"))
}

/// The cleanup a deletion needs: per policy, for the identity status knows or the one a lost
/// create answer hides. An adopted identity is in status only once its first token was issued;
/// before that nothing of it was touched, so nothing is cleaned up.
fn cleanup(deletion: Deletion, status: &CommunicationIdentityStatus) -> Cleanup {
    let identity_id = status.identity_id.clone();
    if deletion.skip_cleanup {
        return Cleanup::Skip;
    }
    if deletion.policy == DeletionPolicy::Retain {
        return Cleanup::Retain { identity_id };
    }
    if identity_id.is_none() && !deletion.create_attempted {
        return Cleanup::NothingCreated;
    }
    Cleanup::InAcs {
        delete: deletion.policy == DeletionPolicy::Delete,
        identity_id,
    }
}

/// An annotation value not yet acted on. An absent annotation is never a request.
fn is_new_request(annotation: Option<&str>, handled: &Option<String>) -> bool {
    annotation.is_some_and(|value| handled.as_deref() != Some(value))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn now() -> Timestamp {
        at("2026-11-24T10:00:00Z")
    }

    /// A healthy resource: token until 20:00, refresh at 16:00, generation 2 observed.
    fn healthy() -> CommunicationIdentityStatus {
        CommunicationIdentityStatus {
            identity_id: Some("8:acs:r_1".into()),
            token_expires_on: Some(Time(at("2026-11-24T20:00:00Z"))),
            next_refresh_time: Some(Time(at("2026-11-24T16:00:00Z"))),
            observed_generation: Some(2),
            handled_refresh_request: Some("r1".into()),
            handled_revoke_request: Some("v1".into()),
            ..Default::default()
        }
    }

    fn observed(status: &CommunicationIdentityStatus) -> Observed<'_> {
        Observed {
            generation: Some(2),
            status,
            adopt_identity_id: None,
            token_matches_spec: true,
            refresh_request: Some("r1"),
            revoke_request: Some("v1"),
            secret: SecretState::Current,
            deletion: None,
        }
    }

    fn issue(reason: IssueReason, revoke_first: bool) -> Decision {
        Decision::IssueToken {
            identity_id: "8:acs:r_1".into(),
            reason,
            revoke_first,
        }
    }

    fn backing_off() -> CommunicationIdentityStatus {
        CommunicationIdentityStatus {
            failed_attempts: 3,
            next_refresh_time: Some(Time(at("2026-11-24T10:05:00Z"))),
            ..healthy()
        }
    }

    #[test]
    fn decisions() {
        let fresh = CommunicationIdentityStatus::default();
        let healthy = healthy();
        let backing_off = backing_off();
        let due = CommunicationIdentityStatus {
            next_refresh_time: Some(Time(at("2026-11-24T09:59:00Z"))),
            ..healthy.clone()
        };
        let nearly_expired = CommunicationIdentityStatus {
            token_expires_on: Some(Time(at("2026-11-24T10:09:00Z"))),
            ..healthy.clone()
        };
        let compressed_time = CommunicationIdentityStatus {
            last_refresh_time: Some(Time(at("2026-11-24T09:59:30Z"))),
            token_expires_on: Some(Time(at("2026-11-24T10:00:30Z"))),
            next_refresh_time: Some(Time(at("2026-11-24T10:00:10Z"))),
            ..healthy.clone()
        };
        let failed_create = CommunicationIdentityStatus {
            failed_attempts: 1,
            observed_generation: Some(2),
            next_refresh_time: Some(Time(at("2026-11-24T10:00:15Z"))),
            ..Default::default()
        };
        let adopted_fresh = Observed {
            adopt_identity_id: Some("8:acs:r_1"),
            generation: None,
            refresh_request: None,
            revoke_request: None,
            ..observed(&fresh)
        };
        let cases: Vec<(&str, Observed<'_>, Decision)> = vec![
            (
                "a new resource creates its identity",
                Observed {
                    generation: Some(1),
                    ..observed(&fresh)
                },
                Decision::CreateIdentity,
            ),
            (
                "an adopted identity gets its first token",
                adopted_fresh,
                issue(IssueReason::Initial, false),
            ),
            (
                "a healthy resource waits for its refresh time",
                observed(&healthy),
                Decision::WaitUntil(at("2026-11-24T16:00:00Z")),
            ),
            (
                "the refresh time has come",
                observed(&due),
                issue(IssueReason::Refresh, false),
            ),
            (
                "a token within 10 minutes of expiry is replaced whatever the plan says",
                observed(&nearly_expired),
                issue(IssueReason::Refresh, false),
            ),
            (
                "a token too short to keep 10 minutes waits for its plan (no refresh loop)",
                observed(&compressed_time),
                Decision::WaitUntil(at("2026-11-24T10:00:10Z")),
            ),
            (
                "a new refresh annotation issues at once",
                Observed {
                    refresh_request: Some("r2"),
                    ..observed(&healthy)
                },
                issue(IssueReason::RefreshRequested, false),
            ),
            (
                "a new revoke annotation revokes, then issues",
                Observed {
                    revoke_request: Some("v2"),
                    ..observed(&healthy)
                },
                issue(IssueReason::RevokeRequested, true),
            ),
            (
                "a request already handled is not acted on again",
                Observed {
                    refresh_request: Some("r1"),
                    ..observed(&healthy)
                },
                Decision::WaitUntil(at("2026-11-24T16:00:00Z")),
            ),
            (
                "changed scopes issue at once",
                Observed {
                    token_matches_spec: false,
                    generation: Some(3),
                    ..observed(&healthy)
                },
                issue(IssueReason::SpecChanged, false),
            ),
            (
                "a deleted Secret gets a new token",
                Observed {
                    secret: SecretState::TokenMissing,
                    ..observed(&healthy)
                },
                issue(IssueReason::SecretLost, false),
            ),
            (
                "an edited Secret with its token intact is rewritten without ACS",
                Observed {
                    secret: SecretState::TokenIntactButEdited,
                    ..observed(&healthy)
                },
                Decision::RewriteSecret,
            ),
            (
                "a backoff holds ACS calls back",
                observed(&backing_off),
                Decision::WaitUntil(at("2026-11-24T10:05:00Z")),
            ),
            (
                "a backoff does not hold back restoring an edited Secret",
                Observed {
                    secret: SecretState::TokenIntactButEdited,
                    ..observed(&backing_off)
                },
                Decision::RewriteSecret,
            ),
            (
                "a refresh request bypasses a backoff",
                Observed {
                    refresh_request: Some("r2"),
                    ..observed(&backing_off)
                },
                issue(IssueReason::RefreshRequested, false),
            ),
            (
                "a spec change restarts a backoff",
                Observed {
                    generation: Some(3),
                    token_matches_spec: false,
                    ..observed(&backing_off)
                },
                issue(IssueReason::SpecChanged, false),
            ),
            (
                "a failed create waits for its backoff",
                Observed {
                    refresh_request: None,
                    revoke_request: None,
                    ..observed(&failed_create)
                },
                Decision::WaitUntil(at("2026-11-24T10:00:15Z")),
            ),
        ];
        for (name, observed, expected) in cases {
            assert_eq!(decide(&observed, now()), expected, "{name}");
        }
    }

    #[test]
    fn deletions() {
        let no_identity = CommunicationIdentityStatus::default();
        let healthy = healthy();
        let known = Some("8:acs:r_1".to_owned());
        let deleting = |policy, skip_cleanup, create_attempted| Deletion {
            policy,
            skip_cleanup,
            create_attempted,
        };
        use DeletionPolicy::{Delete, Retain, RevokeTokens};
        let cases = [
            (
                "delete the identity",
                &healthy,
                deleting(Delete, false, true),
                Cleanup::InAcs {
                    delete: true,
                    identity_id: known.clone(),
                },
            ),
            (
                "revoke its tokens",
                &healthy,
                deleting(RevokeTokens, false, true),
                Cleanup::InAcs {
                    delete: false,
                    identity_id: known.clone(),
                },
            ),
            (
                "retain it",
                &healthy,
                deleting(Retain, false, true),
                Cleanup::Retain {
                    identity_id: known.clone(),
                },
            ),
            (
                "skip the cleanup",
                &healthy,
                deleting(Delete, true, true),
                Cleanup::Skip,
            ),
            (
                "skip wins over retain",
                &healthy,
                deleting(Retain, true, true),
                Cleanup::Skip,
            ),
            (
                "a lost create answer is recovered",
                &no_identity,
                deleting(Delete, false, true),
                Cleanup::InAcs {
                    delete: true,
                    identity_id: None,
                },
            ),
            (
                "a lost create, revoking",
                &no_identity,
                deleting(RevokeTokens, false, true),
                Cleanup::InAcs {
                    delete: false,
                    identity_id: None,
                },
            ),
            (
                "a lost create, retained",
                &no_identity,
                deleting(Retain, false, true),
                Cleanup::Retain { identity_id: None },
            ),
            (
                "nothing ever created",
                &no_identity,
                deleting(Delete, false, false),
                Cleanup::NothingCreated,
            ),
        ];
        for (name, status, deletion, expected) in cases {
            let observed = Observed {
                deletion: Some(deletion),
                // A pending revoke or a backoff never holds up a deletion.
                revoke_request: Some("new"),
                ..observed(status)
            };
            assert_eq!(
                decide(&observed, now()),
                Decision::CleanUp(expected),
                "{name}"
            );
        }
    }
}
