//! The Helm chart (charts/acs-identity-operator): it lints, renders what the issue asks for,
//! ships the CRD checked in under crds/, installs onto the real local control plane, and its
//! RBAC is exactly enough.
//!
//! These install tests run the operator binary as a local process **under the chart's own
//! ServiceAccount** (the chart's Deployment itself runs on the node in tests/integration/node.rs;
//! a local process lets these tests read its log and metrics directly): each asks the
//! TokenRequest API for a token of that ServiceAccount, writes a kubeconfig with it (server
//! and CA taken from the admin kubeconfig) and starts the operator with that kubeconfig. A
//! create → Ready → delete cycle against the emulator then proves the chart's RBAC is enough,
//! and SelfSubjectAccessReviews plus plain calls expecting 403 prove it is not more than needed.
//!
//! Each test installs its own release (a unique name, so the cluster-scoped ClusterRole and
//! ClusterRoleBinding never collide) into its own namespaces, and uninstalls it when done.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::{Value, json};

use crate::support::{
    Emulator, Operator, TempDir, TestNamespace, admin_client, apply_identity, basic_spec,
    create_connection_secret, create_deployment, ensure_crd, kubeconfig, list_events,
    next_second_after, repo_root, secret_strings, wait_for, wait_gone, wait_identity, wait_ready,
};
use acs_identity_operator::crd::{
    CommunicationIdentity, REFRESH_REQUESTED_ANNOTATION, reason, secret_key,
};

const CHART: &str = "charts/acs-identity-operator";
const CYCLE: Duration = Duration::from_secs(60);

/// What the operator does against the API, as (API group, resource[/subresource], verbs): the
/// chart must grant exactly this where the operator watches. Read from the calls in src/: the
/// controller lists and watches CommunicationIdentities, GETs one by name before an ACS call
/// (the cache may lag behind its own last write), lists and watches its labelled Secrets, patches
/// finalizers (merge) and status (server-side apply), GETs the connection Secret, writes the
/// token Secret with server-side apply (which creates it the first time), records Events, and
/// GETs the AcsConnection a spec.connectionRef names.
/// `communicationidentities/finalizers: update` lets it set blockOwnerDeletion on the Secret's
/// ownerReference where the OwnerReferencesPermissionEnforcement admission plugin is on.
const NEEDS: &[(&str, &str, &[&str])] = &[
    (
        "acs-operator.io",
        "communicationidentities",
        &["get", "list", "watch", "patch"],
    ),
    (
        "acs-operator.io",
        "communicationidentities/status",
        &["patch"],
    ),
    (
        "acs-operator.io",
        "communicationidentities/finalizers",
        &["update"],
    ),
    ("", "secrets", &["get", "list", "watch", "create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    // The connections' controller: status, and a finalizer while identities use them.
    (
        "acs-operator.io",
        "acsconnections",
        &["get", "list", "watch", "patch"],
    ),
    ("acs-operator.io", "acsconnections/status", &["patch"]),
    // Workload identity: the token of the ServiceAccount a connection names.
    ("", "serviceaccounts", &["get"]),
    ("", "serviceaccounts/token", &["create"]),
];

/// Cluster-scoped, on top of `NEEDS`: the operator GETs the ClusterAcsConnection a
/// spec.connectionRef names, and the identity's Namespace (its labels, for the connection's
/// namespace selector). Cluster-wide the ClusterRole grants them; in namespaced mode a ClusterRole
/// `<fullname>-cluster-connections` of their own does, the Namespace only the watched one by name.
const CLUSTER_NEEDS: &[(&str, &str, &[&str])] = &[
    ("acs-operator.io", "clusteracsconnections", &["get"]),
    ("", "namespaces", &["get"]),
];

/// With `rolloutRestart.enabled=true`, on top of `NEEDS`: the strategic merge patch of
/// `kubectl rollout restart` on the restart targets.
const RESTART_NEEDS: &[(&str, &str, &[&str])] = &[
    ("apps", "deployments", &["patch"]),
    ("apps", "statefulsets", &["patch"]),
    ("apps", "daemonsets", &["patch"]),
];

/// Leader election: the release's one Lease in the release namespace, read with get, taken with
/// create (RBAC cannot limit create to a name) or update, renewed with update.
const LEASE_VERBS: &[&str] = &["get", "create", "update"];

const ALL_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

// ---------------------------------------------------------------------------------------------
// helm

/// The PATH entries `scripts/local-cluster.sh env` puts first (kubectl and helm).
fn tool_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let output = Command::new(repo_root().join("scripts/local-cluster.sh"))
            .arg("env")
            .output()
            .expect("run scripts/local-cluster.sh env");
        assert!(output.status.success(), "local-cluster.sh env: {output:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        let prefix = text
            .lines()
            .find_map(|line| line.strip_prefix("export PATH="))
            .and_then(|value| value.strip_suffix(":$PATH"))
            .expect("local-cluster.sh env prints `export PATH=…:$PATH`");
        format!("{prefix}:{}", std::env::var("PATH").unwrap_or_default())
    })
}

