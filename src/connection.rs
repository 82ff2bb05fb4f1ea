//! `AcsConnection` (namespaced) and `ClusterAcsConnection` (cluster-scoped): an ACS resource and
//! how to authenticate to it, defined once and referenced by `spec.connectionRef`, as
//! cert-manager's Issuer and ClusterIssuer or External Secrets' SecretStore and
//! ClusterSecretStore are. A cluster connection says which namespaces may use it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use kube::core::{Selector, SelectorExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{ConnectionKind, ConnectionSecretRef};
use crate::status::Failure;

/// Every way to authenticate that a connection may name, as the messages list them.
const AUTH_REQUIRED: &str =
    "set spec.accessKey: a Secret whose key holds the ACS resource's connection string";

/// An ACS resource and how to reach it, for the CommunicationIdentities of this namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "acs-operator.io",
    version = "v1alpha1",
    kind = "AcsConnection",
    plural = "acsconnections",
    shortname = "acsconn",
    namespaced,
    derive = "PartialEq",
    doc = "An Azure Communication Services resource and how to authenticate to it, for the CommunicationIdentities of its namespace.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    { "rule": "has(self.accessKey)", "message": AUTH_REQUIRED },
]))]
pub struct AcsConnectionSpec {
    /// Authenticate with the resource's access key: a Secret of this namespace holding its
    /// connection string (`endpoint=https://…;accesskey=…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<AccessKeyAuth>,
}

/// The access key of an [`AcsConnection`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessKeyAuth {
    /// The Secret, in the connection's namespace, and its key holding the connection string.
    pub secret_ref: ConnectionSecretRef,
}

/// An ACS resource and how to reach it, for the CommunicationIdentities of the namespaces it
/// allows.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "acs-operator.io",
    version = "v1alpha1",
    kind = "ClusterAcsConnection",
    plural = "clusteracsconnections",
    shortname = "clusteracsconn",
    derive = "PartialEq",
    doc = "An Azure Communication Services resource and how to authenticate to it, for the CommunicationIdentities of the namespaces it allows.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    { "rule": "has(self.accessKey)", "message": AUTH_REQUIRED },
]))]
pub struct ClusterAcsConnectionSpec {
    /// Authenticate with the resource's access key: a Secret holding its connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<ClusterAccessKeyAuth>,
    /// Which namespaces may use this connection: a namespace is allowed when it matches any
    /// condition. Without conditions every namespace may (as for an External Secrets
    /// ClusterSecretStore).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub conditions: Vec<NamespaceCondition>,
}

/// The access key of a [`ClusterAcsConnection`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAccessKeyAuth {
    /// The Secret and its key holding the connection string.
    pub secret_ref: ClusterSecretRef,
}

/// A Secret of any namespace, named by a cluster-scoped connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSecretRef {
    #[serde(flatten)]
    pub secret: ConnectionSecretRef,
    /// The Secret's namespace; the operator's own namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
}

/// Namespaces a [`ClusterAcsConnection`] allows: those its selector matches, and those it
/// names. A condition with neither allows none.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceCondition {
    /// Namespaces whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Namespaces by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub namespaces: Vec<String>,
}

/// Where a CommunicationIdentity's connection string is: a Secret and its key, and the
/// connection resource that names it (none: the identity's own `spec.connectionSecretRef`, a
/// Secret of its namespace that the operator holds with a finalizer while it is used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSource {
    pub namespace: String,
    pub secret: ConnectionSecretRef,
    /// `AcsConnection "name"` or `ClusterAcsConnection "name"`, for messages.
    pub via: Option<String>,
}

/// How messages name a connection resource.
pub fn label(kind: ConnectionKind, name: &str) -> String {
    format!("{} {name:?}", kind.as_str())
}

impl AcsConnection {
    /// Where this connection's connection string is, for an identity of its namespace.
    pub fn source(&self) -> Result<ConnectionSource, Failure> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let via = label(ConnectionKind::AcsConnection, &name);
        let Some(auth) = &self.spec.access_key else {
            return Err(Failure::ConnectionUnusable { connection: via });
        };
        Ok(ConnectionSource {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            secret: auth.secret_ref.clone(),
            via: Some(via),
        })
    }
}

