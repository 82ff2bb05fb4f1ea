//! What the integration tests share: one real control plane per run, a namespace per test.
//!
//! The control plane is started once, on first use, through `scripts/local-cluster.sh up` with
//! its state under `target/`, and with `ACS_WATCH_PID` set to this process, so it stops by itself
//! when the test binary exits — however it exits, a panic or a kill included. With
//! `ACS_TEST_REUSE_CLUSTER=1` the cluster that `KUBECONFIG` points at is used instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource as _};
use serde_json::{Value, json};

use acs_emulator::process::{Launch, Ready};
use acs_identity_operator::crd::{CommunicationIdentity, READY_CONDITION, reason};
use acs_identity_operator::launch;
use acs_identity_operator::metrics::PREFIX;

/// How long a test waits for what the operator or the emulator does promptly.
pub const PROMPTLY: Duration = Duration::from_secs(30);

/// The checkout under test. Read at run time (cargo sets it for every test process): the
/// compile-time value is baked into the binary, and a build cache shared by checkouts at other
/// paths can hand this checkout a test binary built in another one.
pub fn repo_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .expect("CARGO_MANIFEST_DIR is set by cargo test")
    })
}

/// The admin kubeconfig of the run's control plane, starting it if needed.
pub fn kubeconfig() -> &'static Path {
    static KUBECONFIG: OnceLock<PathBuf> = OnceLock::new();
    KUBECONFIG.get_or_init(|| {
        if std::env::var("ACS_TEST_REUSE_CLUSTER").as_deref() == Ok("1") {
            return std::env::var("KUBECONFIG")
                .expect("ACS_TEST_REUSE_CLUSTER=1 needs KUBECONFIG to point at the cluster")
                .into();
        }
        let state = repo_root()
            .join(".dev")
            .join(format!("test-cluster-{}", std::process::id()));
        let status = Command::new(repo_root().join("scripts/local-cluster.sh"))
            .arg("up")
            .env("ACS_DEV_DIR", &state)
            .env("ACS_WATCH_PID", std::process::id().to_string())
            .env("ACS_REMOVE_STATE_ON_EXIT", "1")
            .status()
            .expect("run scripts/local-cluster.sh");
        assert!(status.success(), "scripts/local-cluster.sh up failed");
        state.join("kubeconfig")
    })
}

pub async fn admin_config() -> Config {
    let kubeconfig = Kubeconfig::read_from(kubeconfig()).expect("read kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable")
}

pub async fn admin_client() -> Client {
    Client::try_from(admin_config().await).expect("client")
}

/// A namespace of the test's own, deleted (best effort) when dropped.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        let client = admin_client().await;
        let suffix: u32 = rand::random::<u32>() % 1_000_000;
        let name = format!("{prefix}-{suffix:06}");
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": { "name": name }
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create test namespace");
        Self { name, client }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        run_aside(async move {
            let _ = Api::<Namespace>::all(admin_client().await)
                .delete(&name, &DeleteParams::background())
                .await;
        });
    }
}

/// Runs `work` to its end from a `Drop`, which cannot await: on a short-lived runtime of its own
/// thread, with clients of its own (the test's are driven by the test's runtime, blocked here).
pub fn run_aside(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(work);
    })
    .join();
}

/// A Secret's data as UTF-8 strings.
pub fn secret_strings(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

/// Waits until the object `name` no longer exists.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, deadline: Duration)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{name} to be gone"), deadline, || async {
        api.get_opt(name).await.unwrap().is_none().then_some(())
    })
    .await;
}

/// Waits until the wall clock is past the second of `time`. ACS tokens carry whole-second
/// times, so two tokens for the same identity and scopes minted within one second are equal;
/// a test that tells tokens apart issues them in different seconds.
pub async fn next_second_after(time: jiff::Timestamp) {
    wait_for("the next second", Duration::from_secs(2), || async {
        (jiff::Timestamp::now().as_second() > time.as_second()).then_some(())
    })
    .await;
}

