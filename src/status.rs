//! The Ready condition, computed from what a reconcile pass ended with. Pure.
//!
//! Every failure the user can see is a [`Failure`]: it names the condition reason, writes the
//! actionable message, and says how soon to retry. Messages are built from names and ACS error
//! texts only, never from a key or a token.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{DeletionPolicy, InvalidSpec, READY_CONDITION, reason};
use crate::refresh::FailureKind;

/// Something that kept a reconcile pass from its goal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `via`: the connection resource that names the Secret (none: spec.connectionSecretRef).
    ConnectionSecretNotFound {
        secret: String,
        key: String,
        via: Option<String>,
    },
    ConnectionSecretKeyMissing {
        secret: String,
        key: String,
        via: Option<String>,
    },
    /// `spec.connectionRef` names a connection that does not exist; `connection` says which.
    ConnectionNotFound {
        connection: String,
    },
    NamespaceNotAllowed {
        connection: String,
        namespace: String,
    },
    /// The connection has no authentication this operator supports.
    ConnectionUnusable {
        connection: String,
    },
    InvalidConnectionString {
        secret: String,
        key: String,
        error: acs::ConnectionStringError,
    },
    /// ACS answered 401: the key is wrong or was rotated.
    AuthenticationFailed {
        /// Where the key is, as a phrase: `Secret "name"`.
        credentials: String,
        acs_message: String,
    },
    /// ACS answered 400.
    InvalidRequest {
        acs_code: String,
        acs_message: String,
    },
    /// ACS has no identity of that id (an adopted `spec.identityId`, or one deleted out of band).
    IdentityNotFound {
        identity_id: String,
    },
    InvalidSpec(InvalidSpec),
    /// A Secret of the wanted name exists and is not controlled by this resource.
    SecretConflict {
        secret_name: String,
    },
    /// ACS answered 429.
    Throttled {
        retry_after: Option<Duration>,
    },
    /// 5xx, timeout or connection failure, or an answer that makes no sense (too large, a
    /// redirect, a token already expired); `detail` says which.
    AcsUnavailable {
        detail: String,
    },
    /// The endpoint is outside `--acs-endpoint-suffixes`; `named_by` says where it is named
    /// (`the connection string in Secret "x"`, `spec.endpoint of ClusterAcsConnection "y"`).
    EndpointNotAllowed {
        named_by: String,
        host: String,
    },
    /// Entra ID refused the connection's workload identity (4xx): `codes` are its AADSTS codes.
    EntraAuthenticationFailed {
        connection: String,
        status: u16,
        codes: String,
        description: String,
    },
    /// Entra ID gave no answer that says anything (unreachable, timeout, 5xx).
    EntraUnavailable {
        connection: String,
        detail: String,
    },
    /// The federated token to present to Entra could not be had (ServiceAccount missing, RBAC).
    FederatedTokenUnavailable {
        connection: String,
        cause: String,
    },
    /// ACS answered 401 to the connection's Entra token: the application has no role on it.
    EntraTokenRejected {
        connection: String,
        acs_message: String,
    },
    /// The connection's workload identity cannot be set up (its authority host, its tenant).
    WorkloadIdentityUnusable {
        connection: String,
        detail: String,
    },
    /// The API server refused the token Secret; `detail` quotes it.
    SecretWriteFailed {
        secret_name: String,
        detail: String,
    },
    /// Another CommunicationIdentity of this cluster created or adopted the identity named in
    /// `spec.identityId`; `holder` is its `namespace/name`.
    IdentityInUse {
        identity_id: String,
        holder: String,
    },
    /// The pass waits in the endpoint's queue since `since`, and is called back when its turn
    /// comes: for budget (nothing failed), or, `circuit_open`, for the endpoint to recover.
    WaitingForAcs {
        since: Timestamp,
        circuit_open: bool,
    },
}

