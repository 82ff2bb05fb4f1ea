//! Every Kubernetes API call of the controllers goes through here: under a timeout, counted by
//! call and outcome (bounded labels), its failure an [`Error`] naming the call.

use std::time::Duration;

use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::cached::UnpackError;
use crate::metrics::Metrics;
use crate::status::bounded;

/// Failures of the Kubernetes API itself; everything about ACS or user input is a
/// [`Failure`](crate::status::Failure)
/// recorded in status instead. `call` names the request, a bounded metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call {call} failed: {}", bounded(.source.to_string()))]
    Kube {
        call: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("Kubernetes API call {call} got no answer within {}s", KUBE_CALL_TIMEOUT.as_secs())]
    KubeTimeout { call: &'static str },
    #[error("the resource has no {0}; it was not read from the API server")]
    MissingMetadata(&'static str),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

impl Error {
    /// A bounded label for metrics: the failing call.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { call, .. } | Error::KubeTimeout { call } => call,
            Error::MissingMetadata(_) => "metadata",
            Error::Unpack(_) => "cache_unpack",
        }
    }
}

/// The longest one Kubernetes API call may take; the client's own read timeout is the same
/// (see `run`), this also bounds the time to a first byte and whole-body reads.
pub const KUBE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `request` under [`KUBE_CALL_TIMEOUT`], counted by call and outcome; its failure labelled
/// `call`.
pub async fn kube_call<T>(
    metrics: &Metrics,
    call: &'static str,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    let result = match tokio::time::timeout(KUBE_CALL_TIMEOUT, request).await {
        Ok(result) => result.map_err(|source| Error::Kube { call, source }),
        Err(_) => Err(Error::KubeTimeout { call }),
    };
    let outcome = match &result {
        Ok(_) => "success",
        Err(Error::Kube {
            source: kube::Error::Api(status),
            ..
        }) if status.code < 500 => "client_error",
        Err(Error::Kube {
            source: kube::Error::Api(_),
            ..
        }) => "server_error",
        Err(Error::KubeTimeout { .. }) => "timeout",
        Err(_) => "transport",
    };
    metrics.kube_request(call, outcome);
    result
}

/// Sets `finalizers` (and merges `annotations`, if any) with a merge patch guarded by the
/// object's resourceVersion: a concurrent change makes it fail (and the reconcile retry)
/// instead of dropping someone else's finalizer.
pub async fn patch_finalizers<K>(
    metrics: &Metrics,
    api: &Api<K>,
    object: &K,
    finalizers: Vec<String>,
    annotations: Option<serde_json::Value>,
) -> Result<K, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let meta = object.meta();
    let mut patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": meta.resource_version,
        }
    });
    if let Some(annotations) = annotations {
        patch["metadata"]["annotations"] = annotations;
    }
    let name = meta.name.as_deref().unwrap_or_default();
    let (params, patch) = (PatchParams::default(), Patch::Merge(patch));
    let request = api.patch(name, &params, &patch);
    kube_call(metrics, "finalizer_patch", request).await
}
