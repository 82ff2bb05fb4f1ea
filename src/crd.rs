//! The `CommunicationIdentity` custom resource, and every name the operator shares with the
//! cluster: finalizers, field manager, labels, annotations, condition types and reasons.
//!
//! The schema rejects bad input at `kubectl apply` time (OpenAPI + CEL rules); the Rust-side
//! [`CommunicationIdentitySpec::validate`] repeats those checks so the reconciler never trusts a
//! spec that slipped past an older or hand-edited CRD.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Finalizer on a `CommunicationIdentity`: cleanup in ACS must run before it goes.
pub const FINALIZER: &str = "acs-operator.io/cleanup";
/// Finalizer on a connection Secret while a `CommunicationIdentity` still needs it, so deleting a
/// whole namespace cannot remove the credentials before the identities are cleaned up in ACS.
pub const CONNECTION_SECRET_FINALIZER: &str = "acs-operator.io/connection-in-use";
/// The one field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "acs-identity-operator";
/// Label on every Secret the operator writes; the controller watches Secrets by this label only.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "acs-identity-operator";
/// Every annotation the operator reads starts with this.
pub const OPERATOR_ANNOTATION_PREFIX: &str = "acs-operator.io/";
/// Annotation whose every new value issues a fresh token now, bypassing failure backoff.
pub const REFRESH_REQUESTED_ANNOTATION: &str = "acs-operator.io/refresh-requested-at";
/// Annotation whose every new value revokes all tokens of the identity, then issues a new one.
pub const REVOKE_REQUESTED_ANNOTATION: &str = "acs-operator.io/revoke-requested-at";
/// Annotation (`"true"`) that lets an admin release a resource without cleanup in ACS.
pub const SKIP_CLEANUP_ANNOTATION: &str = "acs-operator.io/skip-cleanup";
/// The one condition type: True while the Secret holds an unexpired token for the current spec.
pub const READY_CONDITION: &str = "Ready";

/// Keys of the Secret the operator writes.
pub mod secret_key {
    pub const TOKEN: &str = "token";
    pub const EXPIRES_ON: &str = "expiresOn";
    pub const IDENTITY_ID: &str = "identityId";
    pub const SCOPES: &str = "scopes";
    pub const ENDPOINT: &str = "endpoint";
}

/// Every condition reason and event reason, declared once.
pub mod reason {
    // Success and lifecycle.
    /// The Secret holds a token for the current spec (condition), or a token was issued (event).
    pub const TOKEN_ISSUED: &str = "TokenIssued";
    /// Event: a token was replaced before it expired.
    pub const TOKEN_REFRESHED: &str = "TokenRefreshed";
    /// Event: every token of the identity was revoked (revoke annotation or RevokeTokens policy).
    pub const TOKENS_REVOKED: &str = "TokensRevoked";
    /// Event: an identity was created in ACS.
    pub const IDENTITY_CREATED: &str = "IdentityCreated";
    /// Event: `spec.identityId` was adopted instead of creating an identity.
    pub const IDENTITY_ADOPTED: &str = "IdentityAdopted";
    /// Event: the identity was deleted in ACS (or was already gone).
    pub const IDENTITY_DELETED: &str = "IdentityDeleted";
    /// Event: `deletionPolicy: Retain` left the identity in ACS.
    pub const IDENTITY_RETAINED: &str = "IdentityRetained";
    /// Event: a Secret deleted or edited by someone else was written back.
    pub const SECRET_RESTORED: &str = "SecretRestored";
    /// Warning event: ACS returned a token that lives shorter than requested.
    pub const SHORT_TOKEN_LIFETIME: &str = "ShortTokenLifetime";
    /// Warning event: the skip-cleanup annotation released the resource without cleanup in ACS.
    pub const CLEANUP_SKIPPED: &str = "CleanupSkipped";
    /// Condition: no token has been issued yet.
    pub const PENDING: &str = "Pending";
    /// Condition: the resource is being deleted and cleanup in ACS is under way.
    pub const DELETING: &str = "Deleting";

    // Failures the user must fix.
    pub const CONNECTION_SECRET_NOT_FOUND: &str = "ConnectionSecretNotFound";
    pub const CONNECTION_SECRET_KEY_MISSING: &str = "ConnectionSecretKeyMissing";
    pub const INVALID_CONNECTION_STRING: &str = "InvalidConnectionString";
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    pub const IDENTITY_NOT_FOUND: &str = "IdentityNotFound";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SECRET_CONFLICT: &str = "SecretConflict";

