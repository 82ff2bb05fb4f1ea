//! Where a workload identity's federated token comes from: a TokenRequest for a ServiceAccount
//! (what a projected volume would mount, asked of the API server directly), or a projected
//! token file in the operator's own pod. The acs client exchanges it at Entra.

use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use crate::connection::FederatedTokenSource;
use crate::kube_call::{Error, kube_call};
use crate::metrics::Metrics;

/// How long a requested token lives: the API server's minimum is 10 minutes; Entra only looks
/// at it once per exchange (about hourly, the Entra token's lifetime).
const REQUESTED_TOKEN_SECONDS: i64 = 3600;
/// The longest token file read: a projected token is about 1 KiB.
const MAX_TOKEN_FILE_BYTES: u64 = 16 * 1024;

/// The federated token of `source`.
pub fn federated_token(
    source: &FederatedTokenSource,
    client: kube::Client,
    metrics: Arc<Metrics>,
) -> Arc<dyn acs::FederatedToken> {
    match source {
        FederatedTokenSource::ServiceAccount {
            namespace,
            name,
            audience,
        } => Arc::new(ServiceAccountToken {
            accounts: Api::namespaced(client, namespace),
            namespace: namespace.clone(),
            name: name.clone(),
            audience: audience.clone(),
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
    metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl acs::FederatedToken for ServiceAccountToken {
    async fn token(&self) -> Result<String, String> {
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
            }) if status.code == 404 => Err(format!(
                "ServiceAccount {name:?} was not found in namespace {namespace:?}; create it, or fix spec.workloadIdentity.serviceAccountRef"
            )),
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
