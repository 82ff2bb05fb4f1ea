//! Where a workload identity's federated token comes from: a TokenRequest for a ServiceAccount
//! (what a projected volume would mount, asked of the API server directly), or a projected
//! token file in the operator's own pod. The acs client exchanges it at Entra.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use crate::connection::{FederatedTokenSource, WorkloadIdentitySource};
use crate::kube_call::{Error, kube_call};
use crate::metrics::Metrics;

/// How long a requested token lives: the API server's minimum is 10 minutes; Entra only looks
/// at it once per exchange (about hourly, the Entra token's lifetime).
const REQUESTED_TOKEN_SECONDS: i64 = 3600;
/// The longest token file read: a projected token is about 1 KiB.
const MAX_TOKEN_FILE_BYTES: u64 = 16 * 1024;

/// The annotation by which a ServiceAccount names the Entra application that may act as it
/// (Azure Workload Identity's own).
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";

/// The federated token of `identity`.
pub fn federated_token(
    identity: &WorkloadIdentitySource,
    client: kube::Client,
    metrics: Arc<Metrics>,
) -> Arc<dyn acs::FederatedToken> {
    match &identity.token {
        FederatedTokenSource::ServiceAccount {
            namespace,
            name,
            audience,
        } => Arc::new(ServiceAccountToken {
            accounts: Api::namespaced(client, namespace),
            namespace: namespace.clone(),
            name: name.clone(),
            audience: audience.clone(),
            client_id: identity.client_id.clone(),
            metrics,
        }),
        FederatedTokenSource::File(path) => Arc::new(TokenFile(path.clone())),
    }
}

struct ServiceAccountToken {
    accounts: Api<ServiceAccount>,
    namespace: String,
    name: String,
    audience: String,
    client_id: String,
    metrics: Arc<Metrics>,
}

/// Whether a ServiceAccount with `annotations` lets the Entra application `client_id` act as
/// it: only then does the operator request a token of it, so that naming a ServiceAccount in a
/// connection is not enough to borrow its identity.
pub fn consents(annotations: Option<&BTreeMap<String, String>>, client_id: &str) -> bool {
    let named = annotations.and_then(|all| all.get(CLIENT_ID_ANNOTATION));
    named.is_some_and(|named| named.trim().eq_ignore_ascii_case(client_id))
}

impl ServiceAccountToken {
    /// Why the ServiceAccount cannot be used, if it cannot: missing, or not consenting.
    async fn refusal(&self) -> Option<String> {
        let (name, namespace, client_id) = (&self.name, &self.namespace, &self.client_id);
        let read = kube_call(
            &self.metrics,
            "serviceaccount_get",
            self.accounts.get_opt(name),
        );
        match read.await {
            Ok(Some(account)) if consents(account.metadata.annotations.as_ref(), client_id) => None,
            Ok(Some(_)) => Some(format!(
                "ServiceAccount {name:?} in namespace {namespace:?} does not name the application: annotate it with {CLIENT_ID_ANNOTATION}={client_id} (kubectl -n {namespace} annotate serviceaccount {name} {CLIENT_ID_ANNOTATION}={client_id})"
            )),
            Ok(None) => Some(format!(
                "ServiceAccount {name:?} was not found in namespace {namespace:?}; create it, or fix spec.workloadIdentity.serviceAccountRef"
            )),
            Err(error) => Some(error.to_string()),
        }
    }
}

#[async_trait::async_trait]
impl acs::FederatedToken for ServiceAccountToken {
    async fn token(&self) -> Result<String, String> {
        if let Some(refusal) = self.refusal().await {
            return Err(refusal);
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![self.audience.clone()]),
                expiration_seconds: Some(REQUESTED_TOKEN_SECONDS),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let params = PostParams::default();
        let created = (self.accounts).create_token_request(&self.name, &params, &request);
        let answer = kube_call(&self.metrics, "serviceaccount_token_create", created).await;
        let (name, namespace) = (&self.name, &self.namespace);
        match answer {
            Ok(answer) => answer
                .status
                .and_then(|status| status.token)
                .filter(|token| !token.is_empty())
                .ok_or_else(|| {
                    format!("the API server issued no token for ServiceAccount {name:?}")
                }),
            Err(Error::Kube {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 403 => Err(format!(
                "the operator may not request tokens for ServiceAccount {name:?} in namespace {namespace:?}: it needs `create` on serviceaccounts/token (the Helm chart grants it)"
            )),
            Err(error) => Err(error.to_string()),
        }
    }
}

struct TokenFile(String);

#[async_trait::async_trait]
impl acs::FederatedToken for TokenFile {
    /// Read afresh each time: the kubelet rotates the file.
    async fn token(&self) -> Result<String, String> {
        let path = &self.0;
        let unreadable = |error: std::io::Error| {
            format!(
                "could not read the federated token file {path:?}: {error}; check that the operator's pod mounts it (Azure Workload Identity: the pod label azure.workload.identity/use=true)"
            )
        };
        let length = tokio::fs::metadata(path).await.map_err(unreadable)?.len();
        if length > MAX_TOKEN_FILE_BYTES {
            return Err(format!(
                "the federated token file {path:?} holds {length} bytes, far more than a token"
            ));
        }
        let text = tokio::fs::read_to_string(path).await.map_err(unreadable)?;
        match text.trim() {
            "" => Err(format!("the federated token file {path:?} is empty")),
            token => Ok(token.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_consents_by_naming_the_application() {
        let client = "4a1e0b3f-5c6d-4e7f-8a9b-0c1d2e3f4a5b";
        let annotated =
            |value: &str| BTreeMap::from([(CLIENT_ID_ANNOTATION.to_owned(), value.to_owned())]);
        let other = BTreeMap::from([("example.com/x".to_owned(), client.to_owned())]);
        let cases = [
            ("no annotations", None, false),
            ("another annotation", Some(other), false),
            ("this application", Some(annotated(client)), true),
            ("in capitals", Some(annotated(&client.to_uppercase())), true),
            (
                "another application",
                Some(annotated("0b6a4f21-7c3d-4e5f-9a8b-1c2d3e4f5a6b")),
                false,
            ),
        ];
        for (name, annotations, expected) in cases {
            assert_eq!(consents(annotations.as_ref(), client), expected, "{name}");
        }
    }
}