/// Polls `check` until it returns `Some`, failing the test with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Directory of the workspace's built binaries (the test binary lives in `<dir>/deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary is in <target>/<profile>/deps")
        .to_path_buf()
}

/// A running acs-emulator process, killed when dropped.
pub struct Emulator {
    child: std::process::Child,
    pub connection_string: String,
    pub endpoint: String,
    pub ca_file: PathBuf,
    pub key: String,
    http: reqwest::Client,
    _dir: TempDir,
}

impl Emulator {
    /// Starts the emulator over HTTPS with its own CA, the admin prefix on, and `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        let dir = TempDir::new("emulator");
        let key = "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=".to_owned();
        let mut args = vec!["--access-key".to_owned(), key.clone()];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let launch = Launch {
            program: bin_dir().join("acs-emulator"),
            tls_dir: dir.path().to_owned(),
            args,
        };
        let mut child = launch
            .command()
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start acs-emulator (built by `cargo build --workspace --bins`)");
        let Ready {
            connection_string,
            endpoint,
            ca_file,
        } = launch.wait_ready(&mut child).unwrap();
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_file).unwrap()).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        Self {
            child,
            connection_string,
            endpoint,
            ca_file,
            key,
            http,
            _dir: dir,
        }
    }

    /// GET an admin (`/_emulator/…`) path as JSON.
    pub async fn admin_get(&self, path: &str) -> Value {
        self.admin(reqwest::Method::GET, path, None).await
    }

    /// POST JSON to an admin path.
    pub async fn admin_post(&self, path: &str, body: Value) -> Value {
        self.admin(reqwest::Method::POST, path, Some(body)).await
    }

    /// PUT JSON to an admin path (e.g. `api-versions`, to retire some).
    pub async fn admin_put(&self, path: &str, body: Value) -> Value {
        self.admin(reqwest::Method::PUT, path, Some(body)).await
    }

    /// DELETE an admin path (e.g. `outage`, to end one).
    pub async fn admin_delete(&self, path: &str) {
        self.admin(reqwest::Method::DELETE, path, None).await;
    }

    /// PATCH the emulator's runtime configuration (limits, faults, time scale).
    pub async fn patch_config(&self, body: Value) {
        self.admin(reqwest::Method::PATCH, "config", Some(body))
            .await;
    }

    /// Its counters: identities alive and deleted, tokens issued, requests by operation.
    pub async fn stats(&self) -> Value {
        self.admin_get("stats").await
    }

    /// What the emulator says of `token`: `valid`, `status`, `identity`, `scopes`, `exp`.
    pub async fn validate(&self, token: &str) -> Value {
        self.admin_post("validate", json!({ "token": token })).await
    }

    /// An admin request; its JSON answer, or null for an answer without a body.
    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}/_emulator/{path}", self.endpoint));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap().error_for_status().unwrap();
        response.json().await.unwrap_or(Value::Null)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory under the target dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = bin_dir().join("tmp").join(format!(
            "{prefix}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `acs-identity-operator run` process watching one namespace; killed when dropped.
/// Its stdout and stderr go to a log file the test can read.
pub struct Operator {
    child: std::process::Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Operator {
    pub fn start(namespace: &str, emulator: &Emulator, extra: &[&str]) -> Self {
        Self::start_with_kubeconfig(namespace, emulator, extra, kubeconfig())
    }

    /// Like `start`, but trusting the CAs in `ca_file` (a PEM bundle) for ACS instead of the
    /// emulator's alone: for tenants whose endpoints are servers of the test's own.
    pub fn start_with_ca_file(namespace: &str, ca_file: &Path, extra: &[&str]) -> Self {
        Self::spawn(namespace, ca_file, extra, kubeconfig())
    }

    /// Like `start`, but talking to the API server as whoever `kubeconfig` names (e.g. a
    /// ServiceAccount, to prove its RBAC is enough).
    pub fn start_with_kubeconfig(
        namespace: &str,
        emulator: &Emulator,
        extra: &[&str],
        kubeconfig: &Path,
    ) -> Self {
        Self::spawn(namespace, &emulator.ca_file, extra, kubeconfig)
    }

    fn spawn(namespace: &str, ca_file: &Path, extra: &[&str], kubeconfig: &Path) -> Self {
        let dir = TempDir::new("operator");
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).unwrap();
        let launch = launch::Launch {
            program: env!("CARGO_BIN_EXE_acs-identity-operator").into(),
            kubeconfig: kubeconfig.to_owned(),
            ca_file: ca_file.to_owned(),
            args: ["--watch-namespace", namespace]
                .iter()
                .chain(extra)
                .map(|arg| (*arg).to_owned())
                .collect(),
        };
        let child = launch
            .command()
            .env("RUST_LOG", "info,acs_identity_operator=debug")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start acs-identity-operator");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    /// Everything the operator logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The base URL of its operations endpoints (`/metrics`, `/healthz`, `/readyz`), from the
    /// `serving metrics on <addr>` line it logs at start (text or JSON).
    pub async fn admin_url(&self) -> String {
        wait_for(
            "the operator to log its metrics address",
            Duration::from_secs(30),
            || async { launch::metrics_addr(&self.logs()).map(|addr| format!("http://{addr}")) },
        )
        .await
    }

    /// The value of `series` in its `/metrics`: a metric name with its labels as exposed (e.g.
    /// `acs_identity_operator_leader`); `None` while the series is not exposed (a labelled
    /// counter appears with its first count).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let url = format!("{}/metrics", self.admin_url().await);
        let text = reqwest::get(&url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The reconcile passes it has finished.
    pub async fn reconciles(&self) -> u64 {
        let series = format!("{PREFIX}_reconciles_total");
        let count = self.metric(&series).await;
        count.unwrap_or_else(|| panic!("no {series} in /metrics")) as u64
    }

    /// `reconciles` once none has finished for a second: the passes that follow were triggered
    /// by what came after this call, not by the operator's own last writes.
    pub async fn settled_reconciles(&self) -> u64 {
        let last = std::cell::Cell::new(self.reconciles().await);
        wait_for("the operator's reconciles to settle", PROMPTLY, || async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.reconciles().await;
            (last.replace(now) == now).then_some(now)
        })
        .await
    }

    /// Asks the process to stop (SIGTERM, as Kubernetes does) and waits until it has.
    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the operator ignored SIGTERM for 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How the process ended, or `None` while it still runs.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait on the operator process")
    }

    /// The process's peak resident memory so far (`VmHWM` in `/proc/<pid>/status`), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {path} (has the operator exited?): {e}"));
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM line in {path}"));
        kib * 1024
    }

    /// Stops the process at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Installs the checked-in CRDs (idempotent) and waits until the API server serves each.
pub async fn ensure_crd() {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
            use kube::api::{Patch, PatchParams};
            let text =
                std::fs::read_to_string(repo_root().join("crds/acs-operator.io.yaml")).unwrap();
            let documents: Vec<CustomResourceDefinition> =
                serde_saphyr::from_multiple(&text).unwrap();
            assert!(!documents.is_empty(), "crds/acs-operator.io.yaml holds no CRD");
            let crds: Api<CustomResourceDefinition> = Api::all(admin_client().await);
            let mut names = Vec::new();
            for crd in &documents {
                let name = crd.metadata.name.clone().unwrap();
                crds.patch(&name, &PatchParams::apply("integration-tests").force(), &Patch::Apply(crd))
                    .await
                    .unwrap_or_else(|error| panic!("install the CRD {name}: {error}"));
                names.push(name);
            }
            for name in &names {
                wait_for(
                    &format!("the CRD {name} to be established"),
                    Duration::from_secs(30),
                    || async {
                        let crd = crds.get(name).await.ok()?;
                        crd.status?
                            .conditions?
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                            .then_some(())
                    },
                )
                .await;
            }
        })
        .await;
}

