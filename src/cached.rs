//! The form in which the controller's cache holds a CommunicationIdentity. A pass reads the
//! whole resource, but only at its start, while the cache holds every resource all the time:
//! so the cache keeps as fields only what its scans over all resources read (name, namespace,
//! uid, version, deletion, finalizers, the connection named), and the rest as the resource's JSON
//! compressed against a typical resource, which a pass unpacks in microseconds. At 10,000
//! resources that is ~0.6 KiB a resource instead of ~2.2 KiB as `CommunicationIdentity`
//! (docs/benchmarks.md, eleventh round).
//!
//! LZ4 with a dictionary (`lz4_flex`, pure Rust): JSON of one resource is too short to compress
//! on its own, but nearly all of it (field names, the finalizer, the condition's wording)
//! repeats the dictionary, so what is stored is mostly its names, uid and times.

use std::borrow::Cow;
use std::fmt;
use std::sync::LazyLock;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::Deserialize;

use crate::crd::{
    CREATE_ATTEMPTED_ANNOTATION, CommunicationIdentity, ConnectionRef, ConnectionSecretRef,
    OPERATOR_ANNOTATION_PREFIX,
};

/// A CommunicationIdentity as the cache holds it; [`CachedIdentity::unpack`] gives it back
/// whole (without what the operator never reads, see [`trim`]).
#[derive(Clone, Deserialize)]
#[serde(from = "CommunicationIdentity")]
pub struct CachedIdentity {
    /// Name, namespace, uid, resourceVersion, deletionTimestamp and finalizers only.
    metadata: ObjectMeta,
    connection_secret_ref: Option<ConnectionSecretRef>,
    connection_ref: Option<ConnectionRef>,
    /// The trimmed resource's JSON, LZ4-compressed against [`DICTIONARY`], its length first.
    packed: Box<[u8]>,
}

/// Why a cached resource could not be unpacked; never expected (the operator packed it
/// itself), so a pass that meets it fails as a Kubernetes call would, and is retried.
#[derive(Debug, thiserror::Error)]
#[error("the cached copy of the resource could not be read back: {0}")]
pub struct UnpackError(String);

impl CachedIdentity {
    pub fn pack(mut resource: CommunicationIdentity) -> Self {
        trim(&mut resource);
        // Infallible: every map key of the type is a string.
        let json = serde_json::to_vec(&resource).expect("a CommunicationIdentity serialises");
        let packed = lz4_flex::block::compress_prepend_size_with_dict(&json, &DICTIONARY);
        let metadata = resource.metadata;
        Self {
            metadata: ObjectMeta {
                name: metadata.name,
                namespace: metadata.namespace,
                uid: metadata.uid,
                resource_version: metadata.resource_version,
                deletion_timestamp: metadata.deletion_timestamp,
                finalizers: metadata.finalizers,
                ..ObjectMeta::default()
            },
            connection_secret_ref: resource.spec.connection_secret_ref,
            connection_ref: resource.spec.connection_ref,
            packed: packed.into_boxed_slice(),
        }
    }

    pub fn unpack(&self) -> Result<CommunicationIdentity, UnpackError> {
        let json = lz4_flex::block::decompress_size_prepended_with_dict(&self.packed, &DICTIONARY)
            .map_err(|error| UnpackError(error.to_string()))?;
        serde_json::from_slice(&json).map_err(|error| UnpackError(error.to_string()))
    }

    pub fn connection_secret_ref(&self) -> Option<&ConnectionSecretRef> {
        self.connection_secret_ref.as_ref()
    }

    pub fn connection_ref(&self) -> Option<&ConnectionRef> {
        self.connection_ref.as_ref()
    }
}

impl From<CommunicationIdentity> for CachedIdentity {
    fn from(resource: CommunicationIdentity) -> Self {
        Self::pack(resource)
    }
}

/// Its kind is CommunicationIdentity's: the controller keys its cache, its owned Secrets'
/// ownerReferences and its triggers by it.
impl Resource for CachedIdentity {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        CommunicationIdentity::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        CommunicationIdentity::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        CommunicationIdentity::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        CommunicationIdentity::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Without the packed bytes, which say nothing to a reader.
impl fmt::Debug for CachedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedIdentity")
            .field("namespace", &self.metadata.namespace)
            .field("name", &self.metadata.name)
            .field("packed_bytes", &self.packed.len())
            .finish_non_exhaustive()
    }
}

/// Drops what the reconcile never reads (kube.rs's "pruning fields" advice): managed fields,
/// labels, ownerReferences, annotations other than the operator's own, and the
/// create-attempted mark once the identity is recorded.
fn trim(resource: &mut CommunicationIdentity) {
    let recorded = resource
        .status
        .as_ref()
        .is_some_and(|status| status.identity_id.is_some());
    let metadata = &mut resource.metadata;
    metadata.managed_fields = None;
    metadata.labels = None;
    metadata.owner_references = None;
    if let Some(annotations) = &mut metadata.annotations {
        annotations.retain(|key, _| {
            key.starts_with(OPERATOR_ANNOTATION_PREFIX)
                && !(recorded && key == CREATE_ATTEMPTED_ANNOTATION)
        });
        if annotations.is_empty() {
            metadata.annotations = None;
        }
    }
}

