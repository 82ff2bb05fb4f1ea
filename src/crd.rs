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

use crate::tokens::{self, TokenEntry};

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
/// Set by the operator, with its finalizer, just before it first sends a create to ACS: with no
/// `status.identityId` yet, that create's answer was lost, and deletion repeats the create (the
/// same customId answers with the same identity) to clean it up.
pub const CREATE_ATTEMPTED_ANNOTATION: &str = "acs-operator.io/identity-create-attempted";
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
    /// Event: the keys of tokens the spec no longer asks for were taken out of the Secret.
    pub const TOKENS_REMOVED: &str = "TokensRemoved";
    /// Event: a workload of spec.rolloutRestartTargets was restarted for new tokens.
    pub const WORKLOAD_RESTARTED: &str = "WorkloadRestarted";
    /// Warning event: a restart target does not exist.
    pub const RESTART_TARGET_NOT_FOUND: &str = "RestartTargetNotFound";
    /// Warning event: the operator may not patch a restart target (the chart's
    /// rolloutRestart.enabled grants it).
    pub const RESTART_FORBIDDEN: &str = "RestartForbidden";
    /// Warning event: the API server refused the restart of a target otherwise.
    pub const RESTART_FAILED: &str = "RestartFailed";
    /// Warning event: ACS returned a token that lives shorter than requested.
    pub const SHORT_TOKEN_LIFETIME: &str = "ShortTokenLifetime";
    /// Warning event: the skip-cleanup annotation released the resource without cleanup in ACS.
    pub const CLEANUP_SKIPPED: &str = "CleanupSkipped";
    /// Warning event: under a GA api-version (no customId) a create got no answer or was
    /// interrupted, and may have left an identity in ACS that no resource records.
    pub const POSSIBLE_ORPHAN_IDENTITY: &str = "PossibleOrphanIdentity";
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
    pub const ENDPOINT_NOT_ALLOWED: &str = "EndpointNotAllowed";
    pub const SECRET_WRITE_FAILED: &str = "SecretWriteFailed";
    pub const IDENTITY_IN_USE: &str = "IdentityInUse";
    /// `spec.connectionRef` names a connection that does not exist.
    pub const CONNECTION_NOT_FOUND: &str = "ConnectionNotFound";
    /// The ClusterAcsConnection named does not allow this namespace.
    pub const NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";
    /// The connection named has no way to authenticate that this operator supports.
    pub const CONNECTION_UNUSABLE: &str = "ConnectionUnusable";
    /// Microsoft Entra ID refused the connection's workload identity.
    pub const ENTRA_AUTHENTICATION_FAILED: &str = "EntraAuthenticationFailed";
    /// The federated token for Entra could not be had (the ServiceAccount, RBAC, the file).
    pub const FEDERATED_TOKEN_UNAVAILABLE: &str = "FederatedTokenUnavailable";

    // Failures that pass by themselves.
    pub const THROTTLED: &str = "Throttled";
    pub const ACS_UNAVAILABLE: &str = "AcsUnavailable";
    /// Microsoft Entra ID gave no token (unreachable, timeout, 5xx).
    pub const ENTRA_UNAVAILABLE: &str = "EntraUnavailable";
    /// Waiting in the ACS endpoint's queue: for budget, or for the endpoint to recover.
    pub const WAITING_FOR_ACS: &str = "WaitingForAcs";
}

/// Shortest token lifetime ACS issues (`expiresInMinutes` 60).
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// Longest token lifetime ACS issues (`expiresInMinutes` 1440).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// ACS SDKs refresh 10 minutes before expiry; refreshing later than 15 minutes before would race them.
pub const MIN_REFRESH_BEFORE: Duration = Duration::from_secs(15 * 60);
/// Default of spec.minRestartInterval: a few minutes, so a burst of token changes costs one
/// rollout, while a workload is never more than that behind.
pub const DEFAULT_MIN_RESTART_INTERVAL: Duration = Duration::from_secs(5 * 60);
const MIN_RESTART_INTERVAL: Duration = Duration::from_secs(60);
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
/// Longest DNS-1123 subdomain, as a Secret name or a key prefix, Kubernetes accepts.
const MAX_DNS_SUBDOMAIN_LENGTH: usize = 253;

/// A Kubernetes qualified name, as label and annotation keys must be: an optional DNS-1123
/// subdomain prefix and `/`, then a name of at most 63 characters. A regex cannot bound the
/// prefix to 253 characters; the rules using it check that apart. `[.]` rather than `\.` needs
/// no escaping inside a CEL string.
macro_rules! qualified_name_regex {
    () => {
        "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    };
}
/// A label value: empty, or at most 63 characters of the qualified name's name part.
macro_rules! label_value_regex {
    () => {
        "^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
    };
}
/// A Secret data key (Kubernetes' `IsConfigMapKey`, which also refuses `.` and a `..` prefix).
macro_rules! secret_data_key_regex {
    () => {
        "^[-._a-zA-Z0-9]+$"
    };
}
/// Longest Secret data key Kubernetes accepts.
const MAX_SECRET_KEY_LENGTH: usize = 253;
/// An ACS communication user id: `8:acs:<resource GUID>_<suffix>`, or the same under the
/// prefixes ACS's SDKs also read as communication users (legacy `spool`, US government clouds).
macro_rules! communication_user_id_regex {
    () => {
        "^8:(acs|spool|dod-acs|gcch-acs):[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}_[-._0-9A-Za-z]{1,128}$"
    };
}
const COMMUNICATION_USER_PREFIXES: [&str; 4] = ["8:acs:", "8:spool:", "8:dod-acs:", "8:gcch-acs:"];
const MAX_IDENTITY_SUFFIX_LENGTH: usize = 128;

/// Most labels, and most annotations, a Secret template may hold: bounds the cost the API
/// server estimates for the CEL rules that look at every key.
const MAX_TEMPLATE_ENTRIES: usize = 64;
/// Longest label value Kubernetes accepts.
const MAX_LABEL_VALUE_LENGTH: usize = 63;
/// Longest template annotation value, in characters; bounds the CEL cost of the size rule.
const MAX_ANNOTATION_VALUE_LENGTH: usize = 4096;
/// Most bytes (keys and values) the template's annotations may take together: half of the
/// 256 KiB Kubernetes allows all annotations of an object, leaving the rest to annotations that
/// others put on the Secret.
const MAX_ANNOTATIONS_SIZE: usize = 128 * 1024;
/// The operator's own label and annotation domain; no template key may start with it.
const RESERVED_KEY_PREFIX: &str = OPERATOR_ANNOTATION_PREFIX;

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
    // Deletion asks the API server whether any other resource still uses a connection Secret
    // with a field selector, instead of listing the whole namespace.
    selectable = ".spec.connectionSecretRef.name",
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
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // At the root, where metadata.name is visible. `optionalOldSelf` makes the rule run on
    // create too; an update passes if the old object already lacked secretName, so a resource
    // made under an older CRD can still have its status written and its finalizer removed.
    validation = kube::core::Rule::new(format!(
        "has(self.spec.secretName) \
         || size(self.metadata.name + '{DEFAULT_SECRET_SUFFIX}') <= {MAX_DNS_SUBDOMAIN_LENGTH} \
         || oldSelf.hasValue() && !has(oldSelf.value().spec.secretName)"
    ))
    .message(
        "metadata.name is too long for the default Secret name <metadata.name>-acs-token \
         (253 characters at most): shorten the name or set spec.secretName"
    )
    .optional_old_self(true)
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    refresh_before_below_lifetime_rule(),
    {
        "rule": "has(self.identityId) == has(oldSelf.identityId)",
        "message": "identityId can only be set when the resource is created, and cannot be removed",
    },
    {
        "rule": "has(self.scopes) != has(self.tokens)",
        "message": ONE_FORM_MESSAGE,
    },
    {
        "rule": "has(self.connectionSecretRef) != has(self.connectionRef)",
        "message": ONE_CONNECTION_MESSAGE,
    },
    {
        "rule": "!has(self.tokens) || !has(self.refreshBefore) && self.tokenLifetime == '24h'",
        "message": "with spec.tokens, set tokenLifetime and refreshBefore on each entry of spec.tokens, not on the spec",
    },
]))]
pub struct CommunicationIdentitySpec {
    /// The Secret, in this resource's namespace, that holds the ACS connection string. Exactly one of connectionSecretRef and connectionRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // `with` keeps the schema free of `nullable` (see refreshBefore).
    #[schemars(with = "ConnectionSecretRef")]
    pub connection_secret_ref: Option<ConnectionSecretRef>,

