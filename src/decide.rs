//! What to do next for one CommunicationIdentity, decided from what was observed and `now`.
//! Pure: the reconciler gathers the inputs, acts on the decision and records the outcome.

use jiff::Timestamp;

use crate::crd::{
    CommunicationIdentitySpec, CommunicationIdentityStatus, DeletionPolicy, TokenStatus,
};
use crate::refresh::{MIN_REMAINING, can_keep_min_remaining};
use crate::tokens::{token_state, token_states};

/// The state of the resource's own Secret, as far as the tokens go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretState {
    /// No Secret, or one without a token status describes: a new token is needed.
    TokenMissing,
    /// Holds every token status describes, but something else (a key, a label, the owner, the
    /// keys of a token no longer asked for) was edited or is left over: rewriting it needs no
    /// ACS call.
    TokenIntactButEdited,
    /// Exactly as the operator wrote it.
    Current,
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub status: &'a CommunicationIdentityStatus,
    /// `spec.identityId`: an existing identity to adopt.
    pub adopt_identity_id: Option<&'a str>,
    /// Each token the spec asks for, in spec order.
    pub tokens: Vec<TokenSeen>,
    pub refresh_request: Option<&'a str>,
    pub revoke_request: Option<&'a str>,
    pub secret: SecretState,
    /// Set while the resource is being deleted (and still carries the operator's finalizer).
    pub deletion: Option<Deletion>,
}

/// One token the spec asks for, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSeen {
    /// The entry's name; empty for the token of spec.scopes.
    pub name: String,
    /// What status records of it; `None` before its first issue.
    pub state: Option<TokenStatus>,
    /// Whether that token was issued for the entry's current scopes and lifetime.
    pub matches_spec: bool,
    /// Whether the Secret still holds that token.
    pub in_secret: bool,
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
    /// Issue new tokens for `identity_id`, for the entries named in `tokens` (after revoking
    /// all its tokens when `revoke_first`); the other entries' tokens stay as they are.
    IssueTokens {
        identity_id: String,
        tokens: Vec<(String, IssueReason)>,
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
    let every = |reason| {
        let tokens = observed.tokens.iter();
        tokens.map(|t| (t.name.clone(), reason)).collect()
    };
    if revoke_requested {
        return Decision::IssueTokens {
            identity_id,
            tokens: every(IssueReason::RevokeRequested),
            revoke_first: true,
        };
    }
    if refresh_requested {
        return Decision::IssueTokens {
            identity_id,
            tokens: every(IssueReason::RefreshRequested),
            revoke_first: false,
        };
    }
    if let (true, Some(at)) = (backing_off, next_attempt) {
        // Restoring an edited Secret needs no ACS call, so a backoff does not delay it.
        if observed.secret == SecretState::TokenIntactButEdited {
            return Decision::RewriteSecret;
        }
        return Decision::WaitUntil(at);
    }
    let due: Vec<(String, IssueReason)> = observed
        .tokens
        .iter()
        .filter_map(|token| Some((token.name.clone(), token_due(token, now)?)))
        .collect();
    if !due.is_empty() {
        return Decision::IssueTokens {
            identity_id,
            tokens: due,
            revoke_first: false,
        };
    }
    if observed.secret == SecretState::TokenIntactButEdited {
        return Decision::RewriteSecret;
    }
    let next_refresh = observed
        .tokens
        .iter()
        .filter_map(|token| {
            token
                .state
                .as_ref()?
                .next_refresh_time
                .as_ref()
                .map(|t| t.0)
        })
        .min();
    Decision::WaitUntil(next_refresh.expect("token_due covers a missing refresh time"))
}

/// Each token `spec` asks for as observed: what `status` records of it, and whether the
/// Secret still holds it (`in_secret`, by entry name).
pub fn tokens_seen(
    spec: &CommunicationIdentitySpec,
    status: &CommunicationIdentityStatus,
    in_secret: impl Fn(&str) -> bool,
) -> Vec<TokenSeen> {
    let states = token_states(status);
    spec.entries()
        .iter()
        .map(|entry| {
            let state = token_state(&states, entry.name).cloned();
            TokenSeen {
                name: entry.name.to_owned(),
                matches_spec: state.as_ref().is_some_and(|s| entry.matches(s)),
                in_secret: in_secret(entry.name),
                state,
            }
        })
        .collect()
}