/// A resource as most are once Ready, in the JSON serde writes for the type: what a packed
/// resource repeats of it costs a few bytes.
const TYPICAL: &str = r#"{
  "apiVersion": "acs-operator.io/v1alpha1",
  "kind": "CommunicationIdentity",
  "metadata": {
    "creationTimestamp": "2026-01-01T00:00:00Z",
    "finalizers": ["acs-operator.io/cleanup"],
    "generation": 1,
    "name": "communication-identity",
    "namespace": "default",
    "resourceVersion": "1000000",
    "uid": "00000000-0000-0000-0000-000000000000"
  },
  "spec": {
    "connectionSecretRef": {"name": "acs-connection", "key": "connectionString"},
    "scopes": ["chat", "voip"],
    "tokenLifetime": "24h",
    "deletionPolicy": "Delete"
  },
  "status": {
    "identityId": "8:acs:00000000-0000-0000-0000-000000000000_00000000-0000-0000-0000-000000000000",
    "secretName": "communication-identity-acs-token",
    "tokenExpiresOn": "2026-01-02T00:00:00Z",
    "lastRefreshTime": "2026-01-01T00:00:00Z",
    "nextRefreshTime": "2026-01-01T18:00:00Z",
    "tokenScopes": ["chat", "voip"],
    "tokenLifetimeMinutes": 1440,
    "observedGeneration": 1,
    "conditions": [{
      "lastTransitionTime": "2026-01-01T00:00:00Z",
      "message": "Secret \"communication-identity-acs-token\" holds a token valid until 2026-01-02T00:00:00Z",
      "observedGeneration": 1,
      "reason": "TokenIssued",
      "status": "True",
      "type": "Ready"
    }]
  }
}"#;

/// [`TYPICAL`] as serde writes it, so that its field order and spacing are those of every
/// packed resource.
static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let typical: CommunicationIdentity =
        serde_json::from_str(TYPICAL).expect("TYPICAL is a CommunicationIdentity");
    serde_json::to_vec(&typical).expect("a CommunicationIdentity serialises")
});

#[cfg(test)]
mod tests {
    use kube::ResourceExt;
    use serde_json::{Value, json};

    use super::*;

    fn resource(body: Value) -> CommunicationIdentity {
        serde_json::from_value(body).expect("a CommunicationIdentity")
    }