    // Failures that pass by themselves.
    pub const THROTTLED: &str = "Throttled";
    pub const ACS_UNAVAILABLE: &str = "AcsUnavailable";
}

/// Shortest token lifetime ACS issues (`expiresInMinutes` 60).
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// Longest token lifetime ACS issues (`expiresInMinutes` 1440).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// ACS SDKs refresh 10 minutes before expiry; refreshing later than 15 minutes before would race them.
pub const MIN_REFRESH_BEFORE: Duration = Duration::from_secs(15 * 60);
/// refreshBefore must stay below tokenLifetime minus this, so a token is used for a while.
pub const MIN_TOKEN_USE: Duration = Duration::from_secs(15 * 60);

const DEFAULT_TOKEN_LIFETIME: &str = "24h";
/// Suffix of the default Secret name, `<metadata.name>-acs-token`.
const DEFAULT_SECRET_SUFFIX: &str = "-acs-token";

/// Durations are whole hours and/or minutes ("24h", "90m", "1h30m"): a subset of what CEL's
/// `duration()` parses. A CEL rule rather than an OpenAPI `pattern` checks the form, so a bad
/// value gets one clear message instead of a regex and a CEL conversion error; the rules that
/// call `duration()` skip values of the wrong form for the same reason.
macro_rules! duration_regex {
    () => {
        "^([0-9]{1,4}h([0-9]{1,5}m)?|[0-9]{1,5}m)$"
    };
}
/// DNS-1123 subdomain, as Kubernetes requires for a Secret name.
const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A Communication Services identity with an access token kept fresh in a Secret.
// Clippy reads the repeated `type_ = "string"` inside the printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "acs-operator.io",
    version = "v1alpha1",
    kind = "CommunicationIdentity",
    plural = "communicationidentities",
    shortname = "commid",
    namespaced,
    status = "CommunicationIdentityStatus",
    derive = "PartialEq",
    doc = "An Azure Communication Services identity whose access token the operator keeps fresh in a Secret.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#
    ),
    printcolumn(name = "Identity", type_ = "string", json_path = ".status.identityId"),
    // Future times as `date` would print "<invalid>" in kubectl: show them as timestamps.
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.tokenExpiresOn"),
    printcolumn(
        name = "Next Refresh",
        type_ = "string",
        json_path = ".status.nextRefreshTime"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": concat!(
            "!has(self.refreshBefore)",
            " || !self.refreshBefore.matches('", duration_regex!(), "')",
            " || !self.tokenLifetime.matches('", duration_regex!(), "')",
            " || duration(self.refreshBefore) < duration(self.tokenLifetime) - duration('15m')",
        ),
        "message": "refreshBefore must be less than tokenLifetime minus 15m",
    },
    {
        "rule": "has(self.identityId) == has(oldSelf.identityId)",
        "message": "identityId can only be set when the resource is created, and cannot be removed",
    },
]))]
pub struct CommunicationIdentitySpec {
    /// The Secret, in this resource's namespace, that holds the ACS connection string.
    pub connection_secret_ref: ConnectionSecretRef,