/// Why one token needs issuing now, if it does: never issued, issued for other scopes or
/// lifetime, lost from the Secret, or its refresh time come (or its expiry within
/// [`MIN_REMAINING`]).
fn token_due(token: &TokenSeen, now: Timestamp) -> Option<IssueReason> {
    let state = token.state.as_ref();
    let Some(expires_on) = state.and_then(|s| s.expires_on.as_ref()).map(|t| t.0) else {
        return Some(IssueReason::Initial);
    };
    if !token.matches_spec {
        return Some(IssueReason::SpecChanged);
    }
    if !token.in_secret {
        return Some(IssueReason::SecretLost);
    }
    let issued_at = state
        .and_then(|s| s.last_refresh_time.as_ref())
        .map(|t| t.0);
    let next_refresh = state
        .and_then(|s| s.next_refresh_time.as_ref())
        .map(|t| t.0);
    let floor_breached = expires_on.duration_since(now)
        < jiff::SignedDuration::try_from(MIN_REMAINING).unwrap()
        && issued_at.is_none_or(|issued| can_keep_min_remaining(issued, expires_on));
    let refresh_due = next_refresh.is_none_or(|at| at <= now) || floor_breached;
    refresh_due.then_some(IssueReason::Refresh)
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

    /// The resource's one token as `status` records it, issued for the current spec and in
    /// the Secret unless said otherwise.
    fn single(
        status: &CommunicationIdentityStatus,
        matches_spec: bool,
        in_secret: bool,
    ) -> Vec<TokenSeen> {
        vec![TokenSeen {
            name: String::new(),
            state: token_states(status).into_iter().next(),
            matches_spec,
            in_secret,
        }]
    }

    fn observed(status: &CommunicationIdentityStatus) -> Observed<'_> {
        Observed {
            generation: Some(2),
            status,
            adopt_identity_id: None,
            tokens: single(status, true, true),
            refresh_request: Some("r1"),
            revoke_request: Some("v1"),
            secret: SecretState::Current,
            deletion: None,
        }
    }

    fn issue(reason: IssueReason, revoke_first: bool) -> Decision {
        Decision::IssueTokens {
            identity_id: "8:acs:r_1".into(),
            tokens: vec![(String::new(), reason)],
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
                    tokens: single(&healthy, false, true),
                    generation: Some(3),
                    ..observed(&healthy)
                },
                issue(IssueReason::SpecChanged, false),
            ),
            (
                "a deleted Secret gets a new token",
                Observed {
                    secret: SecretState::TokenMissing,
                    tokens: single(&healthy, true, false),
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
                    tokens: single(&backing_off, false, true),
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
    fn each_named_token_is_decided_on_its_own() {
        let token = |name: &str, next: &str, matches_spec: bool, in_secret: bool| TokenSeen {
            name: name.into(),
            state: Some(TokenStatus {
                name: name.into(),
                expires_on: Some(Time(at("2026-11-24T20:00:00Z"))),
                last_refresh_time: Some(Time(at("2026-11-24T08:00:00Z"))),
                next_refresh_time: Some(Time(at(next))),
                ..Default::default()
            }),
            matches_spec,
            in_secret,
        };
        let fine = |name| token(name, "2026-11-24T16:00:00Z", true, true);
        let new = |name: &str| TokenSeen {
            name: name.into(),
            state: None,
            matches_spec: false,
            in_secret: false,
        };
        let healthy = healthy();
        let issue = |tokens: &[(&str, IssueReason)], revoke_first| Decision::IssueTokens {
            identity_id: "8:acs:r_1".into(),
            tokens: tokens.iter().map(|(n, r)| ((*n).to_owned(), *r)).collect(),
            revoke_first,
        };
        let cases: Vec<(&str, Vec<TokenSeen>, Observed<'_>, Decision)> = vec![
            (
                "both fine: wait for the first refresh",
                vec![
                    fine("voip"),
                    token("chat", "2026-11-24T12:00:00Z", true, true),
                ],
                observed(&healthy),
                Decision::WaitUntil(at("2026-11-24T12:00:00Z")),
            ),
            (
                "one due: only it is refreshed",
                vec![
                    fine("voip"),
                    token("chat", "2026-11-24T09:00:00Z", true, true),
                ],
                observed(&healthy),
                issue(&[("chat", IssueReason::Refresh)], false),
            ),
            (
                "an entry added: only it is issued",
                vec![fine("voip"), new("chat")],
                observed(&healthy),
                issue(&[("chat", IssueReason::Initial)], false),
            ),
            (
                "an entry's scopes changed: only it is reissued",
                vec![
                    token("voip", "2026-11-24T16:00:00Z", false, true),
                    fine("chat"),
                ],
                observed(&healthy),
                issue(&[("voip", IssueReason::SpecChanged)], false),
            ),
            (
                "one token's keys lost from the Secret",
                vec![
                    fine("voip"),
                    token("chat", "2026-11-24T16:00:00Z", true, false),
                ],
                Observed {
                    secret: SecretState::TokenMissing,
                    ..observed(&healthy)
                },
                issue(&[("chat", IssueReason::SecretLost)], false),
            ),
            (
                "several due at once: one pass for all",
                vec![
                    token("voip", "2026-11-24T09:00:00Z", true, true),
                    token("chat", "2026-11-24T09:30:00Z", true, true),
                ],
                observed(&healthy),
                issue(
                    &[
                        ("voip", IssueReason::Refresh),
                        ("chat", IssueReason::Refresh),
                    ],
                    false,
                ),
            ),
            (
                "a revoke reissues every token",
                vec![fine("voip"), fine("chat")],
                Observed {
                    revoke_request: Some("v2"),
                    ..observed(&healthy)
                },
                issue(
                    &[
                        ("voip", IssueReason::RevokeRequested),
                        ("chat", IssueReason::RevokeRequested),
                    ],
                    true,
                ),
            ),
            (
                "a refresh request refreshes every token",
                vec![fine("voip"), fine("chat")],
                Observed {
                    refresh_request: Some("r2"),
                    ..observed(&healthy)
                },
                issue(
                    &[
                        ("voip", IssueReason::RefreshRequested),
                        ("chat", IssueReason::RefreshRequested),
                    ],
                    false,
                ),
            ),
            (
                "an entry removed leaves a rewrite, no ACS call",
                vec![fine("voip")],
                Observed {
                    secret: SecretState::TokenIntactButEdited,
                    ..observed(&healthy)
                },
                Decision::RewriteSecret,
            ),
        ];
        for (name, tokens, observed, expected) in cases {
            let observed = Observed { tokens, ..observed };
            assert_eq!(decide(&observed, now()), expected, "{name}");
        }
    }

    #[test]
    fn tokens_are_seen_from_status_and_the_secret() {
        let spec: CommunicationIdentitySpec = serde_json::from_value(serde_json::json!({
            "connectionSecretRef": { "name": "acs" },
            "tokens": [
                { "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" },
                { "name": "chat", "scopes": ["chat"] },
            ],
        }))
        .unwrap();
        let voip = TokenStatus {
            name: "voip".into(),
            scopes: vec![crate::crd::Scope::Voip],
            token_lifetime_minutes: Some(60),
            expires_on: Some(Time(at("2026-11-24T11:00:00Z"))),
            ..Default::default()
        };
        let status = CommunicationIdentityStatus {
            tokens: vec![voip.clone()],
            ..Default::default()
        };
        let seen = tokens_seen(&spec, &status, |name| name == "voip");
        assert_eq!(
            seen,
            [
                TokenSeen {
                    name: "voip".into(),
                    state: Some(voip),
                    matches_spec: true,
                    in_secret: true,
                },
                TokenSeen {
                    name: "chat".into(),
                    state: None,
                    matches_spec: false,
                    in_secret: false,
                },
            ]
        );
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