    /// An AcsConnection of this namespace, or a ClusterAcsConnection that allows it. Exactly one of connectionSecretRef and connectionRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "ConnectionRef")]
    pub connection_ref: Option<ConnectionRef>,

    /// Scopes of the one token (Secret keys token, expiresOn, scopes): 1 to 5 distinct values. Exactly one of scopes and tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 5))]
    #[schemars(extend("x-kubernetes-validations" = [distinct_scopes_rule()]))]
    pub scopes: Vec<Scope>,

    /// Lifetime of the token of spec.scopes, whole hours and/or minutes ("24h", "90m", "1h30m"), 1h to 24h.
    #[serde(default = "default_token_lifetime")]
    // maxLength bounds the cost the apiserver estimates for the CEL rules.
    #[schemars(length(max = 12))]
    #[schemars(extend("x-kubernetes-validations" = token_lifetime_rules()))]
    pub token_lifetime: String,

    /// How long before expiry the token of spec.scopes is replaced ("8h", "90m"): from 15m to below tokenLifetime minus 15m; default a third of tokenLifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // `with = "String"` keeps the schema free of `nullable`, so a null is pruned as absent
    // instead of reaching the CEL rules.
    #[schemars(with = "String", length(max = 12))]
    #[schemars(extend("x-kubernetes-validations" = refresh_before_rules()))]
    pub refresh_before: Option<String>,

    /// Several named tokens of the one identity, each with its own scopes and refresh schedule (Secret keys <name>.token, <name>.expiresOn, <name>.scopes): 1 to 8 entries with distinct names. Exactly one of scopes and tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = MAX_TOKENS))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(x, self.exists_one(y, x.name == y.name))",
            "message": "tokens names must be distinct: each names its own keys in the Secret",
        },
    ]))]
    pub tokens: Vec<NamedToken>,

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

    /// What happens in ACS when this resource is deleted. Default: Delete for an identity the
    /// operator created, RevokeTokens for an adopted one (spec.identityId): an identity the
    /// operator did not create is deleted only when asked for explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // `with` keeps the schema free of `nullable` and of a default, so "not set" stays visible.
    #[schemars(with = "DeletionPolicy")]
    pub deletion_policy: Option<DeletionPolicy>,

    /// Adopt this existing ACS identity (8:acs:<resource GUID>_<suffix>) instead of creating one; empty means create. Set only at creation; immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 256))]
    #[schemars(extend("x-kubernetes-validations" = [
        { "rule": "self == oldSelf", "message": "identityId is immutable once set" },
        {
            "rule": concat!("self == '' || self.matches('", communication_user_id_regex!(), "')"),
            "message": "identityId must be an ACS communication user id, 8:acs:<resource GUID>_<suffix>, as ACS returned it",
        },
    ]))]
    pub identity_id: Option<String>,

    /// Deployments, StatefulSets and DaemonSets of this namespace restarted (as `kubectl rollout restart` does) when the tokens in the Secret change, for workloads that read a token once at start. At most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RESTART_TARGETS))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(x, self.exists_one(y, x.kind == y.kind && x.name == y.name))",
            "message": "rolloutRestartTargets must name each workload once",
        },
    ]))]
    pub rollout_restart_targets: Vec<RestartTarget>,

    /// The shortest time between two restarts of the targets ("5m", "1h"), from 1m to 24h; default 5m. A revoke restarts them at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 12))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": concat!("self.matches('", duration_regex!(), "')"),
            "message": "minRestartInterval must be whole hours and/or minutes, such as 5m, 1h or 1h30m",
        },
        {
            "rule": concat!(
                "!self.matches('", duration_regex!(), "')",
                " || duration(self) >= duration('1m') && duration(self) <= duration('24h')",
            ),
            "message": "minRestartInterval must be between 1m and 24h",
        },
    ]))]
    pub min_restart_interval: Option<String>,
}

/// Most workloads `spec.rolloutRestartTargets` may name.
pub const MAX_RESTART_TARGETS: usize = 16;

/// A workload restarted when the tokens change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartTarget {
    pub kind: WorkloadKind,
    /// The workload's name, in the resource's namespace.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// The kinds of workload `kubectl rollout restart` restarts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }
}

fn default_token_lifetime() -> String {
    DEFAULT_TOKEN_LIFETIME.to_owned()
}

/// Most entries `spec.tokens` may hold.
pub const MAX_TOKENS: usize = 8;
/// Longest name of an entry of `spec.tokens` (a DNS label).
const MAX_TOKEN_NAME_LENGTH: usize = 63;
/// DNS-1123 label, as an entry's name: it prefixes its keys in the Secret.
const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
const ONE_CONNECTION_MESSAGE: &str = "set exactly one of spec.connectionSecretRef (a Secret of this namespace holding the connection string) and spec.connectionRef (an AcsConnection of this namespace, or a ClusterAcsConnection)";
const ONE_FORM_MESSAGE: &str = "set exactly one of spec.scopes (one token, under the Secret keys token, expiresOn and scopes) and spec.tokens (named tokens, under <name>.token, <name>.expiresOn and <name>.scopes)";

/// One named token of `spec.tokens`: its own scopes, lifetime and refresh schedule, under
/// `<name>.`-prefixed keys in the Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [refresh_before_below_lifetime_rule()]))]
pub struct NamedToken {
    /// Names the token's keys in the Secret (<name>.token, ...): a DNS label, unique in the list.
    #[schemars(length(min = 1, max = MAX_TOKEN_NAME_LENGTH), pattern(DNS_LABEL_PATTERN))]
    pub name: String,

    /// Token scopes: 1 to 5 distinct values.
    #[schemars(length(min = 1, max = 5))]
    #[schemars(extend("x-kubernetes-validations" = [distinct_scopes_rule()]))]
    pub scopes: Vec<Scope>,

    /// Lifetime of this token, whole hours and/or minutes ("24h", "90m", "1h30m"), 1h to 24h.
    #[serde(default = "default_token_lifetime")]
    #[schemars(length(max = 12))]
    #[schemars(extend("x-kubernetes-validations" = token_lifetime_rules()))]
    pub token_lifetime: String,

    /// How long before expiry this token is replaced ("8h", "90m"): from 15m to below tokenLifetime minus 15m; default a third of tokenLifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 12))]
    #[schemars(extend("x-kubernetes-validations" = refresh_before_rules()))]
    pub refresh_before: Option<String>,
}