/// Runs helm against the test cluster with a throwaway home, returning its stdout; fails the
/// test with helm's stderr when it fails.
pub(crate) fn helm(args: &[&str]) -> String {
    let output = helm_output(args);
    assert!(
        output.status.success(),
        "helm {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn helm_output(args: &[&str]) -> std::process::Output {
    let home = TempDir::new("helm-home");
    Command::new("helm")
        .args(args)
        .current_dir(repo_root())
        .env("PATH", tool_path())
        .env("KUBECONFIG", kubeconfig())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm (built by scripts/local-cluster.sh)")
}

/// `--set` arguments for helm.
fn set_args(values: &[(&str, &str)]) -> Vec<String> {
    values
        .iter()
        .flat_map(|(key, value)| ["--set".to_owned(), format!("{key}={value}")])
        .collect()
}

/// The chart rendered by `helm template` as JSON documents, for release `r1` in namespace `ops`.
pub(crate) fn render(values: &[(&str, &str)]) -> Vec<Value> {
    let mut args = vec![
        "template",
        "r1",
        CHART,
        "--namespace",
        "ops",
        "--kube-version",
        "1.37.2",
    ];
    let sets = set_args(values);
    args.extend(sets.iter().map(String::as_str));
    let text = helm(&args);
    // Empty documents (Helm's `# Source:` comments alone) are skipped.
    serde_saphyr::from_multiple(&text).expect("helm template prints YAML")
}

pub(crate) fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

pub(crate) fn kinds(documents: &[Value]) -> BTreeSet<String> {
    documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// A rule: API group, resource, resourceNames and verbs (both sorted).
type Rule = (String, String, Vec<String>, Vec<String>);

/// A role's rules, one per (group, resource), to compare with `NEEDS`.
fn rules(role: &Value) -> BTreeSet<Rule> {
    let strings = |v: &Value| -> Vec<String> {
        let mut out: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        out.sort();
        out
    };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule.get("nonResourceURLs").is_none(), "{rule}");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                out.insert((
                    group.clone(),
                    resource,
                    strings(&rule["resourceNames"]),
                    strings(&rule["verbs"]),
                ));
            }
        }
    }
    out
}

fn rule(group: &str, resource: &str, names: &[&str], verbs: &[&str]) -> Rule {
    let sorted = |items: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        out.sort();
        out
    };
    (
        group.to_owned(),
        resource.to_owned(),
        sorted(names),
        sorted(verbs),
    )
}

fn expected_rules() -> BTreeSet<Rule> {
    NEEDS
        .iter()
        .map(|(group, resource, verbs)| rule(group, resource, &[], verbs))
        .collect()
}

/// `CLUSTER_NEEDS`; with `watch_namespace` (namespaced mode), the Namespace only that one.
fn expected_cluster_rules(watch_namespace: Option<&str>) -> BTreeSet<Rule> {
    CLUSTER_NEEDS
        .iter()
        .map(
            |(group, resource, verbs)| match (*resource, watch_namespace) {
                ("namespaces", Some(namespace)) => rule(group, resource, &[namespace], verbs),
                _ => rule(group, resource, &[], verbs),
            },
        )
        .collect()
}

/// Cluster-wide only (in namespaced mode no operator writes ClusterAcsConnections): their
/// controller, as for AcsConnections.
const CLUSTER_WIDE_NEEDS: &[(&str, &str, &[&str])] = &[
    (
        "acs-operator.io",
        "clusteracsconnections",
        &["get", "list", "watch", "patch"],
    ),
    (
        "acs-operator.io",
        "clusteracsconnections/status",
        &["patch"],
    ),
];