    /// Token scopes: 1 to 5 distinct values.
    #[schemars(length(min = 1, max = 5))]
    #[schemars(extend("x-kubernetes-validations" = [
        { "rule": "self.all(x, self.exists_one(y, x == y))", "message": "scopes must be distinct" },
    ]))]
    pub scopes: Vec<Scope>,

    /// Lifetime of each token, whole hours and/or minutes ("24h", "90m", "1h30m"), 1h to 24h.
    #[serde(default = "default_token_lifetime")]
    // maxLength bounds the cost the apiserver estimates for the CEL rules.
    #[schemars(length(max = 12))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": concat!("self.matches('", duration_regex!(), "')"),
            "message": "tokenLifetime must be whole hours and/or minutes, such as 24h, 90m or 1h30m",
        },
        {
            "rule": concat!(
                "!self.matches('", duration_regex!(), "')",
                " || duration(self) >= duration('1h') && duration(self) <= duration('24h')",
            ),
            "message": "tokenLifetime must be between 1h and 24h",
        },
    ]))]
    pub token_lifetime: String,

    /// How long before expiry a token is replaced ("8h", "90m"): from 15m to below tokenLifetime minus 15m; default a third of tokenLifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // `with = "String"` keeps the schema free of `nullable`, so a null is pruned as absent
    // instead of reaching the CEL rules.
    #[schemars(with = "String", length(max = 12))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": concat!("self.matches('", duration_regex!(), "')"),
            "message": "refreshBefore must be whole hours and/or minutes, such as 8h, 90m or 1h30m",
        },
        {
            "rule": concat!("!self.matches('", duration_regex!(), "') || duration(self) >= duration('15m')"),
            "message": "refreshBefore must be at least 15m",
        },
    ]))]
    pub refresh_before: Option<String>,

    /// Name of the Secret the token is written to. Default: <metadata.name>-acs-token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        with = "String",
        length(min = 1, max = 253),
        pattern(DNS_SUBDOMAIN_PATTERN)
    )]
    pub secret_name: Option<String>,

    /// Extra labels and annotations for the Secret.
    #[serde(default, skip_serializing_if = "SecretTemplate::is_empty")]
    pub secret_template: SecretTemplate,

    /// What happens in ACS when this resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Adopt this existing ACS identity instead of creating one. Set only at creation; immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 256))]
    #[schemars(extend("x-kubernetes-validations" = [
        { "rule": "self == oldSelf", "message": "identityId is immutable once set" },
    ]))]
    pub identity_id: Option<String>,
}

fn default_token_lifetime() -> String {
    DEFAULT_TOKEN_LIFETIME.to_owned()
}

/// Where the ACS connection string lives. Always in the resource's own namespace, so
/// namespaces stay tenants.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key in the Secret whose value is the connection string.
    #[serde(default = "default_connection_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_connection_key() -> String {
    "connectionString".to_owned()
}

/// A token scope as ACS names it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum Scope {
    #[serde(rename = "chat")]
    Chat,
    #[serde(rename = "voip")]
    Voip,
    #[serde(rename = "chat.join")]
    ChatJoin,
    #[serde(rename = "chat.join.limited")]
    ChatJoinLimited,
    #[serde(rename = "voip.join")]
    VoipJoin,
}

impl Scope {
    /// The name ACS uses, as in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Chat => "chat",
            Scope::Voip => "voip",
            Scope::ChatJoin => "chat.join",
            Scope::ChatJoinLimited => "chat.join.limited",
            Scope::VoipJoin => "voip.join",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Extra metadata for the Secret. The managed-by label always wins over a template label.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretTemplate {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl SecretTemplate {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }
}

/// What the operator does in ACS when the resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the identity (and with it every token).
    #[default]
    Delete,
    /// Revoke every token of the identity, keep the identity.
    RevokeTokens,
    /// Leave ACS alone.
    Retain,
}

/// What the operator observed and did; everything a restart needs to go on without an ACS call.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommunicationIdentityStatus {
    /// The ACS identity. Persisted before anything else can fail, so it is never leaked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_id: Option<String>,
    /// The Secret that holds the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// When the token in the Secret expires, as ACS said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_on: Option<Time>,
    /// When the token in the Secret was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// When the token will be replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    /// Scopes the token in the Secret was issued for; differs from spec.scopes after a change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_scopes: Vec<Scope>,
    /// Lifetime in minutes the token in the Secret was requested with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_lifetime_minutes: Option<i32>,
    /// Failures in a row since the last success; with lastFailureTime, backoff survives restarts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_attempts: i32,
    /// When the last failure happened; the next retry is paced from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// The value of the refresh-requested annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_refresh_request: Option<String>,
    /// The value of the revoke-requested annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_revoke_request: Option<String>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready: True while the Secret holds an unexpired token for the current spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // A map keyed by type, so server-side apply merges conditions instead of replacing the list.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

impl CommunicationIdentityStatus {
    /// The condition of this type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether the token in the Secret was issued for the scopes and lifetime `spec` asks for
    /// now; when not, a new token is due at once.
    pub fn token_matches(&self, spec: &CommunicationIdentitySpec) -> bool {
        let Ok(minutes) = spec.token_lifetime_minutes() else {
            return false;
        };
        self.token_lifetime_minutes == Some(minutes)
            && sorted(&self.token_scopes) == sorted(&spec.scopes)
    }
}