// The rules `spec` and each entry of `spec.tokens` share, declared once.

fn distinct_scopes_rule() -> serde_json::Value {
    serde_json::json!({
        "rule": "self.all(x, self.exists_one(y, x == y))",
        "message": "scopes must be distinct",
    })
}

fn token_lifetime_rules() -> serde_json::Value {
    serde_json::json!([
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
    ])
}

fn refresh_before_rules() -> serde_json::Value {
    serde_json::json!([
        {
            "rule": concat!("self.matches('", duration_regex!(), "')"),
            "message": "refreshBefore must be whole hours and/or minutes, such as 8h, 90m or 1h30m",
        },
        {
            "rule": concat!("!self.matches('", duration_regex!(), "') || duration(self) >= duration('15m')"),
            "message": "refreshBefore must be at least 15m",
        },
    ])
}

/// On the object holding both fields.
fn refresh_before_below_lifetime_rule() -> serde_json::Value {
    serde_json::json!({
        "rule": concat!(
            "!has(self.refreshBefore)",
            " || !self.refreshBefore.matches('", duration_regex!(), "')",
            " || !self.tokenLifetime.matches('", duration_regex!(), "')",
            " || duration(self.refreshBefore) < duration(self.tokenLifetime) - duration('15m')",
        ),
        "message": "refreshBefore must be less than tokenLifetime minus 15m",
    })
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
    #[schemars(length(min = 1, max = MAX_SECRET_KEY_LENGTH))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": concat!("self.matches('", secret_data_key_regex!(), "') && self != '.' && !self.startsWith('..')"),
            "message": "connectionSecretRef.key must be a Secret data key: letters, digits, '-', '_' and '.', not '.' and not starting with '..'",
        },
    ]))]
    pub key: String,
}

fn default_connection_key() -> String {
    "connectionString".to_owned()
}

/// A connection resource: `AcsConnection` (in this namespace) or `ClusterAcsConnection`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRef {
    pub kind: ConnectionKind,
    /// Name of the connection.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConnectionKind {
    AcsConnection,
    ClusterAcsConnection,
}

impl ConnectionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::AcsConnection => "AcsConnection",
            ConnectionKind::ClusterAcsConnection => "ClusterAcsConnection",
        }
    }
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

/// Extra metadata for the Secret. The operator's own keys (the managed-by label, anything under
/// acs-operator.io/) are refused: the operator sets those itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretTemplate {
    /// At most 64 labels: keys are qualified names ([prefix/]name), values valid label values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAX_TEMPLATE_ENTRIES,
        "additionalProperties" = {
            "type": "string",
            "maxLength": MAX_LABEL_VALUE_LENGTH,
            "x-kubernetes-validations": [
                {
                    "rule": concat!("self.matches('", label_value_regex!(), "')"),
                    "message": "secretTemplate.labels values must be empty or letters, digits, '-', '_' and '.' that start and end with a letter or digit",
                },
            ],
        },
        "x-kubernetes-validations" = [
            {
                "rule": qualified_keys_rule(),
                "message": qualified_keys_message("secretTemplate.labels"),
            },
            {
                "rule": format!("self.all(k, k != '{MANAGED_BY_LABEL}' && !k.startsWith('{RESERVED_KEY_PREFIX}'))"),
                "message": format!("secretTemplate.labels must not set {MANAGED_BY_LABEL} or keys under {RESERVED_KEY_PREFIX}: the operator sets those itself"),
            },
        ],
    ))]
    pub labels: BTreeMap<String, String>,
    /// At most 64 annotations: keys are qualified names, values at most 4096 characters, 128 KiB in all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAX_TEMPLATE_ENTRIES,
        "additionalProperties" = { "type": "string", "maxLength": MAX_ANNOTATION_VALUE_LENGTH },
        "x-kubernetes-validations" = [
            {
                "rule": qualified_keys_rule(),
                "message": qualified_keys_message("secretTemplate.annotations"),
            },
            {
                "rule": format!("self.all(k, !k.startsWith('{RESERVED_KEY_PREFIX}'))"),
                "message": format!("secretTemplate.annotations must not set keys under {RESERVED_KEY_PREFIX}: the operator owns those"),
            },
            {
                "rule": format!("self.map(k, bytes(k).size() + bytes(self[k]).size()).sum() <= {MAX_ANNOTATIONS_SIZE}"),
                "message": "secretTemplate.annotations must take at most 128 KiB in all, keys and values",
            },
        ],
    ))]
    pub annotations: BTreeMap<String, String>,
}

/// CEL: every key of the map is a qualified name, its prefix (before the `/`) at most 253
/// characters (`indexOf` is -1 without one).
fn qualified_keys_rule() -> String {
    format!(
        "self.all(k, k.matches('{}') && k.indexOf('/') <= {MAX_DNS_SUBDOMAIN_LENGTH})",
        qualified_name_regex!()
    )
}

fn qualified_keys_message(field: &str) -> String {
    format!(
        "{field} keys must be qualified names: an optional DNS subdomain prefix (253 characters at \
         most) and '/', then a name of 1 to 63 letters, digits, '-', '_' and '.' that starts and \
         ends with a letter or digit, such as team or example.com/team"
    )
}

impl SecretTemplate {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }

    fn validate(&self) -> Result<(), InvalidSpec> {
        validate_keys("secretTemplate.labels", &self.labels, |key| {
            key == MANAGED_BY_LABEL || key.starts_with(RESERVED_KEY_PREFIX)
        })?;
        if let Some(key) = self.labels.iter().find_map(|(key, value)| {
            (!value.is_empty() && !is_qualified_name_part(value)).then_some(key)
        }) {
            return Err(InvalidSpec::LabelValue { key: key.clone() });
        }
        validate_keys("secretTemplate.annotations", &self.annotations, |key| {
            key.starts_with(RESERVED_KEY_PREFIX)
        })?;
        if let Some(key) = self.annotations.iter().find_map(|(key, value)| {
            (value.chars().count() > MAX_ANNOTATION_VALUE_LENGTH).then_some(key)
        }) {
            return Err(InvalidSpec::AnnotationValueTooLong { key: key.clone() });
        }
        let size = self
            .annotations
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum();
        if size > MAX_ANNOTATIONS_SIZE {
            return Err(InvalidSpec::AnnotationsTooLarge { size });
        }
        Ok(())
    }
}

/// The checks labels and annotations share: how many, and what their keys look like.
fn validate_keys(
    field: &'static str,
    entries: &BTreeMap<String, String>,
    is_reserved: impl Fn(&str) -> bool,
) -> Result<(), InvalidSpec> {
    if entries.len() > MAX_TEMPLATE_ENTRIES {
        return Err(InvalidSpec::TooManyTemplateEntries {
            field,
            count: entries.len(),
        });
    }
    for key in entries.keys() {
        if !is_qualified_name(key) {
            return Err(InvalidSpec::TemplateKey {
                field,
                key: key.clone(),
            });
        }
        if is_reserved(key) {
            return Err(InvalidSpec::ReservedTemplateKey {
                field,
                key: key.clone(),
            });
        }
    }
    Ok(())
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
    /// Each token of spec.tokens, by name; the fields above then tell the first expiry and the
    /// first refresh of them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tokens: Vec<TokenStatus>,
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
    /// The restarts of spec.rolloutRestartTargets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_restart: Option<RolloutRestartStatus>,
    /// Ready: True while the Secret holds an unexpired token for the current spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // A map keyed by type, so server-side apply merges conditions instead of replacing the list.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The restarts of spec.rolloutRestartTargets: a change of the tokens is pending until the
/// targets are restarted for it, which survives an operator restart.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartStatus {
    /// When the targets were last restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_time: Option<Time>,
    /// Since when the tokens have changed without a restart of the targets yet; the restart
    /// comes at lastRestartTime + minRestartInterval at the earliest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<Time>,
    /// The pending change is a revoke: the targets are restarted at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending_revoke: bool,
    /// The targets the last restart could not restart, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_targets: Vec<RestartFailure>,
}