/// The cluster-wide ClusterRole: `rules`, `CLUSTER_NEEDS` and `CLUSTER_WIDE_NEEDS` (which
/// widens CLUSTER_NEEDS' rule on clusteracsconnections).
fn with_cluster_rules(mut rules: BTreeSet<Rule>) -> BTreeSet<Rule> {
    rules.extend(expected_cluster_rules(None));
    rules.retain(|(_, resource, _, _)| resource != "clusteracsconnections");
    rules.extend(
        CLUSTER_WIDE_NEEDS
            .iter()
            .map(|(group, resource, verbs)| rule(group, resource, &[], verbs)),
    );
    rules
}

/// The names of the rendered objects of `kind`.
fn names(documents: &[Value], kind: &str) -> BTreeSet<String> {
    documents
        .iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

/// In namespaced mode, the only cluster-scoped grant: `CLUSTER_NEEDS`, the Namespace by name,
/// bound to the chart's ServiceAccount in `ops`.
fn assert_namespaced_cluster_grant(documents: &[Value], fullname: &str, watch_namespace: &str) {
    let name = format!("{fullname}-cluster-connections");
    assert_eq!(names(documents, "ClusterRole"), [name.clone()].into());
    assert_eq!(
        names(documents, "ClusterRoleBinding"),
        [name.clone()].into()
    );
    assert_eq!(
        rules(find(documents, "ClusterRole", &name)),
        expected_cluster_rules(Some(watch_namespace))
    );
    let binding = find(documents, "ClusterRoleBinding", &name);
    assert_eq!(
        binding["roleRef"],
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name })
    );
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": fullname, "namespace": "ops" }])
    );
}

/// `NEEDS` and `RESTART_NEEDS`.
fn expected_rules_with_restarts() -> BTreeSet<Rule> {
    let mut rules = expected_rules();
    rules.extend(
        RESTART_NEEDS
            .iter()
            .map(|(group, resource, verbs)| rule(group, resource, &[], verbs)),
    );
    rules
}

fn expected_lease_rules(lease: &str) -> BTreeSet<Rule> {
    [
        rule("coordination.k8s.io", "leases", &[], &["create"]),
        rule(
            "coordination.k8s.io",
            "leases",
            &[lease],
            &["get", "update"],
        ),
    ]
    .into()
}

/// A Helm release of the chart, uninstalled when dropped (before its namespace goes, since
/// Helm keeps the release record there and the ClusterRole is cluster-scoped).
pub(crate) struct Release {
    pub(crate) name: String,
    namespace: String,
}

impl Release {
    pub(crate) fn install(namespace: &str, values: &[(&str, &str)]) -> Self {
        let name = format!("acs-{:06}", rand::random::<u32>() % 1_000_000);
        let mut args = vec!["install", &name, CHART, "--namespace", namespace];
        let sets = set_args(values);
        args.extend(sets.iter().map(String::as_str));
        let notes = helm(&args);
        assert!(notes.contains("acs-identity-operator"), "{notes}");
        Self {
            name,
            namespace: namespace.to_owned(),
        }
    }

    /// The ServiceAccount (and every RBAC object) the chart names after the release.
    pub(crate) fn fullname(&self) -> String {
        format!("{}-acs-identity-operator", self.name)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm_output(&["uninstall", &self.name, "--namespace", &self.namespace]);
    }
}

// ---------------------------------------------------------------------------------------------
// acting as the chart's ServiceAccount

/// A kubeconfig for the ServiceAccount `namespace/name`, with a token from the TokenRequest API.
/// The token is written to the file only (mode 0600), never printed.
struct ServiceAccountKubeconfig {
    path: PathBuf,
    _dir: TempDir,
}

impl ServiceAccountKubeconfig {
    async fn new(namespace: &str, name: &str) -> Self {
        let accounts: Api<ServiceAccount> = Api::namespaced(admin_client().await, namespace);
        let request: TokenRequest = serde_json::from_value(json!({
            "spec": { "audiences": [], "expirationSeconds": 3600 }
        }))
        .unwrap();
        let issued: TokenRequest = accounts
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .expect("a token for the chart's ServiceAccount");
        let token = issued.status.expect("TokenRequest status").token;

        let admin = Kubeconfig::read_from(kubeconfig()).unwrap();
        let cluster = admin.clusters[0].cluster.clone().expect("admin cluster");
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "local", "cluster": {
                "server": cluster.server,
                "certificate-authority-data": cluster.certificate_authority_data,
            }}],
            "users": [{ "name": name, "user": { "token": token } }],
            "contexts": [{ "name": "sa", "context": { "cluster": "local", "user": name } }],
            "current-context": "sa",
        });
        let dir = TempDir::new("sa-kubeconfig");
        let path = dir.path().join("kubeconfig");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.write_all(serde_saphyr::to_string(&config).unwrap().as_bytes())
            .unwrap();
        Self { path, _dir: dir }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.path).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }
}

