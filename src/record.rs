//! What a pass writes back once it acted: the status after an issue, a failure or a settle,
//! and the Events that tell each outcome. Pure: the reconciler applies what these return.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;

use crate::crd::{
    CommunicationIdentity, CommunicationIdentityStatus, DeletionPolicy, RolloutRestartStatus,
    TokenStatus, reason,
};
use crate::decide::IssueReason;
use crate::held::{HeldToken, Issuance};
use crate::refresh::{FailureKind, RefreshPlan, later, refresh_at, retry_delay};
use crate::restart::after_tokens_changed;
use crate::status::{Failure, Outcome, ready_condition, with_condition};
use crate::tokens::{TokenEntry, token_state, token_states, with_token_states};

/// An Event to publish about the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub text: String,
}

impl Note {
    pub fn normal(reason: &'static str, text: String) -> Self {
        Self {
            type_: EventType::Normal,
            reason,
            text,
        }
    }

    pub fn warning(reason: &'static str, text: String) -> Self {
        Self {
            type_: EventType::Warning,
            reason,
            text,
        }
    }
}

/// What a failure interrupted: the status it leaves differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedDuring {
    /// Creating or refreshing. `tokens_revoked`: every token of the identity was revoked just
    /// before, so the one in the Secret no longer works. `secret_holds_token`: the Secret still
    /// holds the token status describes (it was not deleted or emptied meanwhile).
    Apply {
        tokens_revoked: bool,
        secret_holds_token: bool,
    },
    Cleanup(DeletionPolicy),
}

/// The Ready condition for `outcome`, in place in `previous`'s conditions.
fn conditions(
    previous: &CommunicationIdentityStatus,
    resource: &CommunicationIdentity,
    outcome: Outcome<'_>,
    now: Timestamp,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let generation = resource.metadata.generation;
    let ready = ready_condition(outcome, generation, now, &previous.conditions);
    with_condition(&previous.conditions, ready)
}

/// The conditions once the Secret holds tokens for the current spec, the first expiring at
/// `expires_on`.
fn token_current(
    previous: &CommunicationIdentityStatus,
    resource: &CommunicationIdentity,
    expires_on: Timestamp,
    now: Timestamp,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let secret_name = resource.secret_name();
    let outcome = Outcome::TokenCurrent {
        secret_name: &secret_name,
        expires_on,
    };
    conditions(previous, resource, outcome, now)
}

fn uid(resource: &CommunicationIdentity) -> &str {
    resource.metadata.uid.as_deref().unwrap_or_default()
}

/// The refresh of a token of `entry` issued at `issued_at` that expires at `expires_on`.
fn plan_refresh(
    resource: &CommunicationIdentity,
    entry: &TokenEntry<'_>,
    issued_at: Timestamp,
    expires_on: Timestamp,
) -> RefreshPlan {
    refresh_at(
        issued_at,
        expires_on,
        entry.token_lifetime().unwrap_or_default(),
        entry.refresh_before().unwrap_or_default(),
        uid(resource),
    )
}