/// A target the last restart could not restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartFailure {
    pub kind: WorkloadKind,
    pub name: String,
    /// RestartTargetNotFound, RestartForbidden or RestartFailed.
    pub reason: String,
    pub message: String,
}

/// One token of spec.tokens as issued.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// The entry's name.
    pub name: String,
    /// Scopes the token in the Secret was issued for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<Scope>,
    /// Lifetime in minutes the token was requested with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_lifetime_minutes: Option<i32>,
    /// When the token expires, as ACS said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_on: Option<Time>,
    /// When the token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// When the token will be replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

impl CommunicationIdentityStatus {
    /// The condition of this type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether every token in the Secret was issued for the scopes and lifetime `spec` asks
    /// for now.
    pub fn token_matches(&self, spec: &CommunicationIdentitySpec) -> bool {
        let states = tokens::token_states(self);
        spec.entries().iter().all(|entry| {
            tokens::token_state(&states, entry.name).is_some_and(|state| entry.matches(state))
        })
    }
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
    #[error(
        "connectionSecretRef.key {value:?} is not a Secret data key: use letters, digits, '-', '_' \
         and '.' (253 at most), not \".\" and not starting with \"..\""
    )]
    ConnectionSecretKey { value: String },
    #[error(
        "secretName {value:?} is not a DNS-1123 subdomain: use at most 253 lowercase letters, \
         digits, '-' and '.', starting and ending with a letter or digit"
    )]
    SecretName { value: String },
    #[error(
        "metadata.name is too long for the default Secret name <metadata.name>-acs-token \
         ({length} characters, 253 at most): shorten the name or set spec.secretName"
    )]
    DefaultSecretNameTooLong { length: usize },
    #[error("{field} holds {count} entries, more than the 64 allowed: remove some")]
    TooManyTemplateEntries { field: &'static str, count: usize },
    #[error(
        "{field} key {key:?} is not a qualified name: use an optional DNS subdomain prefix (253 \
         characters at most) and '/', then a name of 1 to 63 letters, digits, '-', '_' and '.' \
         that starts and ends with a letter or digit, such as team or example.com/team"
    )]
    TemplateKey { field: &'static str, key: String },
    #[error(
        "{field} key {key:?} is reserved for the operator, which sets its own keys on the Secret: \
         remove it"
    )]
    ReservedTemplateKey { field: &'static str, key: String },
    #[error(
        "secretTemplate.labels value of {key:?} is not a label value: use at most 63 letters, \
         digits, '-', '_' and '.' that start and end with a letter or digit, or leave it empty"
    )]
    LabelValue { key: String },
    #[error(
        "secretTemplate.annotations value of {key:?} is longer than 4096 characters: shorten it"
    )]
    AnnotationValueTooLong { key: String },
    #[error(
        "secretTemplate.annotations take {size} bytes, keys and values together, more than the \
         128 KiB allowed: shorten or remove some"
    )]
    AnnotationsTooLarge { size: usize },
    #[error("{ONE_CONNECTION_MESSAGE}")]
    Connection,
    #[error("{ONE_FORM_MESSAGE}")]
    TokenForm,
    #[error("minRestartInterval must be between 1m and 24h")]
    RestartIntervalOutOfRange,
    #[error(
        "with spec.tokens, set tokenLifetime and refreshBefore on each entry of spec.tokens, not on the spec"
    )]
    TopLevelTokenSettings,
    #[error("tokens must hold 1 to {MAX_TOKENS} entries")]
    TokenCount,
    #[error(
        "tokens name {value:?} is not a DNS label: use at most 63 lowercase letters, digits and \
         '-', starting and ending with a letter or digit"
    )]
    TokenName { value: String },
    #[error("tokens names must be distinct: {name:?} names two entries")]
    DuplicateTokenName { name: String },
    #[error("tokens entry {name:?}: {source}")]
    Token {
        name: String,
        source: Box<InvalidSpec>,
    },
    #[error(
        "identityId {value:?} is not an ACS communication user id: use the id ACS returned, \
         8:acs:<resource GUID>_<suffix>, or leave identityId out to create an identity"
    )]
    IdentityId { value: String },
}

