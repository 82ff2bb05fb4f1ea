//! `AcsConnection` (namespaced) and `ClusterAcsConnection` (cluster-scoped): an ACS resource and
//! how to authenticate to it, defined once and referenced by `spec.connectionRef`, as
//! cert-manager's Issuer and ClusterIssuer or External Secrets' SecretStore and
//! ClusterSecretStore are. A cluster connection says which namespaces may use it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use kube::core::{Selector, SelectorExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use acs::ApiVersionPolicy;
use acs::entra::TOKEN_EXCHANGE_AUDIENCE;

use crate::crd::{ConnectionKind, ConnectionSecretRef};
use crate::status::Failure;

/// Every way to authenticate that a connection may name, as the messages list them.
const AUTH_REQUIRED: &str = "set exactly one of spec.accessKey (a Secret whose key holds the ACS resource's connection string) and spec.workloadIdentity (a Microsoft Entra ID application, with spec.endpoint)";
const ENDPOINT_WITH_WORKLOAD_IDENTITY: &str = "set spec.endpoint (https://<resource>.communication.azure.com) with spec.workloadIdentity, and only then: an access key's connection string names its own endpoint";
/// A namespace must not borrow the operator's own federated identity (its token file) or a
/// ServiceAccount of another namespace: only a cluster connection, made by the cluster's
/// admins, may.
const NAMESPACED_TOKEN_SOURCE: &str = "an AcsConnection's workload identity uses a ServiceAccount of its own namespace: spec.workloadIdentity.tokenFile and serviceAccountRef.namespace are for ClusterAcsConnection";

// The rules both connection kinds share.
fn one_auth_rule() -> serde_json::Value {
    serde_json::json!({ "rule": "has(self.accessKey) != has(self.workloadIdentity)", "message": AUTH_REQUIRED })
}

fn endpoint_rule() -> serde_json::Value {
    serde_json::json!({ "rule": "has(self.endpoint) == has(self.workloadIdentity)", "message": ENDPOINT_WITH_WORKLOAD_IDENTITY })
}

/// An ACS resource and how to reach it, for the CommunicationIdentities of this namespace.
// Clippy reads the repeated `type_ = "string"` inside the printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "acs-operator.io",
    version = "v1alpha1",
    kind = "AcsConnection",
    plural = "acsconnections",
    shortname = "acsconn",
    namespaced,
    derive = "PartialEq",
    status = "ConnectionStatus",
    doc = "An Azure Communication Services resource and how to authenticate to it, for the CommunicationIdentities of its namespace.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Auth", type_ = "string", json_path = ".status.authentication"),
    printcolumn(
        name = "API Version",
        type_ = "string",
        json_path = ".status.apiVersion"
    ),
    printcolumn(
        name = "Identities",
        type_ = "integer",
        json_path = ".status.identities"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    one_auth_rule(),
    endpoint_rule(),
    {
        "rule": "!has(self.workloadIdentity) || !has(self.workloadIdentity.tokenFile) && (!has(self.workloadIdentity.serviceAccountRef) || !has(self.workloadIdentity.serviceAccountRef.namespace))",
        "message": NAMESPACED_TOKEN_SOURCE,
    },
]))]
pub struct AcsConnectionSpec {
    /// The ACS resource's endpoint, `https://<resource>.communication.azure.com`, with
    /// workloadIdentity (an access key's connection string names its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), pattern(r"^https?://[^/?#]+/?$"))]
    pub endpoint: Option<String>,
    /// Authenticate with the resource's access key: a Secret of this namespace holding its
    /// connection string (`endpoint=https://…;accesskey=…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<AccessKeyAuth>,
    /// Authenticate with Microsoft Entra ID: a ServiceAccount token of this namespace is
    /// exchanged for an Entra token of the application, which needs a role on the ACS resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentityAuth>,
    /// Pins the ACS api-version. Unset, the operator uses the preview with `customId`
    /// (exactly-once creates) while the service accepts it, then the newest GA version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = acs::wire::API_VERSIONS))]
    pub api_version: Option<String>,
}