// ---------------------------------------------------------------------------------------------
// CommunicationIdentities and their connection Secrets

/// The spec most tests apply: the connection Secret `acs-connection`, chat and voip, 1-h tokens
/// and a label for the token Secret.
pub fn basic_spec() -> Value {
    json!({
        "connectionSecretRef": { "name": "acs-connection" },
        "scopes": ["chat", "voip"],
        "tokenLifetime": "1h",
        "secretTemplate": { "labels": { "team": "chat" } },
    })
}

/// A connection Secret `name` holding `connection_string`.
pub fn connection_secret(name: &str, connection_string: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "stringData": { "connectionString": connection_string }
    }))
    .unwrap()
}

/// Creates the connection Secret `name` holding `connection_string`.
pub async fn create_connection_secret(secrets: &Api<Secret>, name: &str, connection_string: &str) {
    secrets
        .create(
            &PostParams::default(),
            &connection_secret(name, connection_string),
        )
        .await
        .unwrap_or_else(|e| panic!("create the connection Secret {name}: {e}"));
}

/// Creates the CommunicationIdentity `name` with `spec`.
pub async fn create_identity(identities: &Api<CommunicationIdentity>, name: &str, spec: Value) {
    let spec = serde_json::from_value(spec).unwrap();
    identities
        .create(
            &PostParams::default(),
            &CommunicationIdentity::new(name, spec),
        )
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

/// Applies the CommunicationIdentity `name` with `spec` (server-side, as a user would with
/// `kubectl apply`): creates it, or changes it.
pub async fn apply_identity(
    identities: &Api<CommunicationIdentity>,
    name: &str,
    spec: Value,
) -> CommunicationIdentity {
    identities
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(identity_manifest(name, spec)),
        )
        .await
        .expect("the API server accepts the resource")
}