/// Whether the client's user may `verb` `group/resource[/subresource]` in `namespace` (`None`:
/// across all namespaces), by a SelfSubjectAccessReview.
async fn allowed(
    client: &Client,
    namespace: Option<&str>,
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    allowed_named(client, namespace, group, resource, None, verb).await
}

/// `allowed` for the object `name`.
async fn allowed_named(
    client: &Client,
    namespace: Option<&str>,
    group: &str,
    resource: &str,
    name: Option<&str>,
    verb: &str,
) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, subresource)) => (resource, Some(subresource)),
        None => (resource, None),
    };
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({
        "spec": { "resourceAttributes": {
            "namespace": namespace,
            "group": group,
            "resource": resource,
            "subresource": subresource,
            "name": name,
            "verb": verb,
        }}
    }))
    .unwrap();
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    answer.status.expect("review status").allowed
}

/// For each (group, resource) of `table`: in `namespace`, every verb of `ALL_VERBS` is allowed
/// exactly when `table` lists it (or never, with `grant_nothing`). Collects every mismatch.
async fn check_verbs(
    client: &Client,
    namespace: Option<&str>,
    table: &[(&str, &str, &[&str])],
    grant_nothing: bool,
    mismatches: &mut Vec<String>,
) {
    for (group, resource, verbs) in table {
        for verb in ALL_VERBS {
            let expected = !grant_nothing && verbs.contains(verb);
            let actual = allowed(client, namespace, group, resource, verb).await;
            if actual != expected {
                mismatches.push(format!(
                    "{verb} {group}/{resource} in {}: allowed={actual}, expected {expected}",
                    namespace.unwrap_or("(all namespaces)")
                ));
            }
        }
    }
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// In `namespace`, the Lease `lease` may be exactly read, created and updated (or, with
/// `grant_nothing`, not touched at all), and no other Lease read or updated.
async fn check_lease(
    client: &Client,
    namespace: &str,
    lease: &str,
    grant_nothing: bool,
    mismatches: &mut Vec<String>,
) {
    for verb in ALL_VERBS {
        for (name, expected) in [
            (lease, !grant_nothing && LEASE_VERBS.contains(verb)),
            ("another-lease", !grant_nothing && *verb == "create"),
        ] {
            let actual = allowed_named(
                client,
                Some(namespace),
                "coordination.k8s.io",
                "leases",
                Some(name),
                verb,
            )
            .await;
            if actual != expected {
                mismatches.push(format!(
                    "{verb} lease {name} in {namespace}: allowed={actual}, expected {expected}"
                ));
            }
        }
    }
}

/// Starts the operator under the ServiceAccount's kubeconfig, with leader election on the
/// release's Lease as the chart configures it, watching `namespace`, and runs a
/// create → Ready → delete cycle there against a fresh emulator.
async fn create_ready_delete(sa: &ServiceAccountKubeconfig, release: &Release, namespace: &str) {
    let emulator = Emulator::start(&[]);
    let admin = admin_client().await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), namespace);
    let identities: Api<CommunicationIdentity> = Api::namespaced(admin.clone(), namespace);
    create_connection_secret(&secrets, "acs-connection", &emulator.connection_string).await;
    let lease = release.fullname();
    let operator = Operator::start_with_kubeconfig(
        namespace,
        &emulator,
        &[
            "--leader-elect",
            "--leader-election-namespace",
            &release.namespace,
            "--leader-election-lease-name",
            &lease,
        ],
        sa.path(),
    );

    apply_identity(&identities, "alice", basic_spec()).await;
    let resource = wait_ready(&identities, "alice", CYCLE).await;
    let identity_id = resource.status.unwrap().identity_id.unwrap();
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);
    let holder = leases
        .get(&lease)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert!(holder.is_some_and(|h| !h.is_empty()), "the operator leads");
    let secret = secrets.get("alice-acs-token").await.unwrap();
    let token = secret_strings(&secret)[secret_key::TOKEN].clone();
    let validity = emulator.validate(&token).await;
    assert_eq!(validity["valid"], true, "the Secret holds a valid token");

    // Events are recorded under the ServiceAccount too.
    wait_for("an IdentityCreated event", CYCLE, || async {
        list_events(&admin, namespace)
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some(reason::IDENTITY_CREATED))
            .then_some(())
    })
    .await;

    identities
        .delete("alice", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&identities, "alice", CYCLE).await;
    let validity = emulator.validate(&token).await;
    assert_eq!(
        validity["status"], "deleted",
        "identity {identity_id} is deleted in ACS"
    );
    let stats = emulator.stats().await;
    assert_eq!(stats["identitiesAlive"], 0, "{stats}");
    assert_eq!(stats["identitiesDeleted"], 1, "{stats}");
    wait_for("the connection Secret released", CYCLE, || async {
        secrets
            .get("acs-connection")
            .await
            .unwrap()
            .finalizers()
            .is_empty()
            .then_some(())
    })
    .await;

    // Nothing was refused along the way (a refused Event would only be logged).
    let logs = operator.logs();
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "the operator was refused something under the chart's RBAC:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// tests