fn sorted(scopes: &[Scope]) -> Vec<Scope> {
    let mut scopes = scopes.to_vec();
    scopes.sort_unstable();
    scopes
}

/// A spec the schema should have rejected (an older CRD, or validation switched off).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    #[error(
        "{field} {value:?} is not a duration of whole hours and minutes such as \"24h\", \"90m\" or \"1h30m\""
    )]
    Duration { field: &'static str, value: String },
    #[error("tokenLifetime must be between 1h and 24h")]
    TokenLifetimeOutOfRange,
    #[error("refreshBefore must be at least 15m")]
    RefreshBeforeTooShort,
    #[error("refreshBefore must be less than tokenLifetime minus 15m")]
    RefreshBeforeTooLong,
    #[error("scopes must hold 1 to 5 values")]
    ScopeCount,
    #[error("scopes must be distinct")]
    DuplicateScopes,
}

impl CommunicationIdentitySpec {
    /// Every check the schema makes on fields the operator uses, in Rust.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        if self.scopes.is_empty() || self.scopes.len() > 5 {
            return Err(InvalidSpec::ScopeCount);
        }
        if sorted(&self.scopes)
            .windows(2)
            .any(|pair| pair[0] == pair[1])
        {
            return Err(InvalidSpec::DuplicateScopes);
        }
        self.refresh_before().map(drop)
    }

    /// The requested token lifetime, within 1h..=24h.
    pub fn token_lifetime(&self) -> Result<Duration, InvalidSpec> {
        let lifetime =
            parse_duration(&self.token_lifetime).ok_or_else(|| InvalidSpec::Duration {
                field: "tokenLifetime",
                value: self.token_lifetime.clone(),
            })?;
        if !(MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME).contains(&lifetime) {
            return Err(InvalidSpec::TokenLifetimeOutOfRange);
        }
        Ok(lifetime)
    }

    /// The requested token lifetime as ACS's `expiresInMinutes`.
    pub fn token_lifetime_minutes(&self) -> Result<i32, InvalidSpec> {
        // Bounded by 1440, so the conversion cannot fail.
        Ok((self.token_lifetime()?.as_secs() / 60) as i32)
    }

    /// How long before expiry to refresh: spec.refreshBefore, or one third of the lifetime.
    pub fn refresh_before(&self) -> Result<Duration, InvalidSpec> {
        let lifetime = self.token_lifetime()?;
        let Some(text) = &self.refresh_before else {
            return Ok(lifetime / 3);
        };
        let refresh_before = parse_duration(text).ok_or_else(|| InvalidSpec::Duration {
            field: "refreshBefore",
            value: text.clone(),
        })?;
        if refresh_before < MIN_REFRESH_BEFORE {
            return Err(InvalidSpec::RefreshBeforeTooShort);
        }
        if refresh_before >= lifetime.saturating_sub(MIN_TOKEN_USE) {
            return Err(InvalidSpec::RefreshBeforeTooLong);
        }
        Ok(refresh_before)
    }

    /// Scopes as the Secret's `scopes` key holds them: comma-joined, in spec order.
    pub fn scopes_joined(&self) -> String {
        let names: Vec<&str> = self.scopes.iter().map(|s| s.as_str()).collect();
        names.join(",")
    }

    /// The ACS identity to adopt; an empty string means "create one".
    pub fn adopted_identity_id(&self) -> Option<&str> {
        self.identity_id.as_deref().filter(|id| !id.is_empty())
    }
}