/// What a spec reaches ACS through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection<'a> {
    /// `spec.connectionSecretRef`: a Secret of the resource's namespace.
    Secret(&'a ConnectionSecretRef),
    /// `spec.connectionRef`: an AcsConnection or ClusterAcsConnection.
    Named(&'a ConnectionRef),
}

impl CommunicationIdentitySpec {
    /// The one connection the spec names (the schema's one-of rule, in Rust).
    pub fn connection(&self) -> Result<Connection<'_>, InvalidSpec> {
        match (&self.connection_secret_ref, &self.connection_ref) {
            (Some(secret), None) => Ok(Connection::Secret(secret)),
            (None, Some(named)) => Ok(Connection::Named(named)),
            _ => Err(InvalidSpec::Connection),
        }
    }

    /// Every check the schema makes on fields the operator uses, in Rust.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        self.validate_tokens()?;
        if let Connection::Secret(reference) = self.connection()?
            && !is_secret_data_key(&reference.key)
        {
            let value = reference.key.clone();
            return Err(InvalidSpec::ConnectionSecretKey { value });
        }
        if let Some(name) = &self.secret_name
            && !is_dns_subdomain(name)
        {
            return Err(InvalidSpec::SecretName {
                value: name.clone(),
            });
        }
        self.secret_template.validate()?;
        self.min_restart_interval()?;
        match self.adopted_identity_id() {
            Some(id) if !is_communication_user_id(id) => Err(InvalidSpec::IdentityId {
                value: id.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// The tokens the spec asks for: the one of spec.scopes, or the entries of spec.tokens.
    pub fn entries(&self) -> Vec<TokenEntry<'_>> {
        if self.tokens.is_empty() {
            return vec![TokenEntry {
                name: "",
                scopes: &self.scopes,
                token_lifetime: &self.token_lifetime,
                refresh_before: self.refresh_before.as_deref(),
            }];
        }
        self.tokens
            .iter()
            .map(|token| TokenEntry {
                name: &token.name,
                scopes: &token.scopes,
                token_lifetime: &token.token_lifetime,
                refresh_before: token.refresh_before.as_deref(),
            })
            .collect()
    }

    /// One form or the other, and each token's own checks.
    fn validate_tokens(&self) -> Result<(), InvalidSpec> {
        if self.tokens.is_empty() {
            return self.entries()[0].validate();
        }
        if !self.scopes.is_empty() {
            return Err(InvalidSpec::TokenForm);
        }
        if self.refresh_before.is_some() || self.token_lifetime != DEFAULT_TOKEN_LIFETIME {
            return Err(InvalidSpec::TopLevelTokenSettings);
        }
        if self.tokens.len() > MAX_TOKENS {
            return Err(InvalidSpec::TokenCount);
        }
        for (index, entry) in self.entries().iter().enumerate() {
            if !is_dns_label(entry.name) {
                return Err(InvalidSpec::TokenName {
                    value: entry.name.to_owned(),
                });
            }
            if self.tokens[..index].iter().any(|t| t.name == entry.name) {
                return Err(InvalidSpec::DuplicateTokenName {
                    name: entry.name.to_owned(),
                });
            }
            entry.validate().map_err(|source| InvalidSpec::Token {
                name: entry.name.to_owned(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// The shortest time between two restarts of the targets: spec.minRestartInterval, or
    /// [`DEFAULT_MIN_RESTART_INTERVAL`].
    pub fn min_restart_interval(&self) -> Result<Duration, InvalidSpec> {
        let Some(text) = &self.min_restart_interval else {
            return Ok(DEFAULT_MIN_RESTART_INTERVAL);
        };
        let interval = parse_duration(text).ok_or_else(|| InvalidSpec::Duration {
            field: "minRestartInterval",
            value: text.clone(),
        })?;
        if !(MIN_RESTART_INTERVAL..=MAX_TOKEN_LIFETIME).contains(&interval) {
            return Err(InvalidSpec::RestartIntervalOutOfRange);
        }
        Ok(interval)
    }

    /// The deletion policy in force: spec.deletionPolicy, or the default for how the identity
    /// came to be (see the field).
    pub fn effective_deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy
            .unwrap_or(match self.adopted_identity_id() {
                Some(_) => DeletionPolicy::RevokeTokens,
                None => DeletionPolicy::Delete,
            })
    }

    /// The ACS identity to adopt; an empty string means "create one".
    pub fn adopted_identity_id(&self) -> Option<&str> {
        self.identity_id.as_deref().filter(|id| !id.is_empty())
    }
}

impl CommunicationIdentity {
    /// Every check the schema makes, in Rust: the spec's, and the default Secret name's, which
    /// only the whole resource can tell.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        self.spec.validate()?;
        // The API server keeps metadata.name a DNS-1123 subdomain, and the suffix keeps it one:
        // only the length can go wrong.
        let length = self.secret_name().len();
        if self.spec.secret_name.is_none() && length > MAX_DNS_SUBDOMAIN_LENGTH {
            return Err(InvalidSpec::DefaultSecretNameTooLong { length });
        }
        Ok(())
    }

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

    /// Whether the operator ever sent a create to ACS for this resource.
    pub fn create_attempted(&self) -> bool {
        self.annotation(CREATE_ATTEMPTED_ANNOTATION) == Some("true")
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

/// `qualified_name_regex!`, with the prefix's length bound.
fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(key),
    }
}

/// The name part of a qualified name, or a label value that is not empty: 1 to 63 of
/// `[-A-Za-z0-9_.]`, starting and ending with a letter or digit.
fn is_qualified_name_part(text: &str) -> bool {
    let bytes = text.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= MAX_LABEL_VALUE_LENGTH
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `DNS_LABEL_PATTERN`, at most 63 characters.
fn is_dns_label(text: &str) -> bool {
    text.len() <= MAX_TOKEN_NAME_LENGTH && !text.contains('.') && is_dns_subdomain(text)
}

/// `DNS_SUBDOMAIN_PATTERN`, at most 253 characters.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= MAX_DNS_SUBDOMAIN_LENGTH
        && text.split('.').all(|label| {
            let bytes = label.as_bytes();
            match (bytes.first(), bytes.last()) {
                (Some(first), Some(last)) => {
                    is_lower_alphanumeric(*first)
                        && is_lower_alphanumeric(*last)
                        && bytes.iter().all(|&b| is_lower_alphanumeric(b) || b == b'-')
                }
                _ => false,
            }
        })
}

fn is_lower_alphanumeric(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit()
}

/// `secret_data_key_regex!`, at most 253 characters, neither `.` nor starting with `..`.
fn is_secret_data_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_SECRET_KEY_LENGTH
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && key != "."
        && !key.starts_with("..")
}

/// `communication_user_id_regex!`.
fn is_communication_user_id(id: &str) -> bool {
    let Some(rest) = COMMUNICATION_USER_PREFIXES
        .iter()
        .find_map(|prefix| id.strip_prefix(prefix))
    else {
        return false;
    };
    // A GUID holds no '_', so the first one ends the resource id.
    let Some((resource, suffix)) = rest.split_once('_') else {
        return false;
    };
    is_guid(resource)
        && (1..=MAX_IDENTITY_SUFFIX_LENGTH).contains(&suffix.len())
        && suffix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hexadecimal digits of either case.
fn is_guid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|group| group.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|group| group.bytes().all(|b| b.is_ascii_hexdigit()))
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

/// All the CRDs as checked in under `crds/acs-operator.io.yaml`, printed by
/// `acs-identity-operator crd`: one YAML document each (CommunicationIdentity, AcsConnection,
/// ClusterAcsConnection), separated by `---` lines.
pub fn crd_yaml() -> String {
    use crate::connection::{AcsConnection, ClusterAcsConnection};
    // Long one-line strings stay on one line (only multi-line ones become `|` blocks): folded,
    // a CEL rule would be split wherever it has a space, and a diff would no longer show it whole.
    let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
    let crds = [
        CommunicationIdentity::crd(),
        AcsConnection::crd(),
        ClusterAcsConnection::crd(),
    ];
    let yaml = serde_saphyr::to_string_multiple_with_options(&crds, options)
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
        let reference = spec
            .connection_secret_ref
            .as_ref()
            .expect("connectionSecretRef");
        assert_eq!(reference.key, "connectionString");
        let token = spec.entries()[0];
        assert_eq!(token.token_lifetime(), Ok(24 * HOUR));
        assert_eq!(token.token_lifetime_minutes(), Ok(1440));
        assert_eq!(token.refresh_before(), Ok(8 * HOUR));
        assert_eq!(spec.deletion_policy, None);
        assert_eq!(spec.effective_deletion_policy(), DeletionPolicy::Delete);
        assert_eq!(token.scopes_joined(), "voip,chat.join.limited");
        assert_eq!(spec.adopted_identity_id(), None);
        assert_eq!(spec.validate(), Ok(()));
        // Defaults stay out of the serialised form, so server-side apply does not claim them.
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({
                "connectionSecretRef": { "name": "acs-connection", "key": "connectionString" },
                "scopes": ["voip", "chat.join.limited"],
                "tokenLifetime": "24h",
            })
        );
    }

    #[test]
    fn exactly_one_connection_is_named() {
        let secret = json!({ "name": "acs-connection" });
        let connection = json!({ "kind": "ClusterAcsConnection", "name": "shared" });
        let cases = [
            ("a Secret", json!({ "connectionSecretRef": secret }), Ok(())),
            (
                "a connection",
                json!({ "connectionRef": connection }),
                Ok(()),
            ),
            (
                "both",
                json!({ "connectionSecretRef": secret, "connectionRef": connection }),
                Err(InvalidSpec::Connection),
            ),
            ("neither", json!({}), Err(InvalidSpec::Connection)),
        ];
        for (name, connection, expected) in cases {
            let mut value = json!({ "scopes": ["chat"] });
            value
                .as_object_mut()
                .unwrap()
                .extend(connection.as_object().unwrap().clone());
            let spec: CommunicationIdentitySpec = serde_json::from_value(value).unwrap();
            assert_eq!(spec.validate(), expected, "{name}");
        }
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
    fn tokens_validation_matches_the_schema_rules() {
        let with_tokens = |tokens: Value, extra: Value| -> CommunicationIdentitySpec {
            let mut spec = json!({
                "connectionSecretRef": { "name": "acs-connection" },
                "tokens": tokens,
            });
            spec.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value(spec).unwrap()
        };
        let voip = json!({ "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" });
        let chat = json!({ "name": "chat", "scopes": ["chat"], "refreshBefore": "2h" });
        let entry_error = |name: &str, source: InvalidSpec| {
            Err(InvalidSpec::Token {
                name: name.into(),
                source: Box::new(source),
            })
        };
        let nine: Vec<Value> = (0..9)
            .map(|i| json!({ "name": format!("t{i}"), "scopes": ["chat"] }))
            .collect();
        let cases = [
            (
                "two entries",
                with_tokens(json!([voip, chat]), json!({})),
                Ok(()),
            ),
            (
                "both forms",
                with_tokens(json!([voip]), json!({ "scopes": ["chat"] })),
                Err(InvalidSpec::TokenForm),
            ),
            (
                "a spec-level refreshBefore",
                with_tokens(json!([voip]), json!({ "refreshBefore": "1h" })),
                Err(InvalidSpec::TopLevelTokenSettings),
            ),
            (
                "a spec-level tokenLifetime",
                with_tokens(json!([voip]), json!({ "tokenLifetime": "1h" })),
                Err(InvalidSpec::TopLevelTokenSettings),
            ),
            (
                "nine entries",
                with_tokens(json!(nine), json!({})),
                Err(InvalidSpec::TokenCount),
            ),
            (
                "a name that is no DNS label",
                with_tokens(
                    json!([{ "name": "Voice.1", "scopes": ["voip"] }]),
                    json!({}),
                ),
                Err(InvalidSpec::TokenName {
                    value: "Voice.1".into(),
                }),
            ),
            (
                "a name twice",
                with_tokens(json!([voip, voip]), json!({})),
                Err(InvalidSpec::DuplicateTokenName {
                    name: "voip".into(),
                }),
            ),
            (
                "an entry's lifetime out of range",
                with_tokens(
                    json!([{ "name": "voip", "scopes": ["voip"], "tokenLifetime": "25h" }]),
                    json!({}),
                ),
                entry_error("voip", InvalidSpec::TokenLifetimeOutOfRange),
            ),
            (
                "an entry's refreshBefore too long for its lifetime",
                with_tokens(
                    json!([{ "name": "chat", "scopes": ["chat"], "tokenLifetime": "1h", "refreshBefore": "50m" }]),
                    json!({}),
                ),
                entry_error("chat", InvalidSpec::RefreshBeforeTooLong),
            ),
            (
                "an entry with a scope twice",
                with_tokens(
                    json!([{ "name": "chat", "scopes": ["chat", "chat"] }]),
                    json!({}),
                ),
                entry_error("chat", InvalidSpec::DuplicateScopes),
            ),
        ];
        for (name, spec, expected) in cases {
            assert_eq!(spec.validate(), expected, "{name}");
        }
        assert_eq!(
            InvalidSpec::Token {
                name: "chat".into(),
                source: Box::new(InvalidSpec::RefreshBeforeTooLong)
            }
            .to_string(),
            "tokens entry \"chat\": refreshBefore must be less than tokenLifetime minus 15m"
        );
    }

    #[test]
    fn min_restart_interval_defaults_to_five_minutes_within_bounds() {
        let interval = |value: Value| spec_with(json!({ "minRestartInterval": value }));
        let cases = [
            ("default", spec_with(json!({})), Ok(5 * MINUTE)),
            ("an hour", interval(json!("1h")), Ok(HOUR)),
            ("a minute", interval(json!("1m")), Ok(MINUTE)),
            (
                "none at all",
                interval(json!("0m")),
                Err(InvalidSpec::RestartIntervalOutOfRange),
            ),
            (
                "seconds",
                interval(json!("30s")),
                Err(InvalidSpec::Duration {
                    field: "minRestartInterval",
                    value: "30s".into(),
                }),
            ),
        ];
        for (name, spec, expected) in cases {
            assert_eq!(spec.min_restart_interval(), expected, "{name}");
            assert_eq!(spec.validate(), expected.map(drop), "{name}");
        }
    }

    /// A valid spec with `extra` merged over it, as the API server would hand it over.
    fn spec_with(extra: Value) -> CommunicationIdentitySpec {
        let mut spec = json!({
            "connectionSecretRef": { "name": "acs-connection" },
            "scopes": ["chat"],
        });
        for (key, value) in extra.as_object().unwrap() {
            spec[key] = value.clone();
        }
        serde_json::from_value(spec).unwrap()
    }

    fn labels(entries: Value) -> Value {
        json!({ "secretTemplate": { "labels": entries } })
    }

    fn annotations(entries: Value) -> Value {
        json!({ "secretTemplate": { "annotations": entries } })
    }

    /// `count` entries `k0`, `k1`, ... holding `value`.
    fn entries(count: usize, value: &str) -> Value {
        (0..count)
            .map(|i| (format!("k{i}"), json!(value)))
            .collect()
    }

    #[test]
    fn template_validation_matches_the_schema_rules() {
        const LABELS: &str = "secretTemplate.labels";
        const ANNOTATIONS: &str = "secretTemplate.annotations";
        let key_error = |field, key: &str| {
            Err(InvalidSpec::TemplateKey {
                field,
                key: key.into(),
            })
        };
        let reserved = |field, key: &str| {
            Err(InvalidSpec::ReservedTemplateKey {
                field,
                key: key.into(),
            })
        };
        let prefix_253 = format!("{}.{}", vec!["a".repeat(50); 4].join("."), "b".repeat(49));
        let four_kib = "x".repeat(4096);
        let cases = [
            (
                "label keys with and without a prefix, values empty or not",
                labels(json!({ "team": "chat", "example.com/tier": "", "A_b.c-9": "X" })),
                Ok(()),
            ),
            (
                "label key with a space",
                labels(json!({ "bad key!": "v" })),
                key_error(LABELS, "bad key!"),
            ),
            (
                "label key name of 63",
                labels(json!({ "a".repeat(63): "v" })),
                Ok(()),
            ),
            (
                "label key name of 64",
                labels(json!({ "a".repeat(64): "v" })),
                key_error(LABELS, &"a".repeat(64)),
            ),
            (
                "label key prefix of 253",
                labels(json!({ format!("{prefix_253}/team"): "v" })),
                Ok(()),
            ),
            (
                "label key prefix of 254",
                labels(json!({ format!("{prefix_253}c/team"): "v" })),
                key_error(LABELS, &format!("{prefix_253}c/team")),
            ),
            (
                "label key prefix in upper case",
                labels(json!({ "Example.com/team": "v" })),
                key_error(LABELS, "Example.com/team"),
            ),
            (
                "label key with an empty prefix",
                labels(json!({ "/team": "v" })),
                key_error(LABELS, "/team"),
            ),
            (
                "label key with an empty name",
                labels(json!({ "example.com/": "v" })),
                key_error(LABELS, "example.com/"),
            ),
            (
                "label key with two slashes",
                labels(json!({ "a/b/c": "v" })),
                key_error(LABELS, "a/b/c"),
            ),
            (
                "label key ending in a dot",
                labels(json!({ "team.": "v" })),
                key_error(LABELS, "team."),
            ),
            (
                "the managed-by label",
                labels(json!({ MANAGED_BY_LABEL: "me" })),
                reserved(LABELS, MANAGED_BY_LABEL),
            ),
            (
                "a label under acs-operator.io/",
                labels(json!({ "acs-operator.io/team": "v" })),
                reserved(LABELS, "acs-operator.io/team"),
            ),
            (
                "label value of 63",
                labels(json!({ "team": "a".repeat(63) })),
                Ok(()),
            ),
            (
                "label value of 70",
                labels(json!({ "team": "a".repeat(70) })),
                Err(InvalidSpec::LabelValue { key: "team".into() }),
            ),
            (
                "label value starting with a dash",
                labels(json!({ "team": "-chat" })),
                Err(InvalidSpec::LabelValue { key: "team".into() }),
            ),
            (
                "label value with a slash",
                labels(json!({ "team": "a/b" })),
                Err(InvalidSpec::LabelValue { key: "team".into() }),
            ),
            ("64 labels", labels(entries(64, "v")), Ok(())),
            (
                "65 labels",
                labels(entries(65, "v")),
                Err(InvalidSpec::TooManyTemplateEntries {
                    field: LABELS,
                    count: 65,
                }),
            ),
            (
                "annotation values of any text",
                annotations(json!({ "example.com/note": "é, spaces, / and {json}", "empty": "" })),
                Ok(()),
            ),
            (
                "annotation key with a space",
                annotations(json!({ "bad key!": "v" })),
                key_error(ANNOTATIONS, "bad key!"),
            ),
            (
                "an annotation under acs-operator.io/",
                annotations(json!({ REFRESH_REQUESTED_ANNOTATION: "1" })),
                reserved(ANNOTATIONS, REFRESH_REQUESTED_ANNOTATION),
            ),
            (
                "a managed-by annotation (only the label is the operator's)",
                annotations(json!({ MANAGED_BY_LABEL: "me" })),
                Ok(()),
            ),
            (
                "annotation value of 4096 two-byte characters",
                annotations(json!({ "note": "é".repeat(4096) })),
                Ok(()),
            ),
            (
                "annotation value of 4097 characters",
                annotations(json!({ "note": "x".repeat(4097) })),
                Err(InvalidSpec::AnnotationValueTooLong { key: "note".into() }),
            ),
            (
                "annotations of 31 x 4 KiB",
                annotations(entries(31, &four_kib)),
                Ok(()),
            ),
            (
                "annotations of 33 x 4 KiB, over 128 KiB",
                annotations(entries(33, &four_kib)),
                Err(InvalidSpec::AnnotationsTooLarge {
                    // 10 keys k0..k9 of 2 bytes, 23 of 3.
                    size: 33 * 4096 + 10 * 2 + 23 * 3,
                }),
            ),
            (
                "65 annotations",
                annotations(entries(65, "v")),
                Err(InvalidSpec::TooManyTemplateEntries {
                    field: ANNOTATIONS,
                    count: 65,
                }),
            ),
        ];
        for (name, extra, expected) in cases {
            assert_eq!(spec_with(extra).validate(), expected, "{name}");
        }
    }

    #[test]
    fn name_and_id_validation_matches_the_schema_rules() {
        let connection_key =
            |key: &str| json!({ "connectionSecretRef": { "name": "acs", "key": key } });
        let key_error = |key: &str| Err(InvalidSpec::ConnectionSecretKey { value: key.into() });
        let secret_name = |name: &str| json!({ "secretName": name });
        let name_error = |name: &str| Err(InvalidSpec::SecretName { value: name.into() });
        let identity = |id: &str| json!({ "identityId": id });
        let id_error = |id: &str| Err(InvalidSpec::IdentityId { value: id.into() });
        const GUID: &str = "bbbcbc1e-9f06-482a-b5d8-20e3f26ef0cd";
        let cases = [
            (
                "connection key with dots, dashes, underscores",
                connection_key("conn-string_1.txt"),
                Ok(()),
            ),
            (
                "connection key starting with a dot",
                connection_key(".env"),
                Ok(()),
            ),
            (
                "connection key of 253",
                connection_key(&"k".repeat(253)),
                Ok(()),
            ),
            (
                "connection key of 254",
                connection_key(&"k".repeat(254)),
                key_error(&"k".repeat(254)),
            ),
            (
                "connection key with a slash",
                connection_key("bad/key"),
                key_error("bad/key"),
            ),
            (
                "connection key with a space",
                connection_key("a key"),
                key_error("a key"),
            ),
            ("connection key .", connection_key("."), key_error(".")),
            ("connection key ..", connection_key(".."), key_error("..")),
            (
                "connection key starting with ..",
                connection_key("..data"),
                key_error("..data"),
            ),
            ("connection key empty", connection_key(""), key_error("")),
            (
                "secretName with dots and dashes",
                secret_name("alice.chat-token"),
                Ok(()),
            ),
            ("secretName of 253", secret_name(&"s".repeat(253)), Ok(())),
            (
                "secretName of 254",
                secret_name(&"s".repeat(254)),
                name_error(&"s".repeat(254)),
            ),
            (
                "secretName in upper case",
                secret_name("Alice"),
                name_error("Alice"),
            ),
            (
                "secretName with an empty label",
                secret_name("a..b"),
                name_error("a..b"),
            ),
            (
                "secretName ending in a dash",
                secret_name("alice-"),
                name_error("alice-"),
            ),
            ("identityId empty: create one", identity(""), Ok(())),
            (
                "identityId as the emulator mints it",
                identity(
                    "8:acs:0d3c0f6e-8f0a-4c2e-9a53-1f8b9d1a2b3c_00000001-0002-0003-0004-000000000005",
                ),
                Ok(()),
            ),
            (
                "identityId as Microsoft's docs show it",
                identity(
                    "8:acs:8540c0de-899f-5cce-acb5-3ec493af3800_c94ff260-162d-46d6-94fd-e79f4d213715",
                ),
                Ok(()),
            ),
            (
                "identityId with 32 hex digits and more after the resource",
                identity(&format!(
                    "8:acs:{GUID}_0000000a1b2c3d4e5f60718293a4b5c6-dd4e-4a7e"
                )),
                Ok(()),
            ),
            (
                "identityId with an upper-case GUID",
                identity(&format!("8:acs:{}_1", GUID.to_uppercase())),
                Ok(()),
            ),
            (
                "identityId in the GCC High cloud",
                identity(&format!("8:gcch-acs:{GUID}_{GUID}")),
                Ok(()),
            ),
            (
                "identityId in the DoD cloud",
                identity(&format!("8:dod-acs:{GUID}_{GUID}")),
                Ok(()),
            ),
            (
                "identityId of a legacy spool user",
                identity(&format!("8:spool:{GUID}_{GUID}")),
                Ok(()),
            ),
            (
                "identityId with a suffix of 128",
                identity(&format!("8:acs:{GUID}_{}", "a".repeat(128))),
                Ok(()),
            ),
            (
                "identityId not an ACS id",
                identity("not-an-acs-id"),
                id_error("not-an-acs-id"),
            ),
            (
                "identityId without a GUID",
                identity("8:acs:r_1"),
                id_error("8:acs:r_1"),
            ),
            (
                "identityId of a Teams user",
                identity(&format!("8:orgid:{GUID}")),
                id_error(&format!("8:orgid:{GUID}")),
            ),
            (
                "identityId without a suffix",
                identity(&format!("8:acs:{GUID}_")),
                id_error(&format!("8:acs:{GUID}_")),
            ),
            (
                "identityId without the underscore",
                identity(&format!("8:acs:{GUID}")),
                id_error(&format!("8:acs:{GUID}")),
            ),
            (
                "identityId with a suffix of 129",
                identity(&format!("8:acs:{GUID}_{}", "a".repeat(129))),
                id_error(&format!("8:acs:{GUID}_{}", "a".repeat(129))),
            ),
            (
                "identityId with a slash in the suffix",
                identity(&format!("8:acs:{GUID}_a/b")),
                id_error(&format!("8:acs:{GUID}_a/b")),
            ),
            (
                "identityId with a short GUID group",
                identity("8:acs:bbbcbc1e-9f06-482a-b5d8-20e3f26ef0c_1"),
                id_error("8:acs:bbbcbc1e-9f06-482a-b5d8-20e3f26ef0c_1"),
            ),
            (
                "identityId with a non-hex GUID",
                identity("8:acs:gbbcbc1e-9f06-482a-b5d8-20e3f26ef0cd_1"),
                id_error("8:acs:gbbcbc1e-9f06-482a-b5d8-20e3f26ef0cd_1"),
            ),
        ];
        for (name, extra, expected) in cases {
            assert_eq!(spec_with(extra).validate(), expected, "{name}");
        }
    }

    #[test]
    fn resource_validation_checks_the_default_secret_name() {
        let resource =
            |name: &str, extra: Value| CommunicationIdentity::new(name, spec_with(extra));
        let longest = "a".repeat(MAX_DNS_SUBDOMAIN_LENGTH - DEFAULT_SECRET_SUFFIX.len());
        let too_long = format!("{longest}a");
        let cases = [
            (
                "default Secret name of 253",
                resource(&longest, json!({})),
                Ok(()),
            ),
            (
                "default Secret name of 254",
                resource(&too_long, json!({})),
                Err(InvalidSpec::DefaultSecretNameTooLong { length: 254 }),
            ),
            (
                "a long name with secretName set",
                resource(&too_long, json!({ "secretName": "short" })),
                Ok(()),
            ),
            (
                "the spec's own checks",
                resource("alice", json!({ "identityId": "not-an-acs-id" })),
                Err(InvalidSpec::IdentityId {
                    value: "not-an-acs-id".into(),
                }),
            ),
        ];
        for (name, resource, expected) in cases {
            assert_eq!(resource.validate(), expected, "{name}");
        }
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
            [
                "identityId is immutable once set",
                "identityId must be an ACS communication user id, 8:acs:<resource GUID>_<suffix>, as ACS returned it",
            ]
        );
        assert_eq!(
            messages(&fields["connectionSecretRef"]["properties"]["key"]),
            [
                "connectionSecretRef.key must be a Secret data key: letters, digits, '-', '_' and '.', not '.' and not starting with '..'"
            ]
        );
        let qualified_keys = |field: &str| {
            format!(
                "{field} keys must be qualified names: an optional DNS subdomain prefix (253 \
                 characters at most) and '/', then a name of 1 to 63 letters, digits, '-', '_' and \
                 '.' that starts and ends with a letter or digit, such as team or example.com/team"
            )
        };
        let template = &fields["secretTemplate"]["properties"];
        let labels = &template["labels"];
        assert_eq!(
            messages(labels),
            [
                qualified_keys("secretTemplate.labels"),
                "secretTemplate.labels must not set app.kubernetes.io/managed-by or keys under acs-operator.io/: the operator sets those itself".to_owned(),
            ]
        );
        assert_eq!(
            messages(&labels["additionalProperties"]),
            [
                "secretTemplate.labels values must be empty or letters, digits, '-', '_' and '.' that start and end with a letter or digit"
            ]
        );
        assert_eq!(labels["maxProperties"], 64);
        assert_eq!(labels["additionalProperties"]["maxLength"], 63);
        let annotations = &template["annotations"];
        assert_eq!(
            messages(annotations),
            [
                qualified_keys("secretTemplate.annotations"),
                "secretTemplate.annotations must not set keys under acs-operator.io/: the operator owns those".to_owned(),
                "secretTemplate.annotations must take at most 128 KiB in all, keys and values".to_owned(),
            ]
        );
        assert_eq!(annotations["maxProperties"], 64);
        assert_eq!(annotations["additionalProperties"]["maxLength"], 4096);
        // At the root, the only place metadata.name is visible; it must also run on create.
        let root = &schema();
        assert_eq!(
            messages(root),
            [
                "metadata.name is too long for the default Secret name <metadata.name>-acs-token (253 characters at most): shorten the name or set spec.secretName"
            ]
        );
        assert_eq!(root["x-kubernetes-validations"][0]["optionalOldSelf"], true);
        assert_eq!(
            messages(spec),
            [
                "refreshBefore must be less than tokenLifetime minus 15m",
                "identityId can only be set when the resource is created, and cannot be removed",
                "set exactly one of spec.scopes (one token, under the Secret keys token, expiresOn and scopes) and spec.tokens (named tokens, under <name>.token, <name>.expiresOn and <name>.scopes)",
                ONE_CONNECTION_MESSAGE,
                "with spec.tokens, set tokenLifetime and refreshBefore on each entry of spec.tokens, not on the spec",
            ]
        );
        let tokens = &fields["tokens"];
        assert_eq!(
            messages(tokens),
            ["tokens names must be distinct: each names its own keys in the Secret"]
        );
        assert_eq!(
            (&tokens["minItems"], &tokens["maxItems"]),
            (&json!(1), &json!(8))
        );
        let entry = &tokens["items"];
        assert_eq!(
            messages(entry),
            ["refreshBefore must be less than tokenLifetime minus 15m"]
        );
        let entry_fields = &entry["properties"];
        assert_eq!(entry["required"], json!(["name", "scopes"]));
        assert_eq!(entry_fields["name"]["maxLength"], 63);
        assert_eq!(
            messages(&entry_fields["scopes"]),
            ["scopes must be distinct"]
        );
        assert_eq!(
            messages(&entry_fields["tokenLifetime"]),
            messages(&fields["tokenLifetime"]),
            "an entry's tokenLifetime is checked as spec.tokenLifetime"
        );
        assert_eq!(
            messages(&entry_fields["refreshBefore"]),
            messages(&fields["refreshBefore"])
        );
        assert_eq!(entry_fields["tokenLifetime"]["default"], "24h");
        let targets = &fields["rolloutRestartTargets"];
        assert_eq!(
            messages(targets),
            ["rolloutRestartTargets must name each workload once"]
        );
        assert_eq!(targets["maxItems"], 16);
        assert_eq!(
            targets["items"]["properties"]["kind"]["enum"],
            json!(["Deployment", "StatefulSet", "DaemonSet"])
        );
        assert_eq!(
            messages(&fields["minRestartInterval"]),
            [
                "minRestartInterval must be whole hours and/or minutes, such as 5m, 1h or 1h30m",
                "minRestartInterval must be between 1m and 24h",
            ]
        );
        assert!(
            spec["required"]
                .as_array()
                .is_none_or(|required| !required.contains(&json!("scopes"))),
            "scopes is one of two forms"
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
