//! The ground is real: server-side apply conflicts, garbage collection and RBAC behave as on a
//! production cluster.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Config};
use serde_json::json;

use crate::support::{TestNamespace, admin_config, wait_gone};

#[tokio::test]
async fn server_side_apply_reports_a_second_managers_conflict() {
    let ns = TestNamespace::new("ssa").await;
    let configmaps: Api<ConfigMap> = ns.api();
    let manifest = |value: &str| {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "shared" },
            "data": { "owner": value }
        })
    };
    configmaps
        .patch(
            "shared",
            &PatchParams::apply("first-manager"),
            &Patch::Apply(manifest("first")),
        )
        .await
        .expect("first apply succeeds");
    let applied = configmaps.get("shared").await.unwrap();
    let managers: Vec<_> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| f.manager)
        .collect();
    assert_eq!(managers, ["first-manager"]);

    let conflict = configmaps
        .patch(
            "shared",
            &PatchParams::apply("second-manager"),
            &Patch::Apply(manifest("second")),
        )
        .await
        .expect_err("a second manager changing the same field conflicts");
    match conflict {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 409, "{status:?}");
            assert!(status.message.contains("first-manager"), "{status:?}");
        }
        other => panic!("expected an API conflict, got {other:?}"),
    }
    assert_eq!(
        configmaps.get("shared").await.unwrap().data.unwrap()["owner"],
        "first"
    );

    configmaps
        .patch(
            "shared",
            &PatchParams::apply("second-manager").force(),
            &Patch::Apply(manifest("second")),
        )
        .await
        .expect("a forced apply takes the field over");
    assert_eq!(
        configmaps.get("shared").await.unwrap().data.unwrap()["owner"],
        "second"
    );
}

#[tokio::test]
async fn garbage_collector_removes_a_dependent_with_its_owner() {
    let ns = TestNamespace::new("gc").await;
    let configmaps: Api<ConfigMap> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let owner = configmaps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "owner" } })).unwrap(),
        )
        .await
        .unwrap();
    let dependent: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                "uid": owner.metadata.uid.unwrap(), "controller": true
            }]
        },
        "stringData": { "k": "v" }
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &dependent)
        .await
        .unwrap();

    configmaps
        .delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    // The garbage collector deletes the dependent Secret.
    wait_gone(&secrets, "dependent", Duration::from_secs(15)).await;
}

#[tokio::test]
async fn a_service_account_token_is_limited_to_what_its_role_allows() {
    let ns = TestNamespace::new("rbac").await;
    let other = TestNamespace::new("rbac-other").await;
    for namespace in [&ns, &other] {
        namespace
            .api::<Secret>()
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": "visible" }, "stringData": { "k": "v" }
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }
    let accounts: Api<ServiceAccount> = ns.api();
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "reader" } })).unwrap(),
        )
        .await
        .unwrap();
    ns.api::<Role>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "secret-reader" },
                "rules": [{ "apiGroups": [""], "resources": ["secrets"], "verbs": ["get"] }]
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    ns.api::<RoleBinding>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "reader-reads-secrets" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader" },
                "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": ns.name }]
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let request: TokenRequest = serde_json::from_value(json!({
        "spec": { "audiences": [], "expirationSeconds": 600 }
    }))
    .unwrap();
    let issued = accounts
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .expect("the TokenRequest API issues a token");
    let token = issued
        .status
        .and_then(|s| s.token)
        .expect("token in status");

    let mut config: Config = admin_config().await;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let reader = Client::try_from(config).unwrap();
    let own: Api<Secret> = Api::namespaced(reader.clone(), &ns.name);
    assert!(own.get("visible").await.is_ok(), "reads its own namespace");
    let foreign: Api<Secret> = Api::namespaced(reader, &other.name);
    match foreign.get("visible").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 in another namespace, got {other:?}"),
    }
}