impl Failure {
    /// The condition (and event) reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::ConnectionSecretNotFound { .. } => reason::CONNECTION_SECRET_NOT_FOUND,
            Failure::ConnectionSecretKeyMissing { .. } => reason::CONNECTION_SECRET_KEY_MISSING,
            Failure::ConnectionNotFound { .. } => reason::CONNECTION_NOT_FOUND,
            Failure::NamespaceNotAllowed { .. } => reason::NAMESPACE_NOT_ALLOWED,
            Failure::ConnectionUnusable { .. } => reason::CONNECTION_UNUSABLE,
            Failure::InvalidConnectionString { .. } => reason::INVALID_CONNECTION_STRING,
            Failure::AuthenticationFailed { .. } => reason::AUTHENTICATION_FAILED,
            Failure::InvalidRequest { .. } => reason::INVALID_REQUEST,
            Failure::IdentityNotFound { .. } => reason::IDENTITY_NOT_FOUND,
            Failure::InvalidSpec(_) => reason::INVALID_SPEC,
            Failure::SecretConflict { .. } => reason::SECRET_CONFLICT,
            Failure::Throttled { .. } => reason::THROTTLED,
            Failure::AcsUnavailable { .. } => reason::ACS_UNAVAILABLE,
            Failure::EndpointNotAllowed { .. } => reason::ENDPOINT_NOT_ALLOWED,
            Failure::SecretWriteFailed { .. } => reason::SECRET_WRITE_FAILED,
            Failure::IdentityInUse { .. } => reason::IDENTITY_IN_USE,
            Failure::EntraAuthenticationFailed { .. } => reason::ENTRA_AUTHENTICATION_FAILED,
            Failure::EntraUnavailable { .. } => reason::ENTRA_UNAVAILABLE,
            Failure::FederatedTokenUnavailable { .. } => reason::FEDERATED_TOKEN_UNAVAILABLE,
            Failure::EntraTokenRejected { .. } => reason::AUTHENTICATION_FAILED,
            Failure::WorkloadIdentityUnusable { .. } => reason::CONNECTION_UNUSABLE,
            // An endpoint that fails is unavailable, whether or not this resource's own request
            // went out: the reason (and the failures metric, and its alert) say so.
            Failure::WaitingForAcs {
                circuit_open: true, ..
            } => reason::ACS_UNAVAILABLE,
            Failure::WaitingForAcs { .. } => reason::WAITING_FOR_ACS,
        }
    }

    /// What an ACS error means for the resource: `credentials` says where the key is, and
    /// `connection` names the connection (both for messages), `identity_id` the identity the
    /// call was about.
    pub fn from_acs(
        error: &acs::Error,
        credentials: &str,
        connection: &str,
        identity_id: Option<&str>,
    ) -> Self {
        let connection = connection.to_owned();
        match error {
            acs::Error::TokenRejected(service) => Failure::EntraTokenRejected {
                connection,
                acs_message: service.to_string(),
            },
            acs::Error::EntraRefused {
                status,
                codes,
                description,
            } => Failure::EntraAuthenticationFailed {
                connection,
                status: *status,
                codes: codes.clone(),
                description: description.clone(),
            },
            acs::Error::EntraUnavailable { .. } => Failure::EntraUnavailable {
                connection,
                detail: error.to_string(),
            },
            acs::Error::FederatedTokenUnavailable { cause } => Failure::FederatedTokenUnavailable {
                connection,
                cause: cause.clone(),
            },
            acs::Error::Unauthorized(service) => Failure::AuthenticationFailed {
                credentials: credentials.to_owned(),
                acs_message: service.to_string(),
            },
            acs::Error::BadRequest(service) => Failure::InvalidRequest {
                acs_code: service.code.clone(),
                acs_message: service.message.clone(),
            },
            acs::Error::NotFound(_) => Failure::IdentityNotFound {
                identity_id: identity_id.unwrap_or_default().to_owned(),
            },
            acs::Error::Throttled { retry_after, .. } => Failure::Throttled {
                retry_after: *retry_after,
            },
            acs::Error::Queued {
                since,
                circuit_open,
            } => Failure::WaitingForAcs {
                since: *since,
                circuit_open: *circuit_open,
            },
            // The service's own words; the error's Display would say "unavailable" twice.
            acs::Error::Unavailable(service) => Failure::AcsUnavailable {
                detail: service.to_string(),
            },
            other => Failure::AcsUnavailable {
                detail: other.to_string(),
            },
        }
    }

    /// How the retry is paced (see [`crate::refresh::retry_delay`]).
    pub fn kind(&self) -> FailureKind {
        match self {
            Failure::Throttled { retry_after } => FailureKind::Throttled {
                retry_after: *retry_after,
            },
            Failure::AcsUnavailable { .. } | Failure::EntraUnavailable { .. } => {
                FailureKind::Transient
            }
            Failure::WaitingForAcs { .. } => FailureKind::Queued,
            _ => FailureKind::UserError,
        }
    }

    /// What is wrong and what to do about it, at most [`MAX_MESSAGE_CHARS`] long (ACS error
    /// texts and API-server messages are quoted, and an Event note over 1 KiB is refused).
    pub fn message(&self) -> String {
        bounded(self.unbounded_message())
    }

    fn unbounded_message(&self) -> String {
        match self {
            Failure::ConnectionSecretNotFound {
                secret,
                key,
                via: None,
            } => format!(
                "Secret {secret:?} with the ACS connection string was not found in this namespace; \
                 create it with the connection string under key {key:?}, or fix spec.connectionSecretRef.name"
            ),
            Failure::ConnectionSecretNotFound {
                secret,
                key,
                via: Some(via),
            } => format!(
                "Secret {secret:?}, named by {via} for the ACS connection string, was not found; \
                 create it with the connection string under key {key:?}, or fix that connection's \
                 spec.accessKey.secretRef"
            ),
            Failure::ConnectionSecretKeyMissing {
                secret,
                key,
                via: None,
            } => format!(
                "Secret {secret:?} has no key {key:?}; put the ACS connection string under that key, \
                 or fix spec.connectionSecretRef.key"
            ),
            Failure::ConnectionSecretKeyMissing {
                secret,
                key,
                via: Some(via),
            } => format!(
                "Secret {secret:?}, named by {via}, has no key {key:?}; put the ACS connection \
                 string under that key, or fix that connection's spec.accessKey.secretRef.key"
            ),
            Failure::ConnectionNotFound { connection } => format!(
                "{connection}, named in spec.connectionRef, was not found (an AcsConnection must be \
                 in this namespace); create it, or fix spec.connectionRef"
            ),
            Failure::NamespaceNotAllowed {
                connection,
                namespace,
            } => format!(
                "{connection} does not allow namespace {namespace:?}; ask its owner to add the \
                 namespace to its spec.conditions, or use another connection"
            ),
            Failure::ConnectionUnusable { connection } => format!(
                "{connection} names no authentication this operator can use: set exactly one of \
                 spec.accessKey and spec.workloadIdentity (with spec.endpoint; on an AcsConnection, \
                 with a serviceAccountRef of its own namespace), or use another connection"
            ),
            Failure::InvalidConnectionString { secret, key, error } => {
                format!("Secret {secret:?} key {key:?}: {error}")
            }
            Failure::AuthenticationFailed {
                credentials,
                acs_message,
            } => format!(
                "ACS rejected the access key (401: {acs_message}); put the resource's current \
                 connection string into {credentials}"
            ),
            Failure::InvalidRequest {
                acs_code,
                acs_message,
            } => format!(
                "ACS rejected the request (400 {acs_code}: {acs_message}); check spec.scopes and spec.tokenLifetime"
            ),
            Failure::IdentityNotFound { identity_id } => format!(
                "ACS has no identity {identity_id:?}; if it came from spec.identityId, recreate this \
                 resource with an existing identityId, or without one to create a new identity"
            ),
            Failure::InvalidSpec(error) => format!(
                "{error}; the installed CRD may be outdated: apply crds/acs-operator.io.yaml"
            ),
            Failure::SecretConflict { secret_name } => format!(
                "Secret {secret_name:?} exists and is not owned by this CommunicationIdentity; the operator \
                 will not overwrite it: delete it, or set spec.secretName to another name"
            ),
            Failure::Throttled {
                retry_after: Some(after),
            } => format!(
                "ACS is throttling requests (429); retrying in {}s",
                after.as_secs().max(1)
            ),
            Failure::Throttled { retry_after: None } => {
                "ACS is throttling requests (429); retrying with backoff".to_owned()
            }
            Failure::AcsUnavailable { detail } => {
                format!("ACS is unavailable ({detail}); retrying with backoff")
            }
            Failure::EndpointNotAllowed { named_by, host } => format!(
                "{named_by} names ACS endpoint host {host:?}, which \
                 the operator's --acs-endpoint-suffixes does not admit; use the endpoint of your ACS \
                 resource, or ask the cluster admin to add its domain to --acs-endpoint-suffixes \
                 (Helm value acsEndpointSuffixes)"
            ),
            Failure::SecretWriteFailed {
                secret_name,
                detail,
            } => format!(
                "the API server refused to write Secret {secret_name:?} ({detail}); fix what it \
                 names (spec.secretTemplate, a ResourceQuota on Secrets, the namespace); the \
                 token already issued is written as soon as it can be"
            ),
            Failure::EntraAuthenticationFailed {
                connection,
                status,
                codes,
                description,
            } => format!(
                "Microsoft Entra ID refused the workload identity of {connection} (HTTP {status}{}: \
                 {description}); check its spec.workloadIdentity tenantId and clientId, and that the \
                 Entra application has a federated credential for this cluster's ServiceAccount \
                 issuer, the subject system:serviceaccount:<namespace>:<name> and the audience",
                if codes.is_empty() {
                    String::new()
                } else {
                    format!(", {codes}")
                }
            ),
            Failure::EntraUnavailable { connection, detail } => format!(
                "{detail} for {connection}; retrying with backoff (check spec.workloadIdentity.authorityHost \
                 and the network path to it if this lasts)"
            ),
            Failure::FederatedTokenUnavailable { connection, cause } => {
                format!(
                    "{connection}: no federated token to present to Microsoft Entra ID: {cause}"
                )
            }
            Failure::EntraTokenRejected {
                connection,
                acs_message,
            } => format!(
                "ACS rejected the Microsoft Entra ID token of {connection} (401: {acs_message}); give \
                 the Entra application a role on the ACS resource (Microsoft's quickstart assigns \
                 Contributor), and check that spec.endpoint is that resource's"
            ),
            Failure::WorkloadIdentityUnusable { connection, detail } => {
                format!("{connection}: {detail}")
            }
            // The queue's own words: they name only the time and the endpoint's state.
            Failure::WaitingForAcs {
                since,
                circuit_open,
            } => acs::Error::Queued {
                since: *since,
                circuit_open: *circuit_open,
            }
            .to_string(),
            Failure::IdentityInUse {
                identity_id,
                holder,
            } => format!(
                "ACS identity {identity_id:?} in spec.identityId belongs to CommunicationIdentity \
                 {holder}; an identity is adopted by one resource only: recreate this resource \
                 without spec.identityId, or with an identity of its own"
            ),
        }
    }
}