/// The CommunicationIdentity `name` with `spec`, as a manifest a user writes.
pub fn identity_manifest(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": CommunicationIdentity::api_version(&()),
        "kind": CommunicationIdentity::kind(&()),
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// The resource's Ready condition.
pub fn ready_condition(resource: &CommunicationIdentity) -> Option<&Condition> {
    resource
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == READY_CONDITION)
}

/// The status and reason of the resource's Ready condition.
pub fn ready(resource: &CommunicationIdentity) -> Option<(String, String)> {
    ready_condition(resource).map(|c| (c.status.clone(), c.reason.clone()))
}

/// The message of the resource's Ready condition (empty without one).
pub fn ready_message(resource: &CommunicationIdentity) -> String {
    ready_condition(resource)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Waits until `check` holds for the resource; on timeout, fails with its Ready condition then.
pub async fn wait_identity(
    identities: &Api<CommunicationIdentity>,
    name: &str,
    what: &str,
    deadline: Duration,
    check: impl Fn(&CommunicationIdentity) -> bool,
) -> CommunicationIdentity {
    let waiting = wait_for(what, Duration::MAX, || async {
        let resource = identities.get_opt(name).await.unwrap()?;
        check(&resource).then_some(resource)
    });
    match tokio::time::timeout(deadline, waiting).await {
        Ok(resource) => resource,
        Err(_) => {
            let resource = identities.get_opt(name).await.unwrap();
            let condition = resource.as_ref().and_then(ready_condition);
            panic!(
                "{name}: no {what} within {deadline:?}; Ready is {:?}",
                condition.map(|c| (&c.status, &c.reason, truncated(&c.message)))
            )
        }
    }
}

/// At most 300 characters of `text`, and how long it was: for failure messages.
fn truncated(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((end, _)) => format!("{}… ({} characters)", &text[..end], text.chars().count()),
        None => text.to_owned(),
    }
}

/// Waits until the resource's Ready condition has `status` and `reason`.
pub async fn wait_condition(
    identities: &Api<CommunicationIdentity>,
    name: &str,
    status: &str,
    reason: &str,
    deadline: Duration,
) -> CommunicationIdentity {
    let what = format!("Ready={status} with reason {reason}");
    wait_identity(identities, name, &what, deadline, |r| {
        ready(r) == Some((status.into(), reason.into()))
    })
    .await
}