    #[test]
    fn the_cache_keeps_what_the_reconcile_reads() {
        let resource = resource(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": {
                "name": "alice",
                "namespace": "team",
                "uid": "u-1",
                "resourceVersion": "42",
                "generation": 3,
                "finalizers": ["acs-operator.io/cleanup"],
                "labels": { "team": "a" },
                "ownerReferences": [{ "apiVersion": "v1", "kind": "ConfigMap", "name": "app", "uid": "u-0" }],
                "annotations": {
                    "acs-operator.io/identity-create-attempted": "true",
                    "acs-operator.io/refresh-requested-at": "r1",
                    "argocd.argoproj.io/tracking-id": "app:acs-operator.io/CommunicationIdentity:team/alice",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{}}"
                },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}} }]
            },
            "spec": { "connectionSecretRef": { "name": "acs" }, "scopes": ["chat"] },
            "status": { "identityId": "8:acs:x" }
        }));
        let mut unrecorded = resource.clone();
        unrecorded.status = None;
        let unrecorded = CachedIdentity::pack(unrecorded).unpack().unwrap();
        assert!(
            unrecorded.create_attempted(),
            "needed while no identity is recorded"
        );
        let cached = CachedIdentity::pack(resource.clone());
        let unpacked = cached.unpack().unwrap();
        assert!(!unpacked.create_attempted());
        assert!(unpacked.managed_fields().is_empty());
        assert!(unpacked.labels().is_empty() && unpacked.owner_references().is_empty());
        assert_eq!(
            unpacked.annotations().keys().collect::<Vec<_>>(),
            ["acs-operator.io/refresh-requested-at"]
        );
        assert_eq!(unpacked.spec, resource.spec);
        assert_eq!(unpacked.status, resource.status);
        assert_eq!(unpacked.finalizers(), resource.finalizers());
        assert_eq!(unpacked.resource_version(), resource.resource_version());
        assert_eq!(unpacked.metadata.generation, resource.metadata.generation);
        assert_eq!(unpacked.uid(), resource.uid());
        // What the scans over the whole cache read, without unpacking.
        assert_eq!(cached.name_any(), "alice");
        assert_eq!(cached.namespace().as_deref(), Some("team"));
        assert_eq!(cached.uid().as_deref(), Some("u-1"));
        assert_eq!(cached.resource_version().as_deref(), Some("42"));
        assert_eq!(cached.finalizers(), resource.finalizers());
        assert_eq!(
            cached.connection_secret_ref(),
            resource.spec.connection_secret_ref.as_ref()
        );
        assert_eq!(cached.connection_ref(), None);
    }

    /// Every field the operator reads comes back as it went in, whatever is set.
    #[test]
    fn every_field_survives_packing() {
        let cases = [
            ("typical", serde_json::from_str(TYPICAL).unwrap()),
            (
                "everything set",
                json!({
                    "apiVersion": "acs-operator.io/v1alpha1",
                    "kind": "CommunicationIdentity",
                    "metadata": {
                        "name": "bob", "namespace": "team", "uid": "u-2", "resourceVersion": "7",
                        "generation": 9, "creationTimestamp": "2026-03-01T10:00:00Z",
                        "deletionTimestamp": "2026-03-02T10:00:00Z", "deletionGracePeriodSeconds": 0,
                        "finalizers": ["acs-operator.io/cleanup", "example.com/other"],
                        "annotations": { "acs-operator.io/revoke-requested-at": "r2" }
                    },
                    "spec": {
                        "connectionRef": { "kind": "ClusterAcsConnection", "name": "shared" },
                        "tokens": [
                            { "name": "chat", "scopes": ["chat", "chat.join"], "tokenLifetime": "2h", "refreshBefore": "30m" },
                            { "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" }
                        ],
                        "tokenLifetime": "24h",
                        "secretName": "bob-token",
                        "secretTemplate": { "labels": { "app": "bob" }, "annotations": { "note": "ü \"quoted\"" } },
                        "deletionPolicy": "Retain",
                        "identityId": "8:acs:r_1",
                        "rolloutRestartTargets": [{ "kind": "Deployment", "name": "web" }],
                        "minRestartInterval": "10m"
                    },
                    "status": {
                        "identityId": "8:acs:r_1", "secretName": "bob-token",
                        "tokenExpiresOn": "2026-03-01T12:00:00Z", "lastRefreshTime": "2026-03-01T10:00:00Z",
                        "nextRefreshTime": "2026-03-01T11:30:00Z", "tokenScopes": ["chat"],
                        "tokenLifetimeMinutes": 120, "failedAttempts": 3,
                        "lastFailureTime": "2026-03-01T10:05:00Z",
                        "handledRefreshRequest": "r0", "handledRevokeRequest": "r1",
                        "observedGeneration": 8,
                        "tokens": [{ "name": "chat", "scopes": ["chat", "chat.join"], "tokenLifetimeMinutes": 120,
                                     "expiresOn": "2026-03-01T12:00:00Z", "lastRefreshTime": "2026-03-01T10:00:00Z",
                                     "nextRefreshTime": "2026-03-01T11:30:00Z" }],
                        "rolloutRestart": { "lastRestartTime": "2026-03-01T10:00:01Z", "pendingSince": "2026-03-01T10:00:02Z",
                                            "pendingRevoke": true,
                                            "failedTargets": [{ "kind": "Deployment", "name": "web", "reason": "Forbidden", "message": "no" }] },
                        "conditions": [
                            { "type": "Ready", "status": "False", "reason": "AcsUnavailable", "message": "ACS answered 503",
                              "lastTransitionTime": "2026-03-01T10:05:00Z", "observedGeneration": 8 },
                            { "type": "RolloutRestarted", "status": "True", "reason": "Restarted", "message": "",
                              "lastTransitionTime": "2026-03-01T10:00:01Z" }
                        ]
                    }
                }),
            ),
        ];
        for (name, body) in cases {
            let resource = resource(body);
            let unpacked = CachedIdentity::pack(resource.clone()).unpack().unwrap();
            assert_eq!(unpacked.metadata, resource.metadata, "{name}");
            assert_eq!(unpacked.spec, resource.spec, "{name}");
            assert_eq!(unpacked.status, resource.status, "{name}");
        }
    }

    /// The point of packing: a typical resource costs a tenth of its JSON.
    #[test]
    fn a_typical_resource_packs_small() {
        let mut typical = resource(serde_json::from_str(TYPICAL).unwrap());
        typical.metadata.name = Some("web-frontend-7".into());
        typical.metadata.uid = Some("6f1d2c3b-4a5e-4f60-8b7c-9d0e1f2a3b4c".into());
        typical.metadata.resource_version = Some("4711042".into());
        let json = serde_json::to_vec(&typical).unwrap().len();
        let packed = CachedIdentity::pack(typical).packed.len();
        assert!(packed * 5 < json, "{packed} bytes packed of {json}");
    }
}
