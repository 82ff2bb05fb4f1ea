//! Restarts of `spec.rolloutRestartTargets` when the tokens in the Secret change, for workloads
//! that read a token once (an environment variable) and would run on with an old one. Pure:
//! when a change is pending, when its restart is due, the patch that restarts a workload (the
//! one `kubectl rollout restart` makes) and what status and Events say afterwards.
//!
//! A restart is owed only for new tokens written over old ones: never for a pass that changed
//! nothing, an operator restart, or a Secret restored with the same tokens. The pending change
//! lives in status, so it survives an operator restart; changes before the restart is due fold
//! into it, so several give one restart.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

use crate::crd::{RestartFailure, RestartTarget, RolloutRestartStatus, reason};
use crate::record::Note;
use crate::refresh::later;

/// The pod-template annotation `kubectl rollout restart` sets; a new value rolls the pods.
pub const RESTARTED_AT_ANNOTATION: &str = "kubectl.kubernetes.io/restartedAt";

/// The restart state once new tokens replaced old ones in the Secret: a restart pending since
/// the first change not yet passed on, at once if any of them was a revoke.
pub fn after_tokens_changed(
    previous: Option<&RolloutRestartStatus>,
    revoked: bool,
    now: Timestamp,
) -> RolloutRestartStatus {
    let previous = previous.cloned().unwrap_or_default();
    RolloutRestartStatus {
        pending_since: previous.pending_since.clone().or(Some(Time(now))),
        pending_revoke: previous.pending_revoke || revoked,
        ..previous
    }
}

/// When the pending restart is due: at once after a revoke or a first restart, otherwise
/// `interval` after the last one. `None`: nothing pending.
pub fn restart_due(state: Option<&RolloutRestartStatus>, interval: Duration) -> Option<Timestamp> {
    let state = state?;
    let since = state.pending_since.as_ref()?.0;
    let last = state.last_restart_time.as_ref().map(|t| t.0);
    match (state.pending_revoke, last) {
        (false, Some(last)) => Some(later(last, interval).max(since)),
        _ => Some(since),
    }
}

/// What restarting one target came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartOutcome {
    Restarted,
    /// No such workload in the namespace.
    NotFound,
    /// The operator may not patch it (403): the chart grants that only with the feature on.
    Forbidden,
    /// The API server refused the patch otherwise; its words.
    Refused(String),
}

/// The strategic merge patch that restarts a workload, as `kubectl rollout restart` does:
/// the time in whole seconds (RFC 3339), as kubectl and status write it.
pub fn restart_patch(now: Timestamp) -> Value {
    let at = Timestamp::from_second(now.as_second()).unwrap_or(now);
    json!({
        "spec": { "template": { "metadata": { "annotations": {
            RESTARTED_AT_ANNOTATION: at.to_string(),
        } } } }
    })
}

/// The restart state after the targets were restarted at `now` with `outcomes`: nothing
/// pending any more (a target that could not be restarted is reported, not retried: a
/// workload created or fixed later starts with the current tokens).
pub fn after_restart(
    outcomes: &[(RestartTarget, RestartOutcome)],
    secret_name: &str,
    namespace: &str,
    now: Timestamp,
) -> RolloutRestartStatus {
    let failed_targets = outcomes
        .iter()
        .filter_map(|(target, outcome)| {
            let note = note(target, outcome, secret_name, namespace);
            (outcome != &RestartOutcome::Restarted).then(|| RestartFailure {
                kind: target.kind,
                name: target.name.clone(),
                reason: note.reason.to_owned(),
                message: note.text,
            })
        })
        .collect();
    RolloutRestartStatus {
        last_restart_time: Some(Time(now)),
        pending_since: None,
        pending_revoke: false,
        failed_targets,
    }
}