impl ClusterAcsConnection {
    /// Where this connection's connection string is, for an identity of `namespace` (whose
    /// labels are `labels`): refused unless the connection allows that namespace. Its Secret is
    /// in `operator_namespace` unless it names another.
    pub fn source_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        operator_namespace: &str,
    ) -> Result<ConnectionSource, Failure> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let via = label(ConnectionKind::ClusterAcsConnection, &name);
        if !allows(&self.spec.conditions, namespace, labels) {
            return Err(Failure::NamespaceNotAllowed {
                connection: via,
                namespace: namespace.to_owned(),
            });
        }
        let Some(auth) = &self.spec.access_key else {
            return Err(Failure::ConnectionUnusable { connection: via });
        };
        let secret_namespace = auth.secret_ref.namespace.as_deref();
        Ok(ConnectionSource {
            namespace: secret_namespace.unwrap_or(operator_namespace).to_owned(),
            secret: auth.secret_ref.secret.clone(),
            via: Some(via),
        })
    }

    /// Whether deciding if a namespace is allowed needs its labels.
    pub fn selects_by_labels(&self) -> bool {
        let conditions = &self.spec.conditions;
        conditions.iter().any(|c| c.namespace_selector.is_some())
    }
}

/// Whether `conditions` allow the namespace `name` with `labels`. A selector that does not
/// parse (the API server accepts some that cannot match, such as `In` without values) matches
/// nothing: a mistake in a condition never opens a connection to more namespaces.
pub fn allows(
    conditions: &[NamespaceCondition],
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    if conditions.is_empty() {
        return true;
    }
    conditions.iter().any(|condition| {
        let named = condition.namespaces.iter().any(|allowed| allowed == name);
        let selected = condition
            .namespace_selector
            .clone()
            .is_some_and(|selector| {
                Selector::try_from(selector).is_ok_and(|selector| selector.matches(labels))
            });
        named || selected
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conditions(value: serde_json::Value) -> Vec<NamespaceCondition> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn namespaces_a_cluster_connection_allows() {
        let team = BTreeMap::from([("acs/allowed".to_owned(), "true".to_owned())]);
        let none = BTreeMap::new();
        let cases = [
            (
                "no conditions: every namespace",
                json!([]),
                "any",
                &none,
                true,
            ),
            (
                "named",
                json!([{ "namespaces": ["team-a", "team-b"] }]),
                "team-b",
                &none,
                true,
            ),
            (
                "not named",
                json!([{ "namespaces": ["team-a"] }]),
                "team-c",
                &none,
                false,
            ),
            (
                "labels match",
                json!([{ "namespaceSelector": { "matchLabels": { "acs/allowed": "true" } } }]),
                "team-c",
                &team,
                true,
            ),
            (
                "labels do not match",
                json!([{ "namespaceSelector": { "matchLabels": { "acs/allowed": "true" } } }]),
                "team-c",
                &none,
                false,
            ),
            (
                "an expression",
                json!([{ "namespaceSelector": { "matchExpressions": [
                    { "key": "acs/allowed", "operator": "Exists" }
                ] } }]),
                "team-c",
                &team,
                true,
            ),
            (
                "any condition",
                json!([{ "namespaces": ["team-a"] }, { "namespaces": ["team-c"] }]),
                "team-c",
                &none,
                true,
            ),
            (
                "a condition with neither allows none",
                json!([{}]),
                "team-c",
                &team,
                false,
            ),
            (
                "a selector that cannot parse matches nothing",
                json!([{ "namespaceSelector": { "matchExpressions": [
                    { "key": "acs/allowed", "operator": "In" }
                ] } }]),
                "team-c",
                &team,
                false,
            ),
        ];
        for (name, value, namespace, labels, expected) in cases {
            assert_eq!(
                allows(&conditions(value), namespace, labels),
                expected,
                "{name}"
            );
        }
    }
}