/// The longest message in a condition or Event note, in characters (Event notes are capped at
/// 1 KiB by the API server, and these are ASCII but for quoted texts).
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// `text` cut to [`MAX_MESSAGE_CHARS`] bytes on a character boundary, marked when cut.
pub fn bounded(text: String) -> String {
    truncated(text, MAX_MESSAGE_CHARS)
}

/// `text` cut to `max` bytes on a character boundary, marked when cut.
pub fn truncated(mut text: String, max: usize) -> String {
    const MARK: &str = " […]";
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}

/// How a reconcile pass ended, as far as readiness goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// The Secret holds a token for the current spec.
    TokenCurrent {
        secret_name: &'a str,
        expires_on: Timestamp,
    },
    /// The pass failed. `token_valid_until` is set only while the resource's own Secret still
    /// holds an unexpired token for the current spec: workloads are then unaffected for now.
    Failed {
        failure: &'a Failure,
        token_valid_until: Option<Timestamp>,
    },
    /// The resource is being deleted; `blocked_by` is what keeps the cleanup in ACS waiting.
    Deleting {
        policy: DeletionPolicy,
        blocked_by: Option<&'a Failure>,
    },
}

/// The Ready condition for `outcome`. Its lastTransitionTime is kept from `previous` while the
/// status (True/False) stays the same, so it tells when readiness last changed.
///
/// Ready is True exactly while the Secret holds an unexpired token for the current spec; a
/// failure meanwhile (ACS down, a rotated key) shows as the reason of a True condition.
pub fn ready_condition(
    outcome: Outcome<'_>,
    generation: Option<i64>,
    now: Timestamp,
    previous: &[Condition],
) -> Condition {
    let (ready, reason, message) = match outcome {
        Outcome::TokenCurrent {
            secret_name,
            expires_on,
        } => (
            true,
            reason::TOKEN_ISSUED,
            format!("Secret {secret_name:?} holds a token valid until {expires_on}"),
        ),
        Outcome::Failed {
            failure,
            token_valid_until: Some(valid_until),
        } if valid_until > now => (
            true,
            failure.reason(),
            format!(
                "{}; the token in the Secret stays valid until {valid_until}",
                failure.message()
            ),
        ),
        Outcome::Failed { failure, .. } => (false, failure.reason(), failure.message()),
        Outcome::Deleting { policy, blocked_by } => {
            let action = match policy {
                DeletionPolicy::Delete => "deleting the identity in ACS",
                DeletionPolicy::RevokeTokens => "revoking the identity's tokens in ACS",
                DeletionPolicy::Retain => "leaving the identity in ACS (deletionPolicy Retain)",
            };
            let message = match blocked_by {
                Some(failure) => format!("Waiting to finish {action}: {}", failure.message()),
                None => format!("Being deleted: {action}"),
            };
            (false, reason::DELETING, message)
        }
    };
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == READY_CONDITION && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: READY_CONDITION.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: bounded(message),
        observed_generation: generation,
        last_transition_time,
    }
}