/// Waits until the resource is Ready with a token issued.
pub async fn wait_ready(
    identities: &Api<CommunicationIdentity>,
    name: &str,
    deadline: Duration,
) -> CommunicationIdentity {
    wait_condition(identities, name, "True", reason::TOKEN_ISSUED, deadline).await
}

/// Every Event in `namespace`.
pub async fn list_events(client: &Client, namespace: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// A namespace with a connection Secret `acs-connection`, an emulator and an operator watching
/// the namespace.
pub struct Setup {
    pub ns: TestNamespace,
    pub emulator: Emulator,
    pub operator: Operator,
    pub identities: Api<CommunicationIdentity>,
    pub secrets: Api<Secret>,
}

impl Setup {
    pub async fn new(prefix: &str) -> Self {
        Self::start(prefix, Emulator::start(&[]), &[]).await
    }

    /// With `emulator`, and `operator_args` after the operator's usual flags.
    pub async fn start(prefix: &str, emulator: Emulator, operator_args: &[&str]) -> Self {
        ensure_crd().await;
        let ns = TestNamespace::new(prefix).await;
        let secrets: Api<Secret> = ns.api();
        create_connection_secret(&secrets, "acs-connection", &emulator.connection_string).await;
        let operator = Operator::start(&ns.name, &emulator, operator_args);
        Self {
            identities: ns.api(),
            secrets,
            operator,
            emulator,
            ns,
        }
    }

    pub async fn apply(&self, name: &str, spec: Value) -> CommunicationIdentity {
        apply_identity(&self.identities, name, spec).await
    }

    pub async fn annotate(&self, name: &str, key: &str, value: &str) {
        self.identities
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "annotations": { key: value } } })),
            )
            .await
            .unwrap();
    }

    /// Waits until `check` holds for the resource.
    pub async fn wait_resource(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&CommunicationIdentity) -> bool,
    ) -> CommunicationIdentity {
        wait_identity(&self.identities, name, what, PROMPTLY, check).await
    }

    /// Waits until the refresh request `value` is recorded as handled.
    pub async fn wait_refresh_handled(&self, name: &str, value: &str) -> CommunicationIdentity {
        self.wait_resource(name, &format!("refresh request {value:?} handled"), |r| {
            r.status
                .as_ref()
                .unwrap()
                .handled_refresh_request
                .as_deref()
                == Some(value)
        })
        .await
    }

    pub async fn wait_ready(&self, name: &str) -> CommunicationIdentity {
        wait_ready(&self.identities, name, PROMPTLY).await
    }

    pub async fn wait_reason(&self, name: &str, reason: &str) -> CommunicationIdentity {
        self.wait_resource(name, &format!("reason {reason}"), |r| {
            ready(r).is_some_and(|(_, r)| r == reason)
        })
        .await
    }

    pub async fn secret_data(&self, name: &str) -> BTreeMap<String, String> {
        secret_strings(&self.secrets.get(name).await.unwrap())
    }

    /// The (reason, note) of every Event in the namespace.
    pub async fn events(&self) -> Vec<(String, String)> {
        list_events(&self.ns.client, &self.ns.name)
            .await
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Waits for an Event with `reason`; its note.
    pub async fn wait_event(&self, reason: &str) -> String {
        wait_for(&format!("an event {reason}"), PROMPTLY, || async {
            self.events()
                .await
                .into_iter()
                .find(|(r, _)| r == reason)
                .map(|(_, note)| note)
        })
        .await
    }
}

/// A Deployment `name` whose pods read a token from the environment (none run: the control
/// plane has no nodes, but the Deployment controller rolls its ReplicaSets all the same).
pub async fn create_deployment(deployments: &Api<Deployment>, name: &str) {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "env": [{ "name": "ACS_TOKEN", "valueFrom": { "secretKeyRef": {
                        "name": format!("{name}-acs-token"), "key": "token", "optional": true,
                    } } }],
                }] },
            },
        },
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap_or_else(|e| panic!("create Deployment {name}: {e}"));
}