/// What the operator last saw of a connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// `AccessKey` or `WorkloadIdentity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<String>,
    /// The ACS api-version its requests go out with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// CommunicationIdentities that name it in spec.connectionRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<u32>,
    /// When its credentials were last tried against ACS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_time: Option<Time>,
    /// The generation last verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (credentials accepted by ACS) and `CreatesExactlyOnce` (the api-version has
    /// customId).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A Microsoft Entra ID application that trusts a Kubernetes ServiceAccount token (a federated
/// credential with this cluster's issuer, subject `system:serviceaccount:<namespace>:<name>`
/// and audience `api://AzureADTokenExchange`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.serviceAccountRef) != has(self.tokenFile)",
    "message": "set exactly one of serviceAccountRef (a token is requested for it) and tokenFile (a projected token the operator's pod mounts)",
}]))]
pub struct WorkloadIdentityAuth {
    /// The Entra tenant (directory) id.
    #[schemars(length(min = 1, max = 256), pattern(r"^[A-Za-z0-9.-]+$"))]
    pub tenant_id: String,
    /// The application (client) id of the app registration or managed identity.
    #[schemars(pattern(
        r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    pub client_id: String,
    /// Entra's authority, `https://login.microsoftonline.com` unless another cloud's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), pattern(r"^https://[^/?#]+/?$"))]
    pub authority_host: Option<String>,
    /// The ServiceAccount whose token (requested from the API server) is presented to Entra.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<ServiceAccountRef>,
    /// ClusterAcsConnection only: a projected ServiceAccount token file in the operator's pod
    /// (Azure Workload Identity's `AZURE_FEDERATED_TOKEN_FILE`,
    /// `/var/run/secrets/azure/tokens/azure-identity-token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), pattern(r"^/"))]
    pub token_file: Option<String>,
}

/// A ServiceAccount whose token is presented to Entra.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// ClusterAcsConnection only: the ServiceAccount's namespace, the operator's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
    /// The token's audience, as the federated credential names it: `api://AzureADTokenExchange`
    /// (the default) or a national cloud's variant. Nothing else: a token the operator requests
    /// must not be one the API server, or any other audience, would accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        pattern(r"^api://AzureADTokenExchange[A-Za-z]*$")
    )]
    pub audience: Option<String>,
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
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "acs-operator.io",
    version = "v1alpha1",
    kind = "ClusterAcsConnection",
    plural = "clusteracsconnections",
    shortname = "clusteracsconn",
    derive = "PartialEq",
    status = "ConnectionStatus",
    doc = "An Azure Communication Services resource and how to authenticate to it, for the CommunicationIdentities of the namespaces it allows.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Auth", type_ = "string", json_path = ".status.authentication"),
    printcolumn(
        name = "API Version",
        type_ = "string",
        json_path = ".status.apiVersion"
    ),
    printcolumn(
        name = "Identities",
        type_ = "integer",
        json_path = ".status.identities"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [one_auth_rule(), endpoint_rule()]))]
pub struct ClusterAcsConnectionSpec {
    /// The ACS resource's endpoint, `https://<resource>.communication.azure.com`, with
    /// workloadIdentity (an access key's connection string names its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), pattern(r"^https?://[^/?#]+/?$"))]
    pub endpoint: Option<String>,
    /// Authenticate with the resource's access key: a Secret holding its connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<ClusterAccessKeyAuth>,
    /// Authenticate with Microsoft Entra ID: a ServiceAccount token (requested for
    /// serviceAccountRef, or the operator's own projected tokenFile) is exchanged for an Entra
    /// token of the application, which needs a role on the ACS resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentityAuth>,
    /// Pins the ACS api-version. Unset, the operator uses the preview with `customId`
    /// (exactly-once creates) while the service accepts it, then the newest GA version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = acs::wire::API_VERSIONS))]
    pub api_version: Option<String>,
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

/// How a CommunicationIdentity reaches ACS: how it authenticates, and the connection resource
/// that says so (none: the identity's own `spec.connectionSecretRef`, a Secret of its namespace
/// that the operator holds with a finalizer while it is used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSource {
    pub auth: SourceAuth,
    pub api_version: ApiVersionPolicy,
    /// `AcsConnection "name"` or `ClusterAcsConnection "name"`, for messages.
    pub via: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAuth {
    /// A Secret, and its key holding the connection string.
    AccessKey {
        namespace: String,
        secret: ConnectionSecretRef,
    },
    WorkloadIdentity(WorkloadIdentitySource),
}

/// Everything a workload-identity client is built from: two connections that agree on all of
/// it may share one client (and its Entra token).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadIdentitySource {
    pub endpoint: String,
    pub tenant_id: String,
    pub client_id: String,
    pub authority_host: String,
    pub token: FederatedTokenSource,
}