/// The Event telling what restarting `target` came to.
pub fn note(
    target: &RestartTarget,
    outcome: &RestartOutcome,
    secret_name: &str,
    namespace: &str,
) -> Note {
    let (kind, name) = (target.kind.as_str(), &target.name);
    match outcome {
        RestartOutcome::Restarted => Note::normal(
            reason::WORKLOAD_RESTARTED,
            format!("Restarted {kind} {name:?}: the tokens in Secret {secret_name:?} changed"),
        ),
        RestartOutcome::NotFound => Note::warning(
            reason::RESTART_TARGET_NOT_FOUND,
            format!(
                "{kind} {name:?} of spec.rolloutRestartTargets does not exist in namespace \
                 {namespace:?}; create it or remove it from the list (the tokens are delivered \
                 all the same)"
            ),
        ),
        RestartOutcome::Forbidden => Note::warning(
            reason::RESTART_FORBIDDEN,
            format!(
                "the operator may not patch {kind} {name:?} in namespace {namespace:?}: install \
                 the chart with rolloutRestart.enabled=true, which grants patch on Deployments, \
                 StatefulSets and DaemonSets (the tokens are delivered all the same)"
            ),
        ),
        RestartOutcome::Refused(detail) => Note::warning(
            reason::RESTART_FAILED,
            format!("the API server refused to restart {kind} {name:?}: {detail}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WorkloadKind;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn time(text: &str) -> Option<Time> {
        Some(Time(at(text)))
    }

    const FIVE_MINUTES: Duration = Duration::from_secs(300);

    #[test]
    fn when_a_restart_is_due() {
        let state = |last: Option<&str>, since: Option<&str>, revoke| RolloutRestartStatus {
            last_restart_time: last.and_then(time),
            pending_since: since.and_then(time),
            pending_revoke: revoke,
            ..Default::default()
        };
        let cases = [
            ("never restarted, nothing pending", None, None),
            (
                "restarted, nothing pending",
                Some(state(Some("2026-11-24T10:00:00Z"), None, false)),
                None,
            ),
            (
                "a first change: at once",
                Some(state(None, Some("2026-11-24T10:00:00Z"), false)),
                Some(at("2026-11-24T10:00:00Z")),
            ),
            (
                "a change within the interval: at its end",
                Some(state(
                    Some("2026-11-24T10:00:00Z"),
                    Some("2026-11-24T10:01:00Z"),
                    false,
                )),
                Some(at("2026-11-24T10:05:00Z")),
            ),
            (
                "a change long after the last restart: at once",
                Some(state(
                    Some("2026-11-24T09:00:00Z"),
                    Some("2026-11-24T10:01:00Z"),
                    false,
                )),
                Some(at("2026-11-24T10:01:00Z")),
            ),
            (
                "a revoke within the interval: at once",
                Some(state(
                    Some("2026-11-24T10:00:00Z"),
                    Some("2026-11-24T10:01:00Z"),
                    true,
                )),
                Some(at("2026-11-24T10:01:00Z")),
            ),
        ];
        for (name, state, expected) in cases {
            assert_eq!(
                restart_due(state.as_ref(), FIVE_MINUTES),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn changes_fold_into_the_pending_one() {
        let first = after_tokens_changed(None, false, at("2026-11-24T10:01:00Z"));
        assert_eq!(first.pending_since, time("2026-11-24T10:01:00Z"));
        let second = after_tokens_changed(Some(&first), false, at("2026-11-24T10:02:00Z"));
        assert_eq!(
            second.pending_since,
            time("2026-11-24T10:01:00Z"),
            "still the first change"
        );
        assert!(!second.pending_revoke);
        let revoke = after_tokens_changed(Some(&second), true, at("2026-11-24T10:03:00Z"));
        assert!(revoke.pending_revoke);
    }

    #[test]
    fn after_a_restart_nothing_is_pending_and_failures_are_reported() {
        let target = |kind, name: &str| RestartTarget {
            kind,
            name: name.into(),
        };
        let outcomes = [
            (
                target(WorkloadKind::Deployment, "web"),
                RestartOutcome::Restarted,
            ),
            (
                target(WorkloadKind::StatefulSet, "db"),
                RestartOutcome::NotFound,
            ),
            (
                target(WorkloadKind::DaemonSet, "agent"),
                RestartOutcome::Forbidden,
            ),
        ];
        let now = at("2026-11-24T10:00:05Z");
        let state = after_restart(&outcomes, "alice-acs-token", "chat-app", now);
        assert_eq!(state.last_restart_time, Some(Time(now)));
        assert_eq!((state.pending_since, state.pending_revoke), (None, false));
        let failed: Vec<(&str, &str)> = state
            .failed_targets
            .iter()
            .map(|f| (f.name.as_str(), f.reason.as_str()))
            .collect();
        assert_eq!(
            failed,
            [
                ("db", reason::RESTART_TARGET_NOT_FOUND),
                ("agent", reason::RESTART_FORBIDDEN)
            ]
        );
        assert!(
            state.failed_targets[1]
                .message
                .contains("rolloutRestart.enabled=true")
        );
    }

    #[test]
    fn the_patch_is_kubectl_rollout_restart() {
        assert_eq!(
            restart_patch(at("2026-11-24T10:00:00.25Z")),
            json!({ "spec": { "template": { "metadata": { "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-11-24T10:00:00Z",
            } } } } })
        );
    }
}