impl CommunicationIdentity {
    /// The Secret's name: spec.secretName, or `<metadata.name>-acs-token`.
    pub fn secret_name(&self) -> String {
        match &self.spec.secret_name {
            Some(name) => name.clone(),
            None => format!(
                "{}{DEFAULT_SECRET_SUFFIX}",
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }

    /// Whether an admin asked to release this resource without cleanup in ACS.
    pub fn skip_cleanup_requested(&self) -> bool {
        self.annotation(SKIP_CLEANUP_ANNOTATION) == Some("true")
    }

    /// A refresh-requested annotation value not yet acted on.
    pub fn pending_refresh_request(&self) -> Option<&str> {
        let handled = self
            .status
            .as_ref()
            .and_then(|s| s.handled_refresh_request.as_deref());
        self.annotation(REFRESH_REQUESTED_ANNOTATION)
            .filter(|v| Some(*v) != handled)
    }

    /// A revoke-requested annotation value not yet acted on.
    pub fn pending_revoke_request(&self) -> Option<&str> {
        let handled = self
            .status
            .as_ref()
            .and_then(|s| s.handled_revoke_request.as_deref());
        self.annotation(REVOKE_REQUESTED_ANNOTATION)
            .filter(|v| Some(*v) != handled)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
}

/// Parses "24h", "90m", "1h30m" (the forms the schema admits) into a duration.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (hours, minutes) = match text.split_once('h') {
        Some((hours, rest)) => (hours, rest),
        None => ("", text),
    };
    let minutes = if minutes.is_empty() {
        ""
    } else {
        minutes.strip_suffix('m')?
    };
    if hours.is_empty() && minutes.is_empty() {
        return None;
    }
    let number = |digits: &str| -> Option<u64> {
        if digits.is_empty() {
            Some(0)
        } else if digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse().ok()
        } else {
            None
        }
    };
    let total_minutes = number(hours)?
        .checked_mul(60)?
        .checked_add(number(minutes)?)?;
    Some(Duration::from_secs(total_minutes.checked_mul(60)?))
}