#[test]
fn chart_crd_is_the_checked_in_crd() {
    let checked_in = std::fs::read_to_string(repo_root().join("crds/acs-operator.io.yaml"))
        .expect("crds/acs-operator.io.yaml");
    let in_chart =
        std::fs::read_to_string(repo_root().join(CHART).join("crds/acs-operator.io.yaml"))
            .unwrap_or_default();
    assert!(
        checked_in == in_chart,
        "the chart's CRDs differ from crds/acs-operator.io.yaml; copy them with\n\
         \n    cp crds/acs-operator.io.yaml {CHART}/crds/\n"
    );
}

#[test]
fn chart_grants_restarts_only_when_enabled() {
    helm(&[
        "lint",
        "--strict",
        CHART,
        "--set",
        "rolloutRestart.enabled=true",
    ]);
    let fullname = "r1-acs-identity-operator";
    let cluster_wide = render(&[("rolloutRestart.enabled", "true")]);
    assert_eq!(
        rules(find(&cluster_wide, "ClusterRole", fullname)),
        with_cluster_rules(expected_rules_with_restarts())
    );
    let namespaced = render(&[
        ("rolloutRestart.enabled", "true"),
        ("watchNamespace", "app"),
    ]);
    let role = find(&namespaced, "Role", fullname);
    assert_eq!(role["metadata"]["namespace"], "app");
    assert_eq!(rules(role), expected_rules_with_restarts());
    assert_namespaced_cluster_grant(&namespaced, fullname, "app");
}