/// The status once `held` (the tokens a pass issued, in spec order) is in the Secret, with
/// the other tokens as they were; and the refresh each new token plans, by entry name.
pub fn after_issue(
    previous: &CommunicationIdentityStatus,
    resource: &CommunicationIdentity,
    held: &[HeldToken],
    now: Timestamp,
) -> (CommunicationIdentityStatus, Vec<(String, RefreshPlan)>) {
    let spec = &resource.spec;
    let before = token_states(previous);
    let mut plans = Vec::new();
    let states = spec
        .entries()
        .iter()
        .filter_map(|entry| {
            let Some(token) = held.iter().find(|t| t.name == entry.name) else {
                return token_state(&before, entry.name).cloned();
            };
            let expires_on = token.issued.expires_on;
            let plan = plan_refresh(resource, entry, token.issued_at, expires_on);
            plans.push((entry.name.to_owned(), plan));
            Some(TokenStatus {
                name: entry.name.to_owned(),
                scopes: entry.scopes.to_vec(),
                token_lifetime_minutes: entry.token_lifetime_minutes().ok(),
                expires_on: Some(Time(expires_on)),
                last_refresh_time: Some(Time(token.issued_at)),
                next_refresh_time: Some(Time(plan.at)),
            })
        })
        .collect();
    let revoke_handled = held.iter().any(|token| {
        matches!(
            token.issuance,
            Issuance::Created | Issuance::Issued { revoked: true, .. }
        )
    });
    let answered = |pending: Option<&str>, handled: &Option<String>| {
        pending.map(str::to_owned).or_else(|| handled.clone())
    };
    let identity_id = held
        .first()
        .map(|token| token.issued.identity_id.clone())
        .or_else(|| previous.identity_id.clone());
    // New tokens over old ones owe the restart targets a restart; a first token does not.
    let revoked = held
        .iter()
        .any(|token| matches!(token.issuance, Issuance::Issued { revoked: true, .. }));
    let rollout_restart = match spec.rollout_restart_targets.is_empty() || before.is_empty() {
        true => previous.rollout_restart.clone(),
        false => Some(after_tokens_changed(
            previous.rollout_restart.as_ref(),
            revoked,
            now,
        )),
    };
    let status = with_token_states(
        CommunicationIdentityStatus {
            identity_id,
            secret_name: Some(resource.secret_name()),
            failed_attempts: 0,
            last_failure_time: None,
            handled_refresh_request: answered(
                resource.pending_refresh_request(),
                &previous.handled_refresh_request,
            ),
            handled_revoke_request: match revoke_handled {
                true => answered(
                    resource.pending_revoke_request(),
                    &previous.handled_revoke_request,
                ),
                false => previous.handled_revoke_request.clone(),
            },
            observed_generation: resource.metadata.generation,
            rollout_restart,
            ..previous.clone()
        },
        spec,
        states,
    );
    let expires_on = status.token_expires_on.as_ref().map_or(now, |t| t.0);
    let status = CommunicationIdentityStatus {
        conditions: token_current(previous, resource, expires_on, now),
        ..status
    };
    (status, plans)
}

/// The Events telling that `held` was issued: one per issue, a creation included (Events are
/// API writes too), and a Warning for a token that lives shorter than asked. `adopted`: the
/// identity came from spec.identityId and this is its first token here.
pub fn issue_notes(
    resource: &CommunicationIdentity,
    held: &HeldToken,
    adopted: bool,
    plan: &RefreshPlan,
) -> Vec<Note> {
    let entries = resource.spec.entries();
    let Some(entry) = entries.iter().find(|e| e.name == held.name) else {
        return Vec::new();
    };
    let issued = &held.issued;
    let token = format!("access token{}", entry.label());
    let (event_reason, verb) = match held.issuance {
        Issuance::Created => (
            reason::IDENTITY_CREATED,
            format!(
                "Created ACS identity {} and issued its first {token}",
                issued.identity_id
            ),
        ),
        Issuance::Issued { .. } if adopted => (
            reason::IDENTITY_ADOPTED,
            format!(
                "Adopted ACS identity {} and issued an {token}",
                issued.identity_id
            ),
        ),
        Issuance::Issued {
            reason: IssueReason::Refresh | IssueReason::RefreshRequested,
            ..
        } => (reason::TOKEN_REFRESHED, format!("Refreshed the {token}")),
        Issuance::Issued { .. } => (reason::TOKEN_ISSUED, format!("Issued an {token}")),
    };
    let mut notes = vec![Note::normal(
        event_reason,
        format!(
            "{verb} with scopes {} that expires at {} into Secret {:?}",
            entry.scopes_joined(),
            issued.expires_on,
            resource.secret_name()
        ),
    )];
    if plan.shortened {
        notes.push(Note::warning(
            reason::SHORT_TOKEN_LIFETIME,
            format!(
                "ACS issued a{} token that expires at {}, sooner than the requested {}; refreshing at two thirds of its actual lifetime ({})",
                entry.label(),
                issued.expires_on,
                entry.token_lifetime,
                plan.at
            ),
        ));
    }
    notes
}

/// The Event for a Secret written back without an ACS call: restored after an edit, or with
/// the `stale_keys` of tokens the spec no longer asks for taken out.
pub fn rewrite_note(secret_name: &str, stale_keys: &[String]) -> Note {
    if stale_keys.is_empty() {
        return Note::normal(
            reason::SECRET_RESTORED,
            format!(
                "Restored Secret {secret_name:?}, which was edited; the token in it is unchanged"
            ),
        );
    }
    Note::normal(
        reason::TOKENS_REMOVED,
        format!(
            "Took the keys {} of tokens the spec no longer asks for out of Secret \
             {secret_name:?}; the other tokens are unchanged",
            stale_keys.join(", ")
        ),
    )
}