/// Where the federated token presented to Entra comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FederatedTokenSource {
    /// Requested from the API server (TokenRequest) for this ServiceAccount.
    ServiceAccount {
        namespace: String,
        name: String,
        audience: String,
    },
    /// A projected token file in the operator's pod.
    File(String),
}

/// The policy `pinned` (a connection's spec.apiVersion) asks for; a version the schema should
/// have refused (an outdated CRD) makes the connection unusable.
fn api_version_policy(pinned: Option<&str>, via: &str) -> Result<ApiVersionPolicy, Failure> {
    match pinned {
        None => Ok(ApiVersionPolicy::default()),
        Some(version) => {
            ApiVersionPolicy::pinned(version).ok_or_else(|| Failure::ConnectionUnusable {
                connection: via.to_owned(),
            })
        }
    }
}

/// How messages name a connection resource.
pub fn label(kind: ConnectionKind, name: &str) -> String {
    format!("{} {name:?}", kind.as_str())
}

impl WorkloadIdentityAuth {
    /// The source this names, with the ServiceAccount in `default_namespace` unless it names
    /// one; `None` without a token source, or with an audience not Entra's (see
    /// [`ServiceAccountRef::audience`]).
    fn source(&self, endpoint: &str, default_namespace: &str) -> Option<WorkloadIdentitySource> {
        let token = match (&self.service_account_ref, &self.token_file) {
            (Some(account), None)
                if (account.audience.as_deref())
                    .is_some_and(|audience| !audience.starts_with(TOKEN_EXCHANGE_AUDIENCE)) =>
            {
                return None;
            }
            (Some(account), None) => FederatedTokenSource::ServiceAccount {
                namespace: (account.namespace.as_deref())
                    .unwrap_or(default_namespace)
                    .to_owned(),
                name: account.name.clone(),
                audience: (account.audience.as_deref())
                    .unwrap_or(TOKEN_EXCHANGE_AUDIENCE)
                    .to_owned(),
            },
            (None, Some(file)) => FederatedTokenSource::File(file.clone()),
            _ => return None,
        };
        Some(WorkloadIdentitySource {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            authority_host: (self.authority_host.as_deref())
                .unwrap_or(acs::entra::PUBLIC_AUTHORITY)
                .trim_end_matches('/')
                .to_owned(),
            token,
        })
    }

    /// Whether it borrows what only a cluster connection may: the operator's token file or
    /// another namespace's ServiceAccount (the schema refuses both; checked again here, as an
    /// outdated CRD would not).
    fn reaches_beyond(&self, namespace: &str) -> bool {
        let account_namespace =
            (self.service_account_ref.as_ref()).and_then(|account| account.namespace.as_deref());
        self.token_file.is_some() || account_namespace.is_some_and(|other| other != namespace)
    }
}