#[test]
fn chart_lints_and_renders_least_privilege_rbac() {
    for values in [
        vec![],
        vec![
            ("watchNamespace", "app"),
            ("extraCA.secret.name", "corp-ca"),
            ("serviceMonitor.enabled", "true"),
            ("logFormat", "json"),
        ],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        let sets = set_args(&values);
        args.extend(sets.iter().map(String::as_str));
        helm(&args);
    }

    // Cluster-wide (the default).
    let docs = render(&[]);
    let fullname = "r1-acs-identity-operator";
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
        .map(String::from)
        .into(),
    );
    assert_eq!(
        rules(find(&docs, "ClusterRole", fullname)),
        with_cluster_rules(expected_rules())
    );
    assert_eq!(names(&docs, "ClusterRole"), [fullname.to_owned()].into());
    let binding = find(&docs, "ClusterRoleBinding", fullname);
    assert_eq!(binding["roleRef"]["name"], fullname);
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": fullname, "namespace": "ops" }])
    );
    let lease_role = find(&docs, "Role", &format!("{fullname}-leader-election"));
    assert_eq!(lease_role["metadata"]["namespace"], "ops");
    assert_eq!(rules(lease_role), expected_lease_rules(fullname));

    let deployment = find(&docs, "Deployment", fullname);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], fullname);
    assert_eq!(
        pod["securityContext"],
        json!({
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            "seccompProfile": { "type": "RuntimeDefault" },
        })
    );
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "acs-identity-operator:0.1.0");
    assert_eq!(
        container["args"],
        json!([
            "--metrics-addr=0.0.0.0:8080",
            "--log-format=text",
            "--acs-rate-limit=1",
            "--leader-elect",
            "--leader-election-namespace=ops",
            "--leader-election-lease-name=r1-acs-identity-operator",
        ])
    );
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect();
    assert_eq!(env["RUST_LOG"]["value"], "info");
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        container["securityContext"],
        json!({
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        })
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container.get("volumeMounts").is_none());
    let service = find(&docs, "Service", &format!("{fullname}-metrics"));
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");

    // Namespaced, with an extra CA, JSON logs, debug level, a raised ACS quota and a
    // ServiceMonitor.
    let docs = render(&[
        ("acsRateLimit", "2.5"),
        (
            "acsEndpointSuffixes",
            "communication.azure.com\\,acs.corp.example",
        ),
        ("watchNamespace", "app"),
        ("extraCA.configMap.name", "corp-ca"),
        ("extraCA.configMap.key", "bundle.pem"),
        ("logFormat", "json"),
        ("logLevel", "debug"),
        ("serviceMonitor.enabled", "true"),
        ("metrics.port", "9090"),
    ]);
    assert_namespaced_cluster_grant(&docs, fullname, "app");
    let role = find(&docs, "Role", fullname);
    assert_eq!(role["metadata"]["namespace"], "app");
    assert_eq!(rules(role), expected_rules());
    let binding = find(&docs, "RoleBinding", fullname);
    assert_eq!(binding["metadata"]["namespace"], "app");
    assert_eq!(binding["subjects"][0]["namespace"], "ops");
    assert_eq!(
        find(&docs, "Role", &format!("{fullname}-leader-election"))["metadata"]["namespace"],
        "ops"
    );
    let pod = &find(&docs, "Deployment", fullname)["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["args"],
        json!([
            "--metrics-addr=0.0.0.0:9090",
            "--log-format=json",
            "--acs-rate-limit=2.5",
            "--acs-endpoint-suffixes=communication.azure.com,acs.corp.example",
            "--watch-namespace=app",
            "--acs-ca-file=/etc/acs-identity-operator/extra-ca/ca.crt",
            "--leader-elect",
            "--leader-election-namespace=ops",
            "--leader-election-lease-name=r1-acs-identity-operator",
        ])
    );
    assert_eq!(
        container["env"][0],
        json!({ "name": "RUST_LOG", "value": "debug" })
    );
    assert_eq!(
        container["volumeMounts"],
        json!([{ "name": "extra-ca", "mountPath": "/etc/acs-identity-operator/extra-ca", "readOnly": true }])
    );
    assert_eq!(
        pod["volumes"],
        json!([{ "name": "extra-ca", "configMap": {
            "name": "corp-ca", "items": [{ "key": "bundle.pem", "path": "ca.crt" }],
        }}])
    );
    let monitor = find(&docs, "ServiceMonitor", fullname);
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");

    // Leader election off: no Lease rights, no flag.
    let docs = render(&[("leaderElection.enabled", "false")]);
    assert!(!kinds(&docs).contains("Role"));
    let args =
        &find(&docs, "Deployment", fullname)["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(!args.to_string().contains("leader"), "{args}");

    // Contradictions are refused at render time.
    for values in [
        &[
            ("extraCA.configMap.name", "a"),
            ("extraCA.secret.name", "b"),
        ][..],
        &[("replicas", "2"), ("leaderElection.enabled", "false")][..],
        &[("logFormat", "xml")][..],
    ] {
        let mut args = vec!["template", "r1", CHART, "--kube-version", "1.37.2"];
        let sets = set_args(values);
        args.extend(sets.iter().map(String::as_str));
        assert!(
            !helm_output(&args).status.success(),
            "{values:?} must not render"
        );
    }
}