/// The CRD as checked in under `crds/`, printed by `acs-identity-operator crd`.
pub fn crd_yaml() -> String {
    let yaml = serde_yaml::to_string(&CommunicationIdentity::crd())
        .expect("a CustomResourceDefinition always serialises");
    format!("# Generated by `acs-identity-operator crd`; do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn spec(token_lifetime: &str, refresh_before: Option<&str>) -> CommunicationIdentitySpec {
        serde_json::from_value(json!({
            "connectionSecretRef": { "name": "acs-connection" },
            "scopes": ["chat", "voip"],
            "tokenLifetime": token_lifetime,
            "refreshBefore": refresh_before,
        }))
        .unwrap()
    }

    #[test]
    fn parses_the_durations_the_schema_admits() {
        let cases = [
            ("24h", Some(24 * HOUR)),
            ("90m", Some(90 * MINUTE)),
            ("1h30m", Some(90 * MINUTE)),
            ("0h15m", Some(15 * MINUTE)),
            ("", None),
            ("h", None),
            ("m", None),
            ("1h30", None),
            ("30m1h", None),
            ("1.5h", None),
            ("-1h", None),
            ("+1h", None),
            ("3600s", None),
            ("99999999999999999999h", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), expected, "{text:?}");
        }
    }

    #[test]
    fn spec_defaults_and_helpers() {
        let spec: CommunicationIdentitySpec = serde_json::from_value(json!({
            "connectionSecretRef": { "name": "acs-connection" },
            "scopes": ["voip", "chat.join.limited"],
        }))
        .unwrap();
        assert_eq!(spec.connection_secret_ref.key, "connectionString");
        assert_eq!(spec.token_lifetime(), Ok(24 * HOUR));
        assert_eq!(spec.token_lifetime_minutes(), Ok(1440));
        assert_eq!(spec.refresh_before(), Ok(8 * HOUR));
        assert_eq!(spec.deletion_policy, DeletionPolicy::Delete);
        assert_eq!(spec.scopes_joined(), "voip,chat.join.limited");
        assert_eq!(spec.adopted_identity_id(), None);
        assert_eq!(spec.validate(), Ok(()));
        // Defaults stay out of the serialised form, so server-side apply does not claim them.
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({
                "connectionSecretRef": { "name": "acs-connection", "key": "connectionString" },
                "scopes": ["voip", "chat.join.limited"],
                "tokenLifetime": "24h",
                "deletionPolicy": "Delete",
            })
        );
    }

    #[test]
    fn spec_validation_matches_the_schema_rules() {
        let cases = [
            ("defaults", spec("24h", None), Ok(())),
            (
                "1h with default refreshBefore 20m",
                spec("1h", None),
                Ok(()),
            ),
            (
                "refreshBefore at the lower bound",
                spec("1h", Some("15m")),
                Ok(()),
            ),
            (
                "refreshBefore just below lifetime - 15m",
                spec("24h", Some("23h44m")),
                Ok(()),
            ),
            (
                "lifetime too short",
                spec("59m", None),
                Err(InvalidSpec::TokenLifetimeOutOfRange),
            ),
            (
                "lifetime too long",
                spec("24h1m", None),
                Err(InvalidSpec::TokenLifetimeOutOfRange),
            ),
            (
                "refreshBefore too short",
                spec("24h", Some("14m")),
                Err(InvalidSpec::RefreshBeforeTooShort),
            ),
            (
                "refreshBefore = lifetime - 15m",
                spec("24h", Some("23h45m")),
                Err(InvalidSpec::RefreshBeforeTooLong),
            ),
            (
                "malformed lifetime",
                spec("1d", None),
                Err(InvalidSpec::Duration {
                    field: "tokenLifetime",
                    value: "1d".into(),
                }),
            ),
            (
                "malformed refreshBefore",
                spec("24h", Some("1s")),
                Err(InvalidSpec::Duration {
                    field: "refreshBefore",
                    value: "1s".into(),
                }),
            ),
        ];
        for (name, spec, expected) in cases {
            assert_eq!(spec.validate(), expected, "{name}");
        }

        let mut duplicate = spec("24h", None);
        duplicate.scopes = vec![Scope::Chat, Scope::Voip, Scope::Chat];
        assert_eq!(duplicate.validate(), Err(InvalidSpec::DuplicateScopes));
        let mut none = spec("24h", None);
        none.scopes.clear();
        assert_eq!(none.validate(), Err(InvalidSpec::ScopeCount));
    }

    #[test]
    fn scopes_serialise_as_acs_names() {
        let all = [
            Scope::Chat,
            Scope::Voip,
            Scope::ChatJoin,
            Scope::ChatJoinLimited,
            Scope::VoipJoin,
        ];
        let names: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "chat",
                "voip",
                "chat.join",
                "chat.join.limited",
                "voip.join"
            ]
        );
        assert_eq!(serde_json::to_value(all).unwrap(), json!(names));
        assert!(serde_json::from_value::<Scope>(json!("Chat")).is_err());
    }

    #[test]
    fn secret_name_defaults_to_the_resource_name() {
        let mut resource = CommunicationIdentity::new("alice", spec("24h", None));
        assert_eq!(resource.secret_name(), "alice-acs-token");
        resource.spec.secret_name = Some("custom".into());
        assert_eq!(resource.secret_name(), "custom");
    }

    #[test]
    fn empty_identity_id_means_create() {
        let mut spec = spec("24h", None);
        spec.identity_id = Some(String::new());
        assert_eq!(spec.adopted_identity_id(), None);
        spec.identity_id = Some("8:acs:r_1".into());
        assert_eq!(spec.adopted_identity_id(), Some("8:acs:r_1"));
    }

    #[test]
    fn annotation_requests_are_pending_until_handled() {
        let mut resource = CommunicationIdentity::new("alice", spec("24h", None));
        assert_eq!(resource.pending_refresh_request(), None);
        resource.metadata.annotations = Some(BTreeMap::from([
            (REFRESH_REQUESTED_ANNOTATION.to_owned(), "1".to_owned()),
            (REVOKE_REQUESTED_ANNOTATION.to_owned(), "a".to_owned()),
            (SKIP_CLEANUP_ANNOTATION.to_owned(), "true".to_owned()),
        ]));
        assert_eq!(resource.pending_refresh_request(), Some("1"));
        assert_eq!(resource.pending_revoke_request(), Some("a"));
        assert!(resource.skip_cleanup_requested());
        resource.status = Some(CommunicationIdentityStatus {
            handled_refresh_request: Some("1".into()),
            handled_revoke_request: Some("a".into()),
            ..Default::default()
        });
        assert_eq!(resource.pending_refresh_request(), None);
        assert_eq!(resource.pending_revoke_request(), None);
    }

    #[test]
    fn token_matches_the_spec_it_was_issued_for() {
        let spec = spec("24h", None);
        let issued = |scopes: Vec<Scope>, minutes| CommunicationIdentityStatus {
            token_scopes: scopes,
            token_lifetime_minutes: Some(minutes),
            ..Default::default()
        };
        let cases = [
            (
                "same scopes and lifetime",
                issued(vec![Scope::Chat, Scope::Voip], 1440),
                true,
            ),
            (
                "same scopes in another order",
                issued(vec![Scope::Voip, Scope::Chat], 1440),
                true,
            ),
            (
                "a scope added since",
                issued(vec![Scope::Chat], 1440),
                false,
            ),
            (
                "lifetime changed since",
                issued(vec![Scope::Chat, Scope::Voip], 60),
                false,
            ),
            (
                "no token yet",
                CommunicationIdentityStatus::default(),
                false,
            ),
        ];
        for (name, status, expected) in cases {
            assert_eq!(status.token_matches(&spec), expected, "{name}");
        }
    }

    fn schema() -> Value {
        let crd = serde_json::to_value(CommunicationIdentity::crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    /// Kubernetes accepts only structural schemas: every node typed, no references or
    /// combinators that the apiserver would reject.
    fn assert_structural(path: &str, node: &Value) {
        let object = node
            .as_object()
            .unwrap_or_else(|| panic!("{path} is not a schema object"));
        for forbidden in [
            "$ref",
            "oneOf",
            "anyOf",
            "allOf",
            "not",
            "uniqueItems",
            "definitions",
            "$defs",
        ] {
            assert!(!object.contains_key(forbidden), "{path} has {forbidden}");
        }
        assert!(object.contains_key("type"), "{path} has no type");
        for (name, child) in object
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            assert_structural(&format!("{path}.{name}"), child);
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = object.get(key) {
                assert_structural(&format!("{path}.{key}"), child);
            }
        }
    }

    #[test]
    fn schema_is_structural() {
        assert_structural("", &schema());
    }

    #[test]
    fn spec_fields_are_never_nullable() {
        // A null in a nullable field would reach the CEL rules as a value; without nullable the
        // apiserver prunes it as if absent.
        let spec = &schema()["properties"]["spec"]["properties"];
        for (name, field) in spec.as_object().unwrap() {
            assert!(field.get("nullable").is_none(), "spec.{name} is nullable");
        }
    }

    #[test]
    fn schema_carries_the_validation_rules() {
        let spec = &schema()["properties"]["spec"];
        let rules = |node: &Value| -> Vec<(String, String)> {
            node["x-kubernetes-validations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["rule"].as_str().unwrap().to_owned(),
                        r["message"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        let messages =
            |node: &Value| -> Vec<String> { rules(node).into_iter().map(|(_, m)| m).collect() };
        let fields = &spec["properties"];
        assert_eq!(messages(&fields["scopes"]), ["scopes must be distinct"]);
        assert_eq!(
            messages(&fields["tokenLifetime"]),
            [
                "tokenLifetime must be whole hours and/or minutes, such as 24h, 90m or 1h30m",
                "tokenLifetime must be between 1h and 24h",
            ]
        );
        assert_eq!(
            messages(&fields["refreshBefore"]),
            [
                "refreshBefore must be whole hours and/or minutes, such as 8h, 90m or 1h30m",
                "refreshBefore must be at least 15m",
            ]
        );
        assert_eq!(
            messages(&fields["identityId"]),
            ["identityId is immutable once set"]
        );
        assert_eq!(
            messages(spec),
            [
                "refreshBefore must be less than tokenLifetime minus 15m",
                "identityId can only be set when the resource is created, and cannot be removed",
            ]
        );
        assert_eq!(fields["scopes"]["minItems"], 1);
        assert_eq!(fields["scopes"]["maxItems"], 5);
        assert_eq!(fields["scopes"]["items"]["enum"], json!(wire_scopes()));
        assert_eq!(fields["tokenLifetime"]["default"], "24h");
        assert_eq!(
            fields["deletionPolicy"]["enum"],
            json!(["Delete", "RevokeTokens", "Retain"])
        );
        assert_eq!(fields["secretName"]["maxLength"], 253);
        assert_eq!(
            fields["connectionSecretRef"]["properties"]["key"]["default"],
            "connectionString"
        );
    }

    fn wire_scopes() -> &'static [&'static str] {
        acs::wire::SCOPES
    }

    #[test]
    fn printer_columns_and_names() {
        let crd = serde_json::to_value(CommunicationIdentity::crd()).unwrap();
        let names: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Ready",
                "Reason",
                "Identity",
                "Expires",
                "Next Refresh",
                "Age"
            ]
        );
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["commid"]));
        assert_eq!(
            crd["spec"]["versions"][0]["subresources"]["status"],
            json!({})
        );
    }
}
