//! Connections on a real API server: the one-of rule between `connectionSecretRef` and
//! `connectionRef` at apply time, an AcsConnection serving as a connection Secret does, and a
//! ClusterAcsConnection serving only the namespaces its conditions allow.

use acs_identity_operator::crd::{
    CONNECTION_SECRET_FINALIZER, REFRESH_REQUESTED_ANNOTATION, reason,
};
use acs_identity_operator::federated_token::CLIENT_ID_ANNOTATION;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::support::{
    Emulator, Operator, PROMPTLY, Setup, TestNamespace, admin_client, basic_spec,
    create_connection_secret, identity_manifest, ready, ready_message, run_aside, wait_condition,
    wait_ready,
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

/// Applies the AcsConnection `team` with the setup's connection Secret as its access key, and
/// returns the API of the namespace's AcsConnections.
async fn team_connection(setup: &Setup) -> Api<DynamicObject> {
    let namespace = Some(setup.ns.name.as_str());
    let connections = connection_api(
        setup.ns.client.clone(),
        namespace,
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
    connections
}

/// Waits until `name` is not Ready with `reason`, and returns its message.
async fn failing_with(
    identities: &Api<acs_identity_operator::crd::CommunicationIdentity>,
    name: &str,
    reason: &str,
    deadline: std::time::Duration,
) -> String {
    let resource = wait_condition(identities, name, "False", reason, deadline).await;
    ready_message(&resource)
}

/// Waits until the connection's status satisfies `check`, and returns it.
async fn wait_connection_status(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    crate::support::wait_for(what, PROMPTLY, || async {
        let object = api.get(name).await.ok()?;
        let status = object.data.get("status")?.clone();
        check(&status).then_some(status)
    })
    .await
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    let conditions = status["conditions"].as_array();
    let found = conditions.and_then(|all| all.iter().find(|c| c["type"] == type_));
    found.unwrap_or(&Value::Null)
}

/// Deletes the cluster-scoped connection when the test ends, however it ends.
struct ClusterConnection(String);

impl Drop for ClusterConnection {
    fn drop(&mut self) {
        let name = self.0.clone();
        run_aside(async move {
            let api = cluster_connections(admin_client().await);
            let _ = api.delete(&name, &DeleteParams::background()).await;
            // The operator that would drop its in-use finalizer may be gone already.
            let release = json!({ "metadata": { "finalizers": null } });
            let _ = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(release))
                .await;
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
    let connections = team_connection(&setup).await;

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

    // Its status: credentials verified, how, the api-version, who uses it.
    let status = wait_connection_status(&connections, "team", "team verified", |status| {
        condition(status, "Ready")["status"] == "True" && status["identities"] == 1
    })
    .await;
    assert_eq!(status["authentication"], "AccessKey", "{status}");
    assert_eq!(status["apiVersion"], "2025-03-02-preview", "{status}");
    assert_eq!(condition(&status, "CreatesExactlyOnce")["status"], "True");

    // In use, it cannot be deleted from under its identity: it waits for the identity to go.
    connections
        .delete("team", &DeleteParams::default())
        .await
        .unwrap();
    let held = connections.get("team").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(
        held.finalizers()
            .iter()
            .any(|f| f == CONNECTION_SECRET_FINALIZER)
    );

    // Deleted, the identity is cleaned up in ACS through the connection, which then goes.
    setup
        .identities
        .delete("alice", &DeleteParams::default())
        .await
        .unwrap();
    crate::support::wait_gone(&setup.identities, "alice", PROMPTLY).await;
    let stats = setup.emulator.stats().await;
    assert_eq!(stats["requests"]["deleteIdentity"]["204"], 1, "{stats}");
    crate::support::wait_gone(&connections, "team", PROMPTLY).await;
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
    let message = failing_with(
        &refused_identities,
        "bob",
        reason::NAMESPACE_NOT_ALLOWED,
        PROMPTLY,
    )
    .await;
    assert!(
        message.contains(&format!(
            "ClusterAcsConnection {name:?} does not allow namespace {:?}",
            refused.name
        )),
        "{message}"
    );
    let bob = refused_identities.get("bob").await.unwrap();
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

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "4a1e0b3f-5c6d-4e7f-8a9b-0c1d2e3f4a5b";
const OTHER_CLIENT_ID: &str = "6f0c2d1e-3b4a-4c5d-8e9f-a0b1c2d3e4f5";
const UNKNOWN_CLIENT_ID: &str = "0b6a4f21-7c3d-4e5f-9a8b-1c2d3e4f5a6b";
/// The local kube-apiserver's `--service-account-issuer`.
const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Time enough for a retry after a failure the user fixed (user errors back off to 60 s).
const AFTER_A_FIX: std::time::Duration = std::time::Duration::from_secs(90);

/// The API server's ServiceAccount token keys (`/openid/v1/jwks`), written to `dir`: the
/// emulator's Entra authority verifies the operator's TokenRequest tokens against them.
async fn cluster_jwks_file(dir: &crate::support::TempDir) -> std::path::PathBuf {
    let request = http::Request::get("/openid/v1/jwks")
        .body(Vec::new())
        .unwrap();
    let jwks = admin_client().await.request_text(request).await.unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks).unwrap();
    path
}

/// An emulator whose Entra authority knows `client_ids`, each federated with `issuer` and
/// `subject`, and takes the issuer's keys from the JWKS file `jwks`.
fn entra_emulator(
    client_ids: &[&str],
    issuer: &str,
    subject: &str,
    jwks: &std::path::Path,
) -> Emulator {
    let mut args: Vec<String> = client_ids
        .iter()
        .flat_map(|client_id| {
            [
                "--federated-credential".to_owned(),
                format!("tenant={TENANT},client={client_id},issuer={issuer},subject={subject}"),
            ]
        })
        .collect();
    args.extend([
        "--issuer-jwks-file".to_owned(),
        format!("{issuer}={}", jwks.display()),
    ]);
    Emulator::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A ClusterAcsConnection `name` with workload identity at `emulator` (its endpoint and its
/// authority), `token` saying where the federated token comes from, and `extra` spec fields.
fn workload_identity_connection(
    name: &str,
    emulator: &Emulator,
    token: Value,
    extra: Value,
) -> Value {
    let mut identity = json!({
        "tenantId": TENANT,
        "clientId": CLIENT_ID,
        "authorityHost": emulator.endpoint,
    });
    identity
        .as_object_mut()
        .unwrap()
        .extend(token.as_object().unwrap().clone());
    let mut spec = json!({ "endpoint": emulator.endpoint, "workloadIdentity": identity });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({
        "apiVersion": GROUP_VERSION,
        "kind": "ClusterAcsConnection",
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// Names `client_id` in the ServiceAccount's Azure Workload Identity annotation: the
/// ServiceAccount's consent to that application acting as it.
async fn let_act_as(accounts: &Api<ServiceAccount>, name: &str, client_id: &str) {
    let patch = json!({ "metadata": { "annotations": { CLIENT_ID_ANNOTATION: client_id } } });
    accounts
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Sets the cluster connection's client id (a merge patch of that field alone).
async fn set_client_id(connections: &Api<DynamicObject>, name: &str, client_id: &str) {
    let patch = json!({ "spec": { "workloadIdentity": { "clientId": client_id } } });
    connections
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_cluster_connection_with_workload_identity_serves_allowed_namespaces_and_no_secret_holds_a_key()
 {
    crate::support::ensure_crd().await;
    let files = crate::support::TempDir::new("entra");
    let jwks = cluster_jwks_file(&files).await;
    // The operator's namespace and its ServiceAccount, which the Entra application trusts.
    let operator_ns = TestNamespace::new("wi-operator").await;
    let accounts: Api<ServiceAccount> = operator_ns.api();
    let account: ServiceAccount = serde_json::from_value(json!({ "metadata": {
        "name": "acs-operator",
        "annotations": { CLIENT_ID_ANNOTATION: CLIENT_ID },
    } }))
    .unwrap();
    accounts
        .create(&Default::default(), &account)
        .await
        .unwrap();
    let subject = format!("system:serviceaccount:{}:acs-operator", operator_ns.name);
    let emulator = entra_emulator(
        &[CLIENT_ID, OTHER_CLIENT_ID],
        CLUSTER_ISSUER,
        &subject,
        &jwks,
    );
    let team_a = TestNamespace::new("wi-a").await;
    let team_b = TestNamespace::new("wi-b").await;
    let team_c = TestNamespace::new("wi-c").await;
    let name = format!("entra-{}", team_a.name);
    let _cleanup = ClusterConnection(name.clone());
    let account = json!({ "name": "acs-operator", "namespace": operator_ns.name });
    let manifest = workload_identity_connection(
        &name,
        &emulator,
        json!({ "serviceAccountRef": account }),
        json!({ "conditions": [{ "namespaces": [team_a.name, team_b.name] }] }),
    );
    let connections = cluster_connections(admin_client().await);
    apply(&connections, &name, manifest).await;
    let operator_args = ["--leader-election-namespace", operator_ns.name.as_str()];
    let _operators: Vec<Operator> = [&team_a, &team_b, &team_c]
        .iter()
        .map(|team| Operator::start(&team.name, &emulator, &operator_args))
        .collect();
    let (a, b, c) = (team_a.api(), team_b.api(), team_c.api());
    let spec = spec_via("ClusterAcsConnection", &name);
    for (identities, resource) in [(&a, "alice"), (&b, "bob"), (&c, "carol")] {
        crate::support::apply_identity(identities, resource, spec.clone()).await;
    }

    for (identities, namespace, resource) in [(&a, &team_a, "alice"), (&b, &team_b, "bob")] {
        wait_ready(identities, resource, PROMPTLY).await;
        let secrets: Api<Secret> = namespace.api();
        let secret = secrets.get(&format!("{resource}-acs-token")).await.unwrap();
        let token = &crate::support::secret_strings(&secret)["token"];
        let validated = emulator.validate(token).await;
        assert_eq!(validated["valid"], true, "{validated}");
    }
    let carol = wait_condition(
        &c,
        "carol",
        "False",
        reason::NAMESPACE_NOT_ALLOWED,
        PROMPTLY,
    )
    .await;
    assert!(
        carol.finalizers().is_empty(),
        "nothing reached ACS for carol"
    );
    let stats = emulator.stats().await;
    // One Entra token per operator process that served, for all of its calls.
    assert_eq!(stats["requests"]["entraToken"]["200"], 2, "{stats}");
    assert_eq!(
        stats["requests"]["createIdentityWithToken"]["201"], 2,
        "{stats}"
    );
    // No Secret of the operator's or the tenants' namespaces holds an access key.
    for namespace in [&operator_ns, &team_a, &team_b, &team_c] {
        let secrets: Api<Secret> = namespace.api();
        for secret in secrets.list(&Default::default()).await.unwrap() {
            let data = crate::support::secret_strings(&secret);
            assert!(
                data.values()
                    .all(|value| !value.to_ascii_lowercase().contains("accesskey")),
                "{}/{} holds an access key",
                namespace.name,
                secret.name_any()
            );
        }
    }

    // Another application, which the ServiceAccount does not name: no token is requested.
    set_client_id(&connections, &name, OTHER_CLIENT_ID).await;
    crate::support::apply_identity(&a, "alice-2", spec.clone()).await;
    let message = failing_with(&a, "alice-2", reason::FEDERATED_TOKEN_UNAVAILABLE, PROMPTLY).await;
    assert!(
        message.contains(&format!(
            "does not name the application: annotate it with {CLIENT_ID_ANNOTATION}={OTHER_CLIENT_ID}"
        )),
        "{message}"
    );

    // Named, during an Entra outage: a clear condition, then recovery.
    emulator
        .admin_post("entra/outage", json!({ "seconds": 600 }))
        .await;
    let_act_as(&accounts, "acs-operator", OTHER_CLIENT_ID).await;
    let message = failing_with(&a, "alice-2", reason::ENTRA_UNAVAILABLE, AFTER_A_FIX).await;
    assert!(
        message.contains(&format!(
            "could not get a Microsoft Entra ID token from {}: HTTP 503 for ClusterAcsConnection {name:?}",
            emulator.endpoint
        )),
        "{message}"
    );
    emulator.admin_delete("entra/outage").await;
    wait_ready(&a, "alice-2", AFTER_A_FIX).await;

    // A client id Entra does not know: its AADSTS code in the condition, then the fix.
    let_act_as(&accounts, "acs-operator", UNKNOWN_CLIENT_ID).await;
    set_client_id(&connections, &name, UNKNOWN_CLIENT_ID).await;
    crate::support::apply_identity(&b, "bob-2", spec.clone()).await;
    let message = failing_with(&b, "bob-2", reason::ENTRA_AUTHENTICATION_FAILED, PROMPTLY).await;
    assert!(
        message.starts_with(&format!(
            "Microsoft Entra ID refused the workload identity of ClusterAcsConnection {name:?} (HTTP 400, AADSTS700016: "
        )) && message.contains(&format!("Application with identifier '{UNKNOWN_CLIENT_ID}' was not found")),
        "{message}"
    );
    assert!(
        !message.contains("eyJ"),
        "no token in the message: {message}"
    );
    let_act_as(&accounts, "acs-operator", CLIENT_ID).await;
    set_client_id(&connections, &name, CLIENT_ID).await;
    wait_ready(&b, "bob-2", AFTER_A_FIX).await;
}

#[tokio::test]
async fn an_expired_federated_token_file_gives_a_clear_condition_until_the_file_is_renewed() {
    crate::support::ensure_crd().await;
    // A projected token file as the kubelet keeps it, signed by an issuer of the test's own
    // (the API server mints no token that is already expired).
    let issuer = "https://issuer.acs-test.invalid";
    let subject = "system:serviceaccount:acs-system:acs-identity-operator";
    let key = acs_emulator::SigningKey::generate().unwrap();
    let files = crate::support::TempDir::new("token-file");
    let jwks = files.path().join("jwks.json");
    std::fs::write(&jwks, json!({ "keys": [key.public_jwk()] }).to_string()).unwrap();
    let token_file = files.path().join("azure-identity-token");
    let write_token = |expires_in: i64| {
        let now = jiff::Timestamp::now().as_second();
        let claims = json!({
            "iss": issuer, "sub": subject, "aud": ["api://AzureADTokenExchange"],
            "iat": now - 7200, "nbf": now - 7200, "exp": now + expires_in,
        });
        std::fs::write(&token_file, key.mint(&claims)).unwrap();
    };
    write_token(-3000);
    let emulator = entra_emulator(&[CLIENT_ID], issuer, subject, &jwks);
    let team = TestNamespace::new("wi-file").await;
    let name = format!("token-file-{}", team.name);
    let _cleanup = ClusterConnection(name.clone());
    let file = token_file.display().to_string();
    let manifest =
        workload_identity_connection(&name, &emulator, json!({ "tokenFile": file }), json!({}));
    apply(&cluster_connections(admin_client().await), &name, manifest).await;
    let operator_args = ["--leader-election-namespace", team.name.as_str()];
    let _operator = Operator::start(&team.name, &emulator, &operator_args);
    let identities = team.api();
    let spec = spec_via("ClusterAcsConnection", &name);
    crate::support::apply_identity(&identities, "alice", spec).await;

    let message = failing_with(
        &identities,
        "alice",
        reason::ENTRA_AUTHENTICATION_FAILED,
        PROMPTLY,
    )
    .await;
    assert!(
        message.contains("(HTTP 401, AADSTS700024: ")
            && message.contains("Client assertion is not within its valid time range"),
        "{message}"
    );
    assert!(
        !message.contains("eyJ"),
        "no token in the message: {message}"
    );

    // The kubelet renews the file; the next retry reads it afresh.
    write_token(3600);
    wait_ready(&identities, "alice", AFTER_A_FIX).await;
}

#[tokio::test]
async fn retiring_the_preview_api_version_moves_the_operator_to_ga_and_identities_stay_ready() {
    let setup = Setup::new("api-ga").await;
    let connections = team_connection(&setup).await;
    // One identity through the connection, one with a connection Secret of its own.
    setup.apply("alice", basic_spec()).await;
    setup.wait_ready("alice").await;

    setup
        .emulator
        .admin_put("api-versions", json!({ "retired": ["2025-03-02-preview"] }))
        .await;
    // A refresh of an existing identity and a new identity both go through under GA.
    setup
        .annotate("alice", REFRESH_REQUESTED_ANNOTATION, "after-retirement")
        .await;
    let alice = setup
        .wait_refresh_handled("alice", "after-retirement")
        .await;
    assert_eq!(ready(&alice).unwrap().0, "True");
    setup.apply("bob", spec_via("AcsConnection", "team")).await;
    setup.wait_ready("bob").await;
    let data = setup.secret_data("bob-acs-token").await;
    assert_eq!(setup.emulator.validate(&data["token"]).await["valid"], true);
    // The connection warns that creates through it are no longer exactly-once.
    let status = wait_connection_status(&connections, "team", "on GA", |status| {
        status["apiVersion"] == "2026-09-23"
    })
    .await;
    let warning = condition(&status, "CreatesExactlyOnce");
    assert_eq!(warning["status"], "False", "{status}");
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .starts_with("Warning: api-version 2026-09-23 has no customId"),
        "{status}"
    );
    assert_eq!(condition(&status, "Ready")["status"], "True", "{status}");

    let fallbacks = setup
        .operator
        .metric("acs_identity_operator_acs_api_version_fallbacks_total{from=\"2025-03-02-preview\",to=\"2026-09-23\"}")
        .await;
    // Once: alice's Secret is the connection's too, so they share one client.
    assert_eq!(fallbacks, Some(1.0));
    let stats = setup.emulator.stats().await;
    // One request under the retired version, refused: alice's refresh, or the connection's
    // check (a revoke) when it came first; every later one went under GA.
    let refused: u64 = ["issueAccessToken", "revokeAccessTokens"]
        .iter()
        .filter_map(|operation| stats["requests"][operation]["400"].as_u64())
        .sum();
    assert_eq!(refused, 1, "{stats}");
    assert_eq!(stats["requests"]["issueAccessToken"]["200"], 1, "{stats}");
    assert_eq!(
        stats["requests"]["createIdentityWithToken"]["201"], 2,
        "{stats}"
    );
}