/// Every flag the chart passes to the operator is one `acs-identity-operator run` accepts.
#[test]
fn chart_flags_are_known_to_the_operator() {
    let docs = render(&[
        ("watchNamespace", "app"),
        ("acsEndpointSuffixes", "127.0.0.1"),
        ("extraCA.secret.name", "corp-ca"),
    ]);
    let args = find(&docs, "Deployment", "r1-acs-identity-operator")["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .clone();
    let help = Command::new(env!("CARGO_BIN_EXE_acs-identity-operator"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for arg in args.as_array().unwrap() {
        let flag = arg.as_str().unwrap().split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "`acs-identity-operator run` has no flag {flag}:\n{help}"
        );
    }
}

/// Cluster-wide install: the operator, running as the chart's ServiceAccount, takes an identity
/// through create → Ready → delete (deleted in ACS).
#[tokio::test]
async fn chart_service_account_runs_a_create_ready_delete_cycle() {
    let ns = TestNamespace::new("chart-all").await;
    let release = Release::install(&ns.name, &[]);
    ensure_crd().await;
    let sa = ServiceAccountKubeconfig::new(&ns.name, &release.fullname()).await;

    let client = sa.client().await;
    // Cluster-wide: the identities of any namespace, but still no ConfigMaps and no deletes.
    assert!(
        allowed(
            &client,
            None,
            "acs-operator.io",
            "communicationidentities",
            "watch"
        )
        .await
    );
    assert!(allowed(&client, None, "", "secrets", "list").await);
    assert!(!allowed(&client, None, "", "secrets", "delete").await);
    assert!(!allowed(&client, None, "", "configmaps", "get").await);
    forbidden(
        Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
            .list(&ListParams::default())
            .await,
        "listing ConfigMaps",
    );
    let mut mismatches = Vec::new();
    // Namespaces: get only; ClusterAcsConnections: what their controller needs.
    let namespaces: Vec<_> = (CLUSTER_NEEDS.iter())
        .filter(|(_, resource, _)| *resource == "namespaces")
        .copied()
        .collect();
    check_verbs(&client, None, &namespaces, false, &mut mismatches).await;
    check_verbs(&client, None, CLUSTER_WIDE_NEEDS, false, &mut mismatches).await;
    // Leases only in the release namespace, even cluster-wide.
    check_lease(
        &client,
        &ns.name,
        &release.fullname(),
        false,
        &mut mismatches,
    )
    .await;
    check_lease(
        &client,
        "default",
        &release.fullname(),
        true,
        &mut mismatches,
    )
    .await;
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));

    create_ready_delete(&sa, &release, &ns.name).await;
    drop(release);
}

/// Restarts of spec.rolloutRestartTargets need `rolloutRestart.enabled`: without it the chart's
/// ServiceAccount may not patch workloads, and the operator running under it delivers the new
/// token and reports the restart it may not make; with it, it may patch exactly those kinds.
#[tokio::test]
async fn restart_targets_need_the_chart_value_and_are_reported_without_it() {
    let ns = TestNamespace::new("chart-restart").await;
    let release = Release::install(&ns.name, &[]);
    ensure_crd().await;
    let sa = ServiceAccountKubeconfig::new(&ns.name, &release.fullname()).await;
    let client = sa.client().await;
    for resource in ["deployments", "statefulsets", "daemonsets"] {
        assert!(!allowed(&client, Some(&ns.name), "apps", resource, "patch").await);
    }

    let emulator = Emulator::start(&[]);
    let admin = admin_client().await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns.name);
    let identities: Api<CommunicationIdentity> = Api::namespaced(admin.clone(), &ns.name);
    create_connection_secret(&secrets, "acs-connection", &emulator.connection_string).await;
    create_deployment(&Api::namespaced(admin.clone(), &ns.name), "frontend").await;
    let _operator = Operator::start_with_kubeconfig(&ns.name, &emulator, &[], sa.path());
    let mut spec = basic_spec();
    spec["rolloutRestartTargets"] = json!([{ "kind": "Deployment", "name": "frontend" }]);
    apply_identity(&identities, "alice", spec).await;
    wait_ready(&identities, "alice", CYCLE).await;
    let token =
        secret_strings(&secrets.get("alice-acs-token").await.unwrap())[secret_key::TOKEN].clone();
    next_second_after(jiff::Timestamp::now()).await;
    identities
        .patch(
            "alice",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": {
                REFRESH_REQUESTED_ANNOTATION: "1",
            } } })),
        )
        .await
        .unwrap();
    let refused = wait_identity(&identities, "alice", "the restart reported", CYCLE, |r| {
        r.status
            .as_ref()
            .and_then(|s| s.rollout_restart.as_ref())
            .is_some_and(|restart| {
                restart
                    .failed_targets
                    .iter()
                    .any(|f| f.reason == reason::RESTART_FORBIDDEN)
            })
    })
    .await;
    let failure = &refused
        .status
        .unwrap()
        .rollout_restart
        .unwrap()
        .failed_targets[0];
    assert!(
        failure.message.contains("rolloutRestart.enabled=true"),
        "{}",
        failure.message
    );
    let refreshed = secret_strings(&secrets.get("alice-acs-token").await.unwrap());
    assert_ne!(
        refreshed[secret_key::TOKEN],
        token,
        "the token is delivered all the same"
    );
    drop(release);

    let enabled_ns = TestNamespace::new("chart-restart-on").await;
    let enabled = Release::install(&enabled_ns.name, &[("rolloutRestart.enabled", "true")]);
    let sa = ServiceAccountKubeconfig::new(&enabled_ns.name, &enabled.fullname()).await;
    let client = sa.client().await;
    for resource in ["deployments", "statefulsets", "daemonsets"] {
        for verb in ALL_VERBS {
            let expected = *verb == "patch";
            assert_eq!(
                allowed(&client, Some(&enabled_ns.name), "apps", resource, verb).await,
                expected,
                "{verb} {resource}"
            );
        }
    }
    drop(enabled);
}