/// `notes` with those of one type and reason merged into one, texts joined in order: the
/// Event recorder folds Events of one reason into a series that keeps only the last text, so
/// the tokens of one pass are told in one Event each reason.
pub fn merged(notes: Vec<Note>) -> Vec<Note> {
    let mut merged: Vec<Note> = Vec::with_capacity(notes.len());
    for note in notes {
        match merged
            .iter_mut()
            .find(|m| m.type_ == note.type_ && m.reason == note.reason)
        {
            Some(same) => {
                same.text.push_str("; ");
                same.text.push_str(&note.text);
            }
            None => merged.push(note),
        }
    }
    merged
}

/// The status after `failure`, and how long to wait before the retry: the backoff lives in
/// status (so it survives a restart). During cleanup, the condition says what deletion waits
/// for.
pub fn after_failure(
    previous: &CommunicationIdentityStatus,
    resource: &CommunicationIdentity,
    failure: &Failure,
    during: FailedDuring,
    now: Timestamp,
) -> (CommunicationIdentityStatus, Duration) {
    let queued = failure.kind() == FailureKind::Queued;
    let mut status = match queued {
        // Waiting is no failure: the count and the time of the last one stay.
        true => previous.clone(),
        false => CommunicationIdentityStatus {
            failed_attempts: previous.failed_attempts.saturating_add(1),
            last_failure_time: Some(Time(now)),
            ..previous.clone()
        },
    };
    let attempts = status.failed_attempts;
    let (outcome, expires_on) = match during {
        FailedDuring::Apply {
            tokens_revoked,
            secret_holds_token,
        } => {
            if tokens_revoked {
                // The revoke went through: it is handled, and every token in the Secret is dead.
                status.handled_revoke_request = resource
                    .pending_revoke_request()
                    .map(str::to_owned)
                    .or(status.handled_revoke_request);
                let dead = token_states(&status)
                    .into_iter()
                    .map(|state| TokenStatus {
                        expires_on: None,
                        ..state
                    })
                    .collect();
                status = with_token_states(status, &resource.spec, dead);
                // The workloads hold dead tokens: the restart the reissue owes them comes at once.
                if !resource.spec.rollout_restart_targets.is_empty() {
                    status.rollout_restart = Some(RolloutRestartStatus {
                        pending_revoke: true,
                        ..status.rollout_restart.unwrap_or_default()
                    });
                }
            }
            let expires_on = status.token_expires_on.as_ref().map(|t| t.0);
            let still_valid = expires_on.filter(|_| {
                secret_holds_token
                    && status.token_matches(&resource.spec)
                    && !matches!(failure, Failure::SecretConflict { .. })
            });
            let outcome = Outcome::Failed {
                failure,
                token_valid_until: still_valid,
            };
            (outcome, expires_on)
        }
        FailedDuring::Cleanup(policy) => {
            let outcome = Outcome::Deleting {
                policy,
                blocked_by: Some(failure),
            };
            (outcome, None)
        }
    };
    let delay = retry_delay(attempts, failure.kind(), now, expires_on, uid(resource));
    if let FailedDuring::Apply { .. } = during {
        // A resource in the queue tries again when its turn calls it back: a backoff still
        // running from an earlier failure ends, or that pass would find nothing to do.
        let next_attempt = if queued { now } else { later(now, delay) };
        if !queued || status.failed_attempts > 0 {
            status.next_refresh_time = Some(Time(next_attempt));
        }
        status.observed_generation = resource.metadata.generation;
    }
    status.conditions = conditions(previous, resource, outcome, now);
    (status, delay)
}