/// `conditions` with `condition` in place of the one of its type.
pub fn with_condition(conditions: &[Condition], condition: Condition) -> Vec<Condition> {
    let mut updated: Vec<Condition> = conditions
        .iter()
        .filter(|c| c.type_ != condition.type_)
        .cloned()
        .collect();
    updated.push(condition);
    updated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-24T10:00:00Z".parse().unwrap()
    }

    fn hours(n: i64) -> jiff::SignedDuration {
        jiff::SignedDuration::from_hours(n)
    }

    fn every_failure() -> Vec<Failure> {
        vec![
            Failure::ConnectionSecretNotFound {
                secret: "acs-connection".into(),
                key: "connectionString".into(),
                via: None,
            },
            Failure::ConnectionSecretKeyMissing {
                secret: "acs-connection".into(),
                key: "connectionString".into(),
                via: None,
            },
            Failure::InvalidConnectionString {
                secret: "acs-connection".into(),
                key: "connectionString".into(),
                error: acs::ConnectionStringError::KeyNotBase64,
            },
            Failure::AuthenticationFailed {
                credentials: "Secret \"acs-connection\"".into(),
                acs_message: "Denied".into(),
            },
            Failure::InvalidRequest {
                acs_code: "InvalidScope".into(),
                acs_message: "bad scope".into(),
            },
            Failure::IdentityNotFound {
                identity_id: "8:acs:r_1".into(),
            },
            Failure::InvalidSpec(InvalidSpec::DuplicateScopes),
            Failure::SecretConflict {
                secret_name: "alice-acs-token".into(),
            },
            Failure::Throttled {
                retry_after: Some(Duration::from_secs(30)),
            },
            Failure::Throttled { retry_after: None },
            Failure::AcsUnavailable {
                detail: "503".into(),
            },
            Failure::EndpointNotAllowed {
                named_by: "the connection string in Secret \"acs-connection\"".into(),
                host: "acs.example.net".into(),
            },
            Failure::SecretWriteFailed {
                secret_name: "alice-acs-token".into(),
                detail: "403: exceeded quota".into(),
            },
            Failure::IdentityInUse {
                identity_id: "8:acs:r_1".into(),
                holder: "team/bob".into(),
            },
            Failure::ConnectionSecretNotFound {
                secret: "acs-key".into(),
                key: "connectionString".into(),
                via: Some("ClusterAcsConnection \"shared\"".into()),
            },
            Failure::ConnectionSecretKeyMissing {
                secret: "acs-key".into(),
                key: "connectionString".into(),
                via: Some("AcsConnection \"team\"".into()),
            },
            Failure::ConnectionNotFound {
                connection: "AcsConnection \"team\"".into(),
            },
            Failure::NamespaceNotAllowed {
                connection: "ClusterAcsConnection \"shared\"".into(),
                namespace: "team-c".into(),
            },
            Failure::ConnectionUnusable {
                connection: "ClusterAcsConnection \"shared\"".into(),
            },
            Failure::EntraAuthenticationFailed {
                connection: "ClusterAcsConnection \"shared\"".into(),
                status: 400,
                codes: "AADSTS700016".into(),
                description: "AADSTS700016: Application not found.".into(),
            },
            Failure::EntraUnavailable {
                connection: "ClusterAcsConnection \"shared\"".into(),
                detail: "could not get a Microsoft Entra ID token from https://login.microsoftonline.com: HTTP 503".into(),
            },
            Failure::FederatedTokenUnavailable {
                connection: "AcsConnection \"team\"".into(),
                cause: "ServiceAccount \"acs\" was not found".into(),
            },
            Failure::EntraTokenRejected {
                connection: "AcsConnection \"team\"".into(),
                acs_message: "401 Denied: no role".into(),
            },
            Failure::WorkloadIdentityUnusable {
                connection: "AcsConnection \"team\"".into(),
                detail: "the authority host is not allowed".into(),
            },
        ]
    }

    #[test]
    fn ready_conditions() {
        let unavailable = Failure::AcsUnavailable {
            detail: "503".into(),
        };
        let conflict = Failure::SecretConflict {
            secret_name: "alice-acs-token".into(),
        };
        let cases = [
            (
                "token current",
                Outcome::TokenCurrent {
                    secret_name: "alice-acs-token",
                    expires_on: now() + hours(24),
                },
                "True",
                reason::TOKEN_ISSUED,
                "Secret \"alice-acs-token\" holds a token valid until 2026-11-25T10:00:00Z",
            ),
            (
                "ACS down while the token is still valid",
                Outcome::Failed {
                    failure: &unavailable,
                    token_valid_until: Some(now() + hours(3)),
                },
                "True",
                reason::ACS_UNAVAILABLE,
                "ACS is unavailable (503); retrying with backoff; the token in the Secret stays valid until 2026-11-24T13:00:00Z",
            ),
            (
                "ACS down and the token expired",
                Outcome::Failed {
                    failure: &unavailable,
                    token_valid_until: Some(now() - hours(1)),
                },
                "False",
                reason::ACS_UNAVAILABLE,
                "ACS is unavailable (503); retrying with backoff",
            ),
            (
                "Secret conflict",
                Outcome::Failed {
                    failure: &conflict,
                    token_valid_until: None,
                },
                "False",
                reason::SECRET_CONFLICT,
                "Secret \"alice-acs-token\" exists and is not owned by this CommunicationIdentity; the operator will not overwrite it: delete it, or set spec.secretName to another name",
            ),
            (
                "deleting",
                Outcome::Deleting {
                    policy: DeletionPolicy::Delete,
                    blocked_by: None,
                },
                "False",
                reason::DELETING,
                "Being deleted: deleting the identity in ACS",
            ),
            (
                "deletion waits for ACS",
                Outcome::Deleting {
                    policy: DeletionPolicy::RevokeTokens,
                    blocked_by: Some(&unavailable),
                },
                "False",
                reason::DELETING,
                "Waiting to finish revoking the identity's tokens in ACS: ACS is unavailable (503); retrying with backoff",
            ),
        ];
        for (name, outcome, status, reason, message) in cases {
            let condition = ready_condition(outcome, Some(3), now(), &[]);
            assert_eq!(condition.type_, "Ready", "{name}");
            assert_eq!(condition.status, status, "{name}");
            assert_eq!(condition.reason, reason, "{name}");
            assert_eq!(condition.message, message, "{name}");
            assert_eq!(condition.observed_generation, Some(3), "{name}");
            assert_eq!(condition.last_transition_time, Time(now()), "{name}");
        }
    }

    #[test]
    fn last_transition_time_moves_only_when_the_status_changes() {
        let earlier = now() - hours(5);
        let previous = [ready_condition(
            Outcome::TokenCurrent {
                secret_name: "s",
                expires_on: now(),
            },
            Some(1),
            earlier,
            &[],
        )];
        let refreshed = ready_condition(
            Outcome::TokenCurrent {
                secret_name: "s",
                expires_on: now() + hours(24),
            },
            Some(2),
            now(),
            &previous,
        );
        assert_eq!(refreshed.last_transition_time, Time(earlier));

        let conflict = Failure::SecretConflict {
            secret_name: "s".into(),
        };
        let failed = ready_condition(
            Outcome::Failed {
                failure: &conflict,
                token_valid_until: None,
            },
            Some(2),
            now(),
            &previous,
        );
        assert_eq!(failed.last_transition_time, Time(now()));
    }

    #[test]
    fn with_condition_replaces_the_condition_of_its_type_only() {
        let other = Condition {
            type_: "Other".into(),
            status: "True".into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(now()),
        };
        let old = ready_condition(
            Outcome::TokenCurrent {
                secret_name: "s",
                expires_on: now(),
            },
            None,
            now(),
            &[],
        );
        let unavailable = Failure::AcsUnavailable {
            detail: "timeout".into(),
        };
        let new = ready_condition(
            Outcome::Failed {
                failure: &unavailable,
                token_valid_until: None,
            },
            None,
            now(),
            &[],
        );
        let conditions = with_condition(&[other.clone(), old], new.clone());
        assert_eq!(conditions, vec![other, new]);
    }

    #[test]
    fn every_failure_has_its_reason_and_retry_pace() {
        use FailureKind::{Transient, UserError};
        let expected = [
            (reason::CONNECTION_SECRET_NOT_FOUND, UserError),
            (reason::CONNECTION_SECRET_KEY_MISSING, UserError),
            (reason::INVALID_CONNECTION_STRING, UserError),
            (reason::AUTHENTICATION_FAILED, UserError),
            (reason::INVALID_REQUEST, UserError),
            (reason::IDENTITY_NOT_FOUND, UserError),
            (reason::INVALID_SPEC, UserError),
            (reason::SECRET_CONFLICT, UserError),
            (
                reason::THROTTLED,
                FailureKind::Throttled {
                    retry_after: Some(Duration::from_secs(30)),
                },
            ),
            (
                reason::THROTTLED,
                FailureKind::Throttled { retry_after: None },
            ),
            (reason::ACS_UNAVAILABLE, Transient),
            (reason::ENDPOINT_NOT_ALLOWED, UserError),
            (reason::SECRET_WRITE_FAILED, UserError),
            (reason::IDENTITY_IN_USE, UserError),
            (reason::CONNECTION_SECRET_NOT_FOUND, UserError),
            (reason::CONNECTION_SECRET_KEY_MISSING, UserError),
            (reason::CONNECTION_NOT_FOUND, UserError),
            (reason::NAMESPACE_NOT_ALLOWED, UserError),
            (reason::CONNECTION_UNUSABLE, UserError),
            (reason::ENTRA_AUTHENTICATION_FAILED, UserError),
            (reason::ENTRA_UNAVAILABLE, Transient),
            (reason::FEDERATED_TOKEN_UNAVAILABLE, UserError),
            (reason::AUTHENTICATION_FAILED, UserError),
            (reason::CONNECTION_UNUSABLE, UserError),
        ];
        let failures = every_failure();
        assert_eq!(failures.len(), expected.len());
        for (failure, (reason, kind)) in failures.iter().zip(expected) {
            assert_eq!(failure.reason(), reason, "{failure:?}");
            assert_eq!(failure.kind(), kind, "{failure:?}");
        }
    }

    #[test]
    fn messages_say_what_to_fix() {
        let expectations = [
            (
                0,
                "create it with the connection string under key \"connectionString\"",
            ),
            (1, "fix spec.connectionSecretRef.key"),
            (2, "not valid base64"),
            (
                3,
                "put the resource's current connection string into Secret \"acs-connection\"",
            ),
            (4, "400 InvalidScope: bad scope"),
            (5, "recreate this resource"),
            (6, "scopes must be distinct"),
            (7, "set spec.secretName to another name"),
            (8, "retrying in 30s"),
            (11, "add its domain to --acs-endpoint-suffixes"),
            (12, "403: exceeded quota"),
            (13, "belongs to CommunicationIdentity team/bob"),
            (14, "named by ClusterAcsConnection \"shared\""),
            (14, "fix that connection's spec.accessKey.secretRef"),
            (15, "fix that connection's spec.accessKey.secretRef.key"),
            (
                16,
                "AcsConnection \"team\", named in spec.connectionRef, was not found",
            ),
            (17, "does not allow namespace \"team-c\""),
            (17, "add the namespace to its spec.conditions"),
            (
                18,
                "set exactly one of spec.accessKey and spec.workloadIdentity",
            ),
            (19, "AADSTS700016: Application not found."),
            (19, "check its spec.workloadIdentity tenantId and clientId"),
            (20, "retrying with backoff"),
            (21, "ServiceAccount \"acs\" was not found"),
            (22, "Microsoft's quickstart assigns Contributor"),
            (23, "the authority host is not allowed"),
        ];
        let failures = every_failure();
        for (index, fragment) in expectations {
            let message = failures[index].message();
            assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn acs_errors_become_failures() {
        let service = |status, code: &str| acs::ServiceError {
            status,
            code: code.into(),
            message: "m".into(),
        };
        let cases = [
            (
                "401",
                acs::Error::Unauthorized(service(401, "Denied")),
                reason::AUTHENTICATION_FAILED,
            ),
            (
                "400",
                acs::Error::BadRequest(service(400, "InvalidScope")),
                reason::INVALID_REQUEST,
            ),
            (
                "404",
                acs::Error::NotFound(service(404, "NotFound")),
                reason::IDENTITY_NOT_FOUND,
            ),
            (
                "429",
                acs::Error::Throttled {
                    error: service(429, "TooManyRequests"),
                    retry_after: Some(Duration::from_secs(7)),
                },
                reason::THROTTLED,
            ),
            (
                "503",
                acs::Error::Unavailable(service(503, "ServiceUnavailable")),
                reason::ACS_UNAVAILABLE,
            ),
            (
                "timeout",
                acs::Error::Timeout {
                    after: Duration::from_secs(10),
                },
                reason::ACS_UNAVAILABLE,
            ),
            (
                "401 to an Entra token",
                acs::Error::TokenRejected(service(401, "Denied")),
                reason::AUTHENTICATION_FAILED,
            ),
            (
                "Entra refuses",
                acs::Error::EntraRefused {
                    status: 401,
                    codes: "AADSTS700213".into(),
                    description: "AADSTS700213: No matching federated identity record found".into(),
                },
                reason::ENTRA_AUTHENTICATION_FAILED,
            ),
            (
                "Entra is down",
                acs::Error::EntraUnavailable {
                    authority: "https://login.microsoftonline.com".into(),
                    cause: "HTTP 503".into(),
                },
                reason::ENTRA_UNAVAILABLE,
            ),
            (
                "no federated token",
                acs::Error::FederatedTokenUnavailable {
                    cause: "ServiceAccount missing".into(),
                },
                reason::FEDERATED_TOKEN_UNAVAILABLE,
            ),
        ];
        for (name, error, expected) in cases {
            let failure = Failure::from_acs(
                &error,
                "acs-connection",
                "ClusterAcsConnection \"shared\"",
                Some("8:acs:r_1"),
            );
            assert_eq!(failure.reason(), expected, "{name}");
        }
        let refused = acs::Error::EntraRefused {
            status: 401,
            codes: "AADSTS700213".into(),
            description: "AADSTS700213: No matching federated identity record found".into(),
        };
        let refused = Failure::from_acs(&refused, "s", "ClusterAcsConnection \"shared\"", None);
        assert!(refused.message().starts_with(
            "Microsoft Entra ID refused the workload identity of ClusterAcsConnection \"shared\" (HTTP 401, AADSTS700213: AADSTS700213: No matching"
        ), "{}", refused.message());
        assert_eq!(refused.kind(), FailureKind::UserError);
        let down = acs::Error::EntraUnavailable {
            authority: "https://login.microsoftonline.com".into(),
            cause: "HTTP 503".into(),
        };
        assert_eq!(
            Failure::from_acs(&down, "s", "c", None).kind(),
            FailureKind::Transient
        );
        let not_found = Failure::from_acs(
            &acs::Error::NotFound(service(404, "x")),
            "s",
            "c",
            Some("8:acs:r_1"),
        );
        assert!(not_found.message().contains("8:acs:r_1"));
        let throttled = Failure::from_acs(
            &acs::Error::Throttled {
                error: service(429, "x"),
                retry_after: Some(Duration::from_secs(7)),
            },
            "s",
            "c",
            None,
        );
        assert_eq!(
            throttled.kind(),
            FailureKind::Throttled {
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn messages_are_bounded_whatever_they_quote() {
        let cases = [
            ("short", "x".repeat(10), 10),
            (
                "at the bound",
                "x".repeat(MAX_MESSAGE_CHARS),
                MAX_MESSAGE_CHARS,
            ),
            ("a megabyte", "x".repeat(1 << 20), MAX_MESSAGE_CHARS),
            (
                "multi-byte at the cut",
                "€".repeat(1 << 10),
                MAX_MESSAGE_CHARS - 1,
            ),
        ];
        for (name, text, expected_len) in cases {
            let cut = bounded(text.clone());
            assert_eq!(cut.len(), expected_len, "{name}");
            assert_eq!(
                cut.ends_with(" […]"),
                text.len() > MAX_MESSAGE_CHARS,
                "{name}"
            );
        }
        let failure = Failure::InvalidRequest {
            acs_code: "Bad".into(),
            acs_message: "m".repeat(1 << 20),
        };
        assert!(failure.message().len() <= MAX_MESSAGE_CHARS);
    }
}