/// Namespaced install (`watchNamespace`): the ServiceAccount may do exactly what the operator
/// needs in that namespace, hold its Lease in the release namespace, and nothing else: no
/// ConfigMaps, nothing in another namespace. Then the operator runs a full cycle under it.
#[tokio::test]
async fn namespaced_chart_grants_exactly_what_the_operator_needs() {
    let operator_ns = TestNamespace::new("chart-ops").await;
    let watched = TestNamespace::new("chart-app").await;
    let other = TestNamespace::new("chart-other").await;
    let release = Release::install(&operator_ns.name, &[("watchNamespace", &watched.name)]);
    ensure_crd().await;
    let sa = ServiceAccountKubeconfig::new(&operator_ns.name, &release.fullname()).await;
    let client = sa.client().await;

    let mut mismatches = Vec::new();
    check_verbs(&client, Some(&watched.name), NEEDS, false, &mut mismatches).await;
    check_verbs(&client, Some(&other.name), NEEDS, true, &mut mismatches).await;
    check_verbs(
        &client,
        Some(&operator_ns.name),
        NEEDS,
        true,
        &mut mismatches,
    )
    .await;
    check_verbs(&client, None, NEEDS, true, &mut mismatches).await;
    // Cluster-scoped: any ClusterAcsConnection by name, and the watched Namespace only.
    let cluster_connections: (&str, &str, &[&str]) =
        ("acs-operator.io", "clusteracsconnections", &["get"]);
    check_verbs(
        &client,
        None,
        &[cluster_connections],
        false,
        &mut mismatches,
    )
    .await;
    for (namespace, readable) in [
        (None, false),
        (Some(&watched.name), true),
        (Some(&other.name), false),
        (Some(&operator_ns.name), false),
    ] {
        for verb in ALL_VERBS {
            let expected = readable && *verb == "get";
            let name = namespace.map(String::as_str);
            let actual = allowed_named(&client, None, "", "namespaces", name, verb).await;
            if actual != expected {
                mismatches.push(format!(
                    "{verb} namespace {}: allowed={actual}, expected {expected}",
                    name.unwrap_or("(any)")
                ));
            }
        }
    }
    let lease = release.fullname();
    check_lease(&client, &operator_ns.name, &lease, false, &mut mismatches).await;
    check_lease(&client, &watched.name, &lease, true, &mut mismatches).await;
    let configmaps: (&str, &str, &[&str]) = ("", "configmaps", &[]);
    for namespace in [&watched.name, &operator_ns.name, &other.name] {
        check_verbs(
            &client,
            Some(namespace),
            &[configmaps],
            true,
            &mut mismatches,
        )
        .await;
    }
    assert!(
        mismatches.is_empty(),
        "the chart's RBAC is not exactly what the operator needs:\n{}",
        mismatches.join("\n")
    );

    // The same, as plain calls the API server refuses.
    forbidden(
        Api::<ConfigMap>::namespaced(client.clone(), &watched.name)
            .list(&ListParams::default())
            .await,
        "listing ConfigMaps in the watched namespace",
    );
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": { "name": "foreign" }, "stringData": { "k": "v" }
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin_client().await, &other.name)
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    forbidden(
        Api::<Secret>::namespaced(client.clone(), &other.name)
            .get("foreign")
            .await,
        "reading a Secret in another namespace",
    );
    forbidden(
        Api::<Secret>::all(client.clone())
            .list(&ListParams::default())
            .await,
        "listing Secrets in all namespaces",
    );
    forbidden(
        Api::<CommunicationIdentity>::namespaced(client.clone(), &other.name)
            .list(&ListParams::default())
            .await,
        "listing CommunicationIdentities in another namespace",
    );
    forbidden(
        Api::<Secret>::namespaced(client.clone(), &watched.name)
            .delete("anything", &DeleteParams::default())
            .await,
        "deleting a Secret in the watched namespace",
    );

    create_ready_delete(&sa, &release, &watched.name).await;
    drop(release);
}