/// The status when nothing is to be done in ACS: up to date with the spec (a new
/// refreshBefore moves the refresh time, a token no longer asked for goes), the backoff of a
/// failure left as it is while it runs. A backoff that ran out with nothing due (a failure no
/// token waits on any more) ends here.
pub fn settled(
    previous: &CommunicationIdentityStatus,
    resource: &CommunicationIdentity,
    now: Timestamp,
) -> CommunicationIdentityStatus {
    let mut status = previous.clone();
    let backoff_over = previous
        .next_refresh_time
        .as_ref()
        .is_none_or(|at| at.0 <= now);
    let states = token_states(previous);
    if (status.failed_attempts == 0 || backoff_over) && !states.is_empty() {
        let spec = &resource.spec;
        let replanned: Vec<TokenStatus> = spec
            .entries()
            .iter()
            .filter_map(|entry| {
                let mut state = token_state(&states, entry.name)?.clone();
                if let (Some(issued), Some(expires_on)) = (
                    state.last_refresh_time.as_ref().map(|t| t.0),
                    state.expires_on.as_ref().map(|t| t.0),
                ) {
                    let plan = plan_refresh(resource, entry, issued, expires_on);
                    state.next_refresh_time = Some(Time(plan.at));
                }
                Some(state)
            })
            .collect();
        status = with_token_states(status, spec, replanned);
        if let Some(expires_on) = status.token_expires_on.as_ref().map(|t| t.0) {
            status.failed_attempts = 0;
            status.last_failure_time = None;
            status.conditions = token_current(previous, resource, expires_on, now);
            status.secret_name = Some(resource.secret_name());
        }
    }
    status.observed_generation = resource.metadata.generation;
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{READY_CONDITION, REVOKE_REQUESTED_ANNOTATION};
    use crate::held::Issued;
    use jiff::SignedDuration;
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-11-24T10:00:00Z".parse().unwrap()
    }

    fn hours(n: i64) -> SignedDuration {
        SignedDuration::from_hours(n)
    }

    fn resource(status: serde_json::Value) -> CommunicationIdentity {
        serde_json::from_value(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": { "name": "alice", "namespace": "team", "uid": "u-1", "generation": 2 },
            "spec": { "connectionSecretRef": { "name": "acs" }, "scopes": ["chat"], "tokenLifetime": "24h" },
            "status": status,
        }))
        .unwrap()
    }

    fn holding() -> CommunicationIdentityStatus {
        serde_json::from_value(json!({
            "identityId": "8:acs:r_1",
            "tokenExpiresOn": "2026-11-24T20:00:00Z",
            "lastRefreshTime": "2026-11-23T20:00:00Z",
            "nextRefreshTime": "2026-11-24T19:30:00Z",
            "tokenScopes": ["chat"],
            "tokenLifetimeMinutes": 1440,
            "observedGeneration": 2,
        }))
        .unwrap()
    }

    fn held(issuance: Issuance, lifetime_hours: i64) -> HeldToken {
        held_for(&resource(json!({})), issuance, lifetime_hours)
    }

    /// A token of `resource`'s first entry, issued now.
    fn held_for(
        resource: &CommunicationIdentity,
        issuance: Issuance,
        lifetime_hours: i64,
    ) -> HeldToken {
        let issued = Issued {
            identity_id: "8:acs:r_1".into(),
            token: "t".into(),
            expires_on: now() + hours(lifetime_hours),
            endpoint: "https://r.communication.azure.com".into(),
        };
        HeldToken::new(
            resource,
            &resource.spec.entries()[0],
            issued,
            now(),
            issuance,
        )
    }

    fn ready(status: &CommunicationIdentityStatus) -> (String, String) {
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == READY_CONDITION)
            .unwrap();
        (condition.status.clone(), condition.reason.clone())
    }

    #[test]
    fn after_an_issue_the_status_describes_the_new_token() {
        let previous = CommunicationIdentityStatus {
            failed_attempts: 3,
            ..holding()
        };
        let resource = resource(json!({}));
        let token = held(
            Issuance::Issued {
                reason: IssueReason::Refresh,
                revoked: false,
            },
            24,
        );
        let (status, plans) = after_issue(&previous, &resource, &[token], now());
        let plan = plans[0].1;
        assert_eq!(status.token_expires_on, Some(Time(now() + hours(24))));
        assert_eq!(status.last_refresh_time, Some(Time(now())));
        assert_eq!(status.next_refresh_time, Some(Time(plan.at)));
        assert_eq!(status.failed_attempts, 0, "a success ends the backoff");
        assert_eq!(ready(&status), ("True".into(), reason::TOKEN_ISSUED.into()));
        assert!(!plan.shortened);
    }

    #[test]
    fn an_issue_of_one_named_token_keeps_the_others() {
        let resource: CommunicationIdentity = serde_json::from_value(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": { "name": "alice", "namespace": "team", "uid": "u-1", "generation": 2 },
            "spec": {
                "connectionSecretRef": { "name": "acs" },
                "tokens": [
                    { "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" },
                    { "name": "chat", "scopes": ["chat"] },
                ],
            },
        }))
        .unwrap();
        let chat = TokenStatus {
            name: "chat".into(),
            scopes: vec![crate::crd::Scope::Chat],
            token_lifetime_minutes: Some(1440),
            expires_on: Some(Time(now() + hours(20))),
            last_refresh_time: Some(Time(now() - hours(4))),
            next_refresh_time: Some(Time(now() + hours(12))),
        };
        let previous = CommunicationIdentityStatus {
            identity_id: Some("8:acs:r_1".into()),
            tokens: vec![chat.clone()],
            ..Default::default()
        };
        let issuance = Issuance::Issued {
            reason: IssueReason::Initial,
            revoked: false,
        };
        let voip = held_for(&resource, issuance, 1);
        let (status, plans) = after_issue(&previous, &resource, std::slice::from_ref(&voip), now());
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].0, "voip");
        let names: Vec<&str> = status.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["voip", "chat"], "in spec order");
        assert_eq!(status.tokens[1], chat, "the other token is untouched");
        assert_eq!(status.tokens[0].token_lifetime_minutes, Some(60));
        assert_eq!(
            status.token_expires_on,
            Some(Time(now() + hours(1))),
            "the first expiry"
        );
        assert_eq!(status.next_refresh_time, status.tokens[0].next_refresh_time);
        assert_eq!(ready(&status), ("True".into(), reason::TOKEN_ISSUED.into()));

        let notes = issue_notes(&resource, &voip, false, &plans[0].1);
        assert!(
            notes[0]
                .text
                .starts_with("Issued an access token \"voip\" with scopes voip"),
            "{}",
            notes[0].text
        );

        let revoked = FailedDuring::Apply {
            tokens_revoked: true,
            secret_holds_token: true,
        };
        let failure = Failure::AcsUnavailable {
            detail: "503".into(),
        };
        let (failed, _) = after_failure(&status, &resource, &failure, revoked, now());
        assert!(
            failed.tokens.iter().all(|t| t.expires_on.is_none()),
            "a revoke kills every token"
        );
        assert_eq!(failed.token_expires_on, None);
        assert_eq!(
            ready(&failed),
            ("False".into(), reason::ACS_UNAVAILABLE.into())
        );
    }

    #[test]
    fn new_tokens_over_old_ones_owe_the_targets_a_restart() {
        let with_target = |status: serde_json::Value| {
            let mut resource = resource(status);
            resource.spec.rollout_restart_targets = serde_json::from_value(json!([
                { "kind": "Deployment", "name": "web" },
            ]))
            .unwrap();
            resource
        };
        let refresh = Issuance::Issued {
            reason: IssueReason::Refresh,
            revoked: false,
        };
        let revoke = Issuance::Issued {
            reason: IssueReason::RevokeRequested,
            revoked: true,
        };
        let cases = [
            (
                "a refresh",
                holding(),
                with_target(json!({})),
                refresh,
                Some(false),
            ),
            (
                "a revoke",
                holding(),
                with_target(json!({})),
                revoke,
                Some(true),
            ),
            (
                "the first token",
                CommunicationIdentityStatus::default(),
                with_target(json!({})),
                Issuance::Created,
                None,
            ),
            ("no targets", holding(), resource(json!({})), refresh, None),
            (
                "the reissue after a revoke whose first reissue failed",
                CommunicationIdentityStatus {
                    rollout_restart: Some(RolloutRestartStatus {
                        pending_revoke: true,
                        ..Default::default()
                    }),
                    ..holding()
                },
                with_target(json!({})),
                Issuance::Issued {
                    reason: IssueReason::Initial,
                    revoked: false,
                },
                Some(true),
            ),
        ];
        for (name, previous, resource, issuance, pending_revoke) in cases {
            let token = held_for(&resource, issuance, 24);
            let (status, _) = after_issue(&previous, &resource, &[token], now());
            let pending = status.rollout_restart.as_ref().map(|r| {
                assert_eq!(r.pending_since, Some(Time(now())), "{name}");
                r.pending_revoke
            });
            assert_eq!(pending, pending_revoke, "{name}");
        }
    }

    #[test]
    fn which_requests_an_issue_answers() {
        let mut resource = resource(json!({}));
        resource.metadata.annotations =
            Some([(REVOKE_REQUESTED_ANNOTATION.to_owned(), "leak-1".to_owned())].into());
        let cases = [
            (
                "a plain refresh leaves a pending revoke pending",
                false,
                None,
            ),
            ("an issue after a revoke answers it", true, Some("leak-1")),
        ];
        for (name, revoked, handled) in cases {
            let issuance = Issuance::Issued {
                reason: IssueReason::RevokeRequested,
                revoked,
            };
            let (status, _) = after_issue(&holding(), &resource, &[held(issuance, 24)], now());
            assert_eq!(status.handled_revoke_request.as_deref(), handled, "{name}");
        }
    }

    #[test]
    fn issue_events() {
        let resource = resource(json!({}));
        let plan = |shortened| RefreshPlan {
            at: now() + hours(16),
            shortened,
        };
        let issued = |reason| Issuance::Issued {
            reason,
            revoked: false,
        };
        let cases = [
            (
                "created",
                Issuance::Created,
                false,
                false,
                vec![reason::IDENTITY_CREATED],
            ),
            (
                "adopted",
                issued(IssueReason::Initial),
                true,
                false,
                vec![reason::IDENTITY_ADOPTED],
            ),
            (
                "refreshed",
                issued(IssueReason::Refresh),
                false,
                false,
                vec![reason::TOKEN_REFRESHED],
            ),
            (
                "refresh asked for",
                issued(IssueReason::RefreshRequested),
                false,
                false,
                vec![reason::TOKEN_REFRESHED],
            ),
            (
                "scopes changed",
                issued(IssueReason::SpecChanged),
                false,
                false,
                vec![reason::TOKEN_ISSUED],
            ),
            (
                "a short token",
                issued(IssueReason::Refresh),
                false,
                true,
                vec![reason::TOKEN_REFRESHED, reason::SHORT_TOKEN_LIFETIME],
            ),
        ];
        for (name, issuance, adopted, shortened, expected) in cases {
            let notes = issue_notes(&resource, &held(issuance, 24), adopted, &plan(shortened));
            let reasons: Vec<_> = notes.iter().map(|n| n.reason).collect();
            assert_eq!(reasons, expected, "{name}");
            assert!(
                notes[0].text.contains("into Secret \"alice-acs-token\""),
                "{name}"
            );
        }
    }

    #[test]
    fn a_rewrite_says_what_it_did() {
        let restored = rewrite_note("alice-acs-token", &[]);
        assert_eq!(restored.reason, reason::SECRET_RESTORED);
        let removed = rewrite_note(
            "alice-acs-token",
            &["chat.token".into(), "chat.scopes".into()],
        );
        assert_eq!(removed.reason, reason::TOKENS_REMOVED);
        assert!(
            removed.text.contains("chat.token, chat.scopes"),
            "{}",
            removed.text
        );
    }

    #[test]
    fn notes_of_one_reason_are_merged() {
        let notes = vec![
            Note::normal(reason::TOKEN_ISSUED, "voip".into()),
            Note::warning(reason::SHORT_TOKEN_LIFETIME, "short".into()),
            Note::normal(reason::TOKEN_ISSUED, "chat".into()),
            Note::normal(reason::TOKEN_REFRESHED, "video".into()),
        ];
        assert_eq!(
            merged(notes),
            [
                Note::normal(reason::TOKEN_ISSUED, "voip; chat".into()),
                Note::warning(reason::SHORT_TOKEN_LIFETIME, "short".into()),
                Note::normal(reason::TOKEN_REFRESHED, "video".into()),
            ]
        );
    }

    #[test]
    fn a_revoke_that_went_through_owes_the_targets_an_immediate_restart() {
        let mut resource = resource(json!({}));
        resource.spec.rollout_restart_targets =
            serde_json::from_value(json!([{ "kind": "DaemonSet", "name": "agent" }])).unwrap();
        let failure = Failure::AcsUnavailable {
            detail: "503".into(),
        };
        let cases = [(true, Some(true)), (false, None)];
        for (tokens_revoked, pending_revoke) in cases {
            let during = FailedDuring::Apply {
                tokens_revoked,
                secret_holds_token: true,
            };
            let (status, _) = after_failure(&holding(), &resource, &failure, during, now());
            let restart = status.rollout_restart.as_ref();
            assert_eq!(restart.map(|r| r.pending_revoke), pending_revoke);
            assert_eq!(
                restart.and_then(|r| r.pending_since.clone()),
                None,
                "no restart before the new tokens are in"
            );
        }
    }

    #[test]
    fn after_a_failure() {
        let unavailable = Failure::AcsUnavailable {
            detail: "503".into(),
        };
        let conflict = Failure::SecretConflict {
            secret_name: "alice-acs-token".into(),
        };
        let apply = FailedDuring::Apply {
            tokens_revoked: false,
            secret_holds_token: true,
        };
        let revoked = FailedDuring::Apply {
            tokens_revoked: true,
            secret_holds_token: true,
        };
        let secret_lost = FailedDuring::Apply {
            tokens_revoked: false,
            secret_holds_token: false,
        };
        let deleting = FailedDuring::Cleanup(DeletionPolicy::Delete);
        let cases = [
            (
                "ACS down, the token still valid",
                &unavailable,
                apply,
                "True",
                reason::ACS_UNAVAILABLE,
            ),
            (
                "a conflict hides no valid token",
                &conflict,
                apply,
                "False",
                reason::SECRET_CONFLICT,
            ),
            (
                "the reissue after a revoke failed",
                &unavailable,
                revoked,
                "False",
                reason::ACS_UNAVAILABLE,
            ),
            (
                "the Secret lost its token",
                &unavailable,
                secret_lost,
                "False",
                reason::ACS_UNAVAILABLE,
            ),
            (
                "cleanup blocked",
                &unavailable,
                deleting,
                "False",
                reason::DELETING,
            ),
        ];
        for (name, failure, during, ready_status, ready_reason) in cases {
            let (status, delay) =
                after_failure(&holding(), &resource(json!({})), failure, during, now());
            assert_eq!(
                ready(&status),
                (ready_status.into(), ready_reason.into()),
                "{name}"
            );
            assert_eq!(status.failed_attempts, 1, "{name}");
            assert_eq!(status.last_failure_time, Some(Time(now())), "{name}");
            assert!(delay >= Duration::from_secs(1), "{name}");
            match during {
                FailedDuring::Apply { .. } => {
                    assert_eq!(
                        status.next_refresh_time,
                        Some(Time(later(now(), delay))),
                        "{name}"
                    )
                }
                FailedDuring::Cleanup(_) => {
                    assert_eq!(
                        status.next_refresh_time,
                        holding().next_refresh_time,
                        "{name}"
                    )
                }
            }
            assert_eq!(
                status.token_expires_on.is_none(),
                during == revoked,
                "{name}"
            );
        }
    }

    #[test]
    fn a_huge_retry_after_cannot_overflow_the_next_attempt() {
        let failure = Failure::Throttled {
            retry_after: Some(Duration::MAX),
        };
        let apply = FailedDuring::Apply {
            tokens_revoked: false,
            secret_holds_token: true,
        };
        let (status, _) = after_failure(&holding(), &resource(json!({})), &failure, apply, now());
        assert!(status.next_refresh_time.is_some());
    }

    #[test]
    fn settling() {
        let resource = resource(json!({}));
        let cases = [
            (
                "a token in place: Ready and its refresh planned",
                holding(),
                true,
            ),
            (
                "backing off: left as it is",
                CommunicationIdentityStatus {
                    failed_attempts: 2,
                    ..holding()
                },
                false,
            ),
            (
                "no token yet",
                CommunicationIdentityStatus::default(),
                false,
            ),
        ];
        for (name, previous, planned) in cases {
            let status = settled(&previous, &resource, now());
            assert_eq!(status.observed_generation, Some(2), "{name}");
            assert_eq!(
                status.next_refresh_time != previous.next_refresh_time,
                planned,
                "{name}"
            );
            assert_eq!(
                status.conditions.iter().any(|c| c.status == "True"),
                planned,
                "{name}"
            );
        }
    }
}
