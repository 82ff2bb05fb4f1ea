//! What the integration tests share: one real control plane per run, a namespace per test.
//!
//! The control plane is started once, on first use, through `scripts/local-cluster.sh up` with
//! its state under `target/`, and with `ACS_WATCH_PID` set to this process, so it stops by itself
//! when the test binary exits — however it exits, a panic or a kill included. With
//! `ACS_TEST_REUSE_CLUSTER=1` the cluster that `KUBECONFIG` points at is used instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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
            .status()
            .expect("run scripts/local-cluster.sh");
        assert!(status.success(), "scripts/local-cluster.sh up failed");
        state.join("kubeconfig")
    })
}

/// Directory holding the built kubectl and friends.
pub fn cluster_bin_dir() -> PathBuf {
    let output = Command::new(repo_root().join("scripts/local-cluster.sh"))
        .arg("env")
        .output()
        .expect("run scripts/local-cluster.sh env");
    let text = String::from_utf8(output.stdout).unwrap();
    let path_line = text
        .lines()
        .find_map(|l| l.strip_prefix("export PATH="))
        .expect("env prints PATH");
    PathBuf::from(path_line.split(':').next().unwrap())
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
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
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
        let (client, name) = (self.client.clone(), self.name.clone());
        // Drop cannot await; a short-lived runtime on its own thread issues the delete.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await;
            });
        })
        .join();
    }
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
