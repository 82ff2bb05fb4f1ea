//! Connections on a real API server: the one-of rule between `connectionSecretRef` and
//! `connectionRef` at apply time, an AcsConnection serving as a connection Secret does, and a
//! ClusterAcsConnection serving only the namespaces its conditions allow.

use acs_identity_operator::crd::{CONNECTION_SECRET_FINALIZER, reason};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::support::{
    Emulator, Operator, PROMPTLY, Setup, TestNamespace, admin_client, create_connection_secret,
    identity_manifest, ready_message, run_aside, wait_condition, wait_ready,
};

const GROUP_VERSION: &str = "acs-operator.io/v1alpha1";

fn spec_via(kind: &str, name: &str) -> Value {
    json!({ "connectionRef": { "kind": kind, "name": name }, "scopes": ["chat"] })
}

/// Applies `manifest` server-side as a user would.
async fn apply(api: &Api<DynamicObject>, name: &str, manifest: Value) {
    let object: DynamicObject = serde_json::from_value(manifest).unwrap();
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// The API of a connection kind, in `namespace` or cluster-wide.
fn connection_api(
    client: Client,
    namespace: Option<&str>,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "acs-operator.io".into(),
        version: "v1alpha1".into(),
        api_version: GROUP_VERSION.into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    match namespace {
        Some(namespace) => Api::namespaced_with(client, namespace, &resource),
        None => Api::all_with(client, &resource),
    }
}

fn cluster_connections(client: Client) -> Api<DynamicObject> {
    connection_api(
        client,
        None,
        "ClusterAcsConnection",
        "clusteracsconnections",
    )
}

/// Deletes the cluster-scoped connection when the test ends, however it ends.
struct ClusterConnection(String);

impl Drop for ClusterConnection {
    fn drop(&mut self) {
        let name = self.0.clone();
        run_aside(async move {
            let api = cluster_connections(admin_client().await);
            let _ = api.delete(&name, &DeleteParams::background()).await;
        });
    }
}

#[tokio::test]
async fn an_identity_names_exactly_one_connection_when_applied() {
    let setup = Setup::new("conn-oneof").await;
    let both = json!({
        "connectionSecretRef": { "name": "acs-connection" },
        "connectionRef": { "kind": "AcsConnection", "name": "team" },
        "scopes": ["chat"],
    });
    for (case, spec) in [("both", both), ("neither", json!({ "scopes": ["chat"] }))] {
        let refused = setup
            .identities
            .patch(
                "alice",
                &PatchParams::apply("test").force(),
                &Patch::Apply(identity_manifest("alice", spec)),
            )
            .await
            .expect_err(case);
        assert!(
            refused.to_string().contains(
                "set exactly one of spec.connectionSecretRef (a Secret of this namespace holding the connection string) and spec.connectionRef"
            ),
            "{case}: {refused}"
        );
    }
}

#[tokio::test]
async fn an_acs_connection_with_an_access_key_works_as_a_connection_secret_does() {
    let setup = Setup::new("conn-ns").await;
    let client = setup.ns.client.clone();
    let connections = connection_api(
        client,
        Some(&setup.ns.name),
        "AcsConnection",
        "acsconnections",
    );
    let manifest = json!({
        "apiVersion": GROUP_VERSION,
        "kind": "AcsConnection",
        "metadata": { "name": "team" },
        "spec": { "accessKey": { "secretRef": { "name": "acs-connection" } } },
    });
    apply(&connections, "team", manifest).await;

    setup
        .apply("alice", spec_via("AcsConnection", "team"))
        .await;
    let resource = setup.wait_ready("alice").await;
    let data = setup.secret_data("alice-acs-token").await;
    let identity = resource.status.unwrap().identity_id.unwrap();
    assert_eq!(data["identityId"], identity);
    let validated = setup.emulator.validate(&data["token"]).await;
    assert_eq!(validated["valid"], true, "{validated}");
    // The Secret a connection names is the connection owner's: the operator pins none of it.
    let secret = setup.secrets.get("acs-connection").await.unwrap();
    assert!(
        !secret
            .finalizers()
            .iter()
            .any(|f| f == CONNECTION_SECRET_FINALIZER)
    );

    // Deleted, the identity is cleaned up in ACS through the connection.
    setup
        .identities
        .delete("alice", &DeleteParams::default())
        .await
        .unwrap();
    crate::support::wait_gone(&setup.identities, "alice", PROMPTLY).await;
    let stats = setup.emulator.stats().await;
    assert_eq!(stats["requests"]["deleteIdentity"]["204"], 1, "{stats}");
}

#[tokio::test]
async fn a_cluster_connection_serves_the_namespaces_it_allows_and_refuses_the_others() {
    crate::support::ensure_crd().await;
    let emulator = Emulator::start(&[]);
    // The operator's own namespace holds the key; tenants' namespaces hold none.
    let keys = TestNamespace::new("conn-keys").await;
    let key_secrets: Api<Secret> = keys.api();
    create_connection_secret(&key_secrets, "acs-key", &emulator.connection_string).await;
    let allowed = TestNamespace::new("conn-allowed").await;
    let refused = TestNamespace::new("conn-refused").await;
    let name = format!("shared-{}", allowed.name);
    let _cleanup = ClusterConnection(name.clone());
    let label = "acs-test/allowed";
    let manifest = json!({
        "apiVersion": GROUP_VERSION,
        "kind": "ClusterAcsConnection",
        "metadata": { "name": name },
        "spec": {
            "accessKey": { "secretRef": { "name": "acs-key" } },
            "conditions": [{ "namespaceSelector": { "matchLabels": { label: name } } }],
        },
    });
    let connections = cluster_connections(admin_client().await);
    apply(&connections, &name, manifest).await;
    let namespaces: Api<Namespace> = Api::all(admin_client().await);
    let allow = |namespace: &str| {
        let patch = json!({ "metadata": { "labels": { label: name } } });
        let namespaces = namespaces.clone();
        let namespace = namespace.to_owned();
        async move {
            namespaces
                .patch(&namespace, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
    };
    allow(&allowed.name).await;
    let operator_args = ["--leader-election-namespace", keys.name.as_str()];
    let _allowed_operator = Operator::start(&allowed.name, &emulator, &operator_args);
    let _refused_operator = Operator::start(&refused.name, &emulator, &operator_args);

    let allowed_identities = allowed.api();
    let refused_identities = refused.api();
    let spec = spec_via("ClusterAcsConnection", &name);
    crate::support::apply_identity(&allowed_identities, "alice", spec.clone()).await;
    crate::support::apply_identity(&refused_identities, "bob", spec).await;

    wait_ready(&allowed_identities, "alice", PROMPTLY).await;
    let bob = wait_condition(
        &refused_identities,
        "bob",
        "False",
        reason::NAMESPACE_NOT_ALLOWED,
        PROMPTLY,
    )
    .await;
    let message = ready_message(&bob);
    assert!(
        message.contains(&format!(
            "ClusterAcsConnection {name:?} does not allow namespace {:?}",
            refused.name
        )),
        "{message}"
    );
    assert!(bob.finalizers().is_empty(), "nothing reached ACS for bob");
    let stats = emulator.stats().await;
    assert_eq!(
        stats["requests"]["createIdentityWithToken"]["201"], 1,
        "{stats}"
    );
    // No Secret in the tenants' namespaces holds the key.
    for namespace in [&allowed, &refused] {
        let secrets: Api<Secret> = namespace.api();
        for secret in secrets.list(&Default::default()).await.unwrap() {
            let data = crate::support::secret_strings(&secret);
            assert!(
                data.values().all(|value| !value.contains("accesskey=")),
                "{} holds a connection string",
                secret.name_any()
            );
        }
    }

    // Once its namespace is allowed, bob's retry gets its identity.
    allow(&refused.name).await;
    wait_ready(&refused_identities, "bob", PROMPTLY).await;
}