impl AcsConnection {
    /// How an identity of this connection's namespace reaches ACS through it.
    pub fn source(&self) -> Result<ConnectionSource, Failure> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let via = label(ConnectionKind::AcsConnection, &name);
        let namespace = self.metadata.namespace.clone().unwrap_or_default();
        let spec = &self.spec;
        let auth = match (&spec.access_key, &spec.workload_identity, &spec.endpoint) {
            (Some(auth), None, None) => Some(SourceAuth::AccessKey {
                namespace,
                secret: auth.secret_ref.clone(),
            }),
            (None, Some(identity), Some(endpoint)) if !identity.reaches_beyond(&namespace) => {
                (identity.source(endpoint, &namespace)).map(SourceAuth::WorkloadIdentity)
            }
            _ => None,
        };
        let auth = auth.ok_or_else(|| Failure::ConnectionUnusable {
            connection: via.clone(),
        })?;
        Ok(ConnectionSource {
            auth,
            api_version: api_version_policy(spec.api_version.as_deref(), &via)?,
            via: Some(via),
        })
    }
}

impl ClusterAcsConnection {
    /// How an identity of `namespace` (whose labels are `labels`) reaches ACS through it:
    /// refused unless the connection allows that namespace. Its Secret, or ServiceAccount, is
    /// in `operator_namespace` unless it names another.
    pub fn source_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        operator_namespace: &str,
    ) -> Result<ConnectionSource, Failure> {
        if !allows(&self.spec.conditions, namespace, labels) {
            let name = self.metadata.name.clone().unwrap_or_default();
            return Err(Failure::NamespaceNotAllowed {
                connection: label(ConnectionKind::ClusterAcsConnection, &name),
                namespace: namespace.to_owned(),
            });
        }
        self.source(operator_namespace)
    }

    /// How this connection reaches ACS, whichever namespace asks: its Secret, or
    /// ServiceAccount, is in `operator_namespace` unless it names another.
    pub fn source(&self, operator_namespace: &str) -> Result<ConnectionSource, Failure> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let via = label(ConnectionKind::ClusterAcsConnection, &name);
        let spec = &self.spec;
        let auth = match (&spec.access_key, &spec.workload_identity, &spec.endpoint) {
            (Some(auth), None, None) => Some(SourceAuth::AccessKey {
                namespace: (auth.secret_ref.namespace.as_deref())
                    .unwrap_or(operator_namespace)
                    .to_owned(),
                secret: auth.secret_ref.secret.clone(),
            }),
            (None, Some(identity), Some(endpoint)) => {
                (identity.source(endpoint, operator_namespace)).map(SourceAuth::WorkloadIdentity)
            }
            _ => None,
        };
        let auth = auth.ok_or_else(|| Failure::ConnectionUnusable {
            connection: via.clone(),
        })?;
        Ok(ConnectionSource {
            auth,
            api_version: api_version_policy(spec.api_version.as_deref(), &via)?,
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

    const ENDPOINT: &str = "https://r.communication.azure.com";
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const CLIENT: &str = "4a1e0b3f-5c6d-4e7f-8a9b-0c1d2e3f4a5b";

    fn workload_identity(token: serde_json::Value) -> serde_json::Value {
        let mut identity = json!({ "tenantId": TENANT, "clientId": CLIENT });
        identity
            .as_object_mut()
            .unwrap()
            .extend(token.as_object().unwrap().clone());
        identity
    }

    fn source(kind: ConnectionKind, spec: serde_json::Value) -> Result<ConnectionSource, Failure> {
        let metadata = json!({ "name": "shared", "namespace": "team-a" });
        match kind {
            ConnectionKind::AcsConnection => {
                let connection: AcsConnection = serde_json::from_value(
                    json!({ "metadata": metadata, "spec": spec, "apiVersion": "acs-operator.io/v1alpha1", "kind": "AcsConnection" }),
                )
                .unwrap();
                connection.source()
            }
            ConnectionKind::ClusterAcsConnection => {
                let connection: ClusterAcsConnection = serde_json::from_value(
                    json!({ "metadata": { "name": "shared" }, "spec": spec, "apiVersion": "acs-operator.io/v1alpha1", "kind": "ClusterAcsConnection" }),
                )
                .unwrap();
                connection.source_for("team-a", &BTreeMap::new(), "acs-system")
            }
        }
    }

    fn identity(token: FederatedTokenSource) -> SourceAuth {
        SourceAuth::WorkloadIdentity(WorkloadIdentitySource {
            endpoint: ENDPOINT.into(),
            tenant_id: TENANT.into(),
            client_id: CLIENT.into(),
            authority_host: "https://login.microsoftonline.com".into(),
            token,
        })
    }

    fn account(namespace: &str, name: &str) -> SourceAuth {
        identity(FederatedTokenSource::ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
            audience: TOKEN_EXCHANGE_AUDIENCE.into(),
        })
    }

    #[test]
    fn how_each_connection_authenticates() {
        use ConnectionKind::{AcsConnection as Namespaced, ClusterAcsConnection as Cluster};
        let key = json!({ "secretRef": { "name": "acs", "key": "connectionString" } });
        let own_account = workload_identity(json!({ "serviceAccountRef": { "name": "acs" } }));
        let other_account = workload_identity(
            json!({ "serviceAccountRef": { "name": "acs", "namespace": "team-b" } }),
        );
        let file = workload_identity(
            json!({ "tokenFile": "/var/run/secrets/azure/tokens/azure-identity-token" }),
        );
        let api_audience = workload_identity(
            json!({ "serviceAccountRef": { "name": "acs", "audience": "https://kubernetes.default.svc" } }),
        );
        let secret = |namespace: &str| SourceAuth::AccessKey {
            namespace: namespace.into(),
            secret: serde_json::from_value(json!({ "name": "acs", "key": "connectionString" }))
                .unwrap(),
        };
        let cases = [
            (
                "access key",
                Namespaced,
                json!({ "accessKey": key }),
                Some(secret("team-a")),
            ),
            (
                "cluster access key",
                Cluster,
                json!({ "accessKey": key }),
                Some(secret("acs-system")),
            ),
            (
                "a ServiceAccount of the connection's namespace",
                Namespaced,
                json!({ "endpoint": ENDPOINT, "workloadIdentity": own_account }),
                Some(account("team-a", "acs")),
            ),
            (
                "a cluster connection's ServiceAccount is the operator's namespace's",
                Cluster,
                json!({ "endpoint": format!("{ENDPOINT}/"), "workloadIdentity": own_account }),
                Some(account("acs-system", "acs")),
            ),
            (
                "a cluster connection may name another namespace",
                Cluster,
                json!({ "endpoint": ENDPOINT, "workloadIdentity": other_account }),
                Some(account("team-b", "acs")),
            ),
            (
                "a namespace may not borrow another's ServiceAccount",
                Namespaced,
                json!({ "endpoint": ENDPOINT, "workloadIdentity": other_account }),
                None,
            ),
            (
                "a namespace may not use the operator's token file",
                Namespaced,
                json!({ "endpoint": ENDPOINT, "workloadIdentity": file }),
                None,
            ),
            (
                "a cluster connection may",
                Cluster,
                json!({ "endpoint": ENDPOINT, "workloadIdentity": file }),
                Some(identity(FederatedTokenSource::File(
                    "/var/run/secrets/azure/tokens/azure-identity-token".into(),
                ))),
            ),
            (
                "no token for another audience",
                Cluster,
                json!({ "endpoint": ENDPOINT, "workloadIdentity": api_audience }),
                None,
            ),
            (
                "workload identity without an endpoint",
                Cluster,
                json!({ "workloadIdentity": own_account }),
                None,
            ),
            (
                "both",
                Namespaced,
                json!({ "endpoint": ENDPOINT, "accessKey": key, "workloadIdentity": own_account }),
                None,
            ),
            ("neither", Cluster, json!({}), None),
        ];
        for (name, kind, spec, expected) in cases {
            let found = source(kind, spec);
            match expected {
                Some(auth) => assert_eq!(found.map(|source| source.auth), Ok(auth), "{name}"),
                None => assert!(
                    matches!(found, Err(Failure::ConnectionUnusable { .. })),
                    "{name}: {found:?}"
                ),
            }
        }
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
