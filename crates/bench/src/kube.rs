//! What the scenarios do on the API server: set up namespaces and connection Secrets, apply
//! CommunicationIdentities and plain Secrets with concurrent server-side apply, follow them
//! with one watcher, and read the API server's own request counters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};

use crate::procs::Cluster;
use crate::report::{Progress, say};

pub const FIELD_MANAGER: &str = "acs-bench";
/// Every object the bench creates carries this label, so one watcher sees them all.
pub const BENCH_LABEL: &str = "acs-bench.io/run";
pub const CONNECTION_SECRET: &str = "acs-connection";
const MANAGED_SECRETS: &str = "app.kubernetes.io/managed-by=acs-identity-operator";

pub fn identity_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("acs-operator.io", "v1alpha1", "CommunicationIdentity"),
        "communicationidentities",
    )
}

pub async fn client(cluster: &Cluster) -> anyhow::Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&cluster.kubeconfig)?;
    let mut config =
        Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await?;
    config.read_timeout = Some(Duration::from_secs(60));
    Ok(Client::try_from(config)?)
}

/// Installs every CRD of crds/acs-operator.io.yaml and waits until each is served.
pub fn install_crd(cluster: &Cluster, repo: &std::path::Path) -> anyhow::Result<()> {
    let crds = repo.join("crds/acs-operator.io.yaml");
    let crds = crds.to_string_lossy();
    cluster.kubectl(&["apply", "-f", &crds])?;
    cluster.kubectl(&[
        "wait",
        "--for",
        "condition=Established",
        "-f",
        &crds,
        "--timeout",
        "60s",
    ])?;
    Ok(())
}

/// A namespace with the connection Secret for `connection_string` (when given).
pub async fn namespace(
    client: &Client,
    name: &str,
    connection_string: Option<&str>,
) -> anyhow::Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &params,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            ),
        )
        .await?;
    if let Some(connection_string) = connection_string {
        Api::<Secret>::namespaced(client.clone(), name)
            .patch(
                CONNECTION_SECRET,
                &params,
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": CONNECTION_SECRET},
                    "stringData": {"connectionString": connection_string},
                })),
            )
            .await?;
    }
    Ok(())
}

/// Where one object goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: &str, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.into(),
        }
    }
}

/// `count` keys `id-00000…` spread round-robin over `namespaces`.
pub fn identity_keys(namespaces: &[String], count: usize) -> Vec<Key> {
    (0..count)
        .map(|i| Key::new(&namespaces[i % namespaces.len()], format!("id-{i:05}")))
        .collect()
}

/// Server-side applies one object per key with `concurrency` requests in flight, retrying a
/// failed request up to 5 times. Returns when each apply was answered.
pub async fn apply_all(
    client: &Client,
    what: &str,
    keys: &[Key],
    concurrency: usize,
    resource: ApiResource,
    body: impl Fn(&Key) -> Value,
) -> anyhow::Result<HashMap<Key, Instant>> {
    let done = Arc::new(Mutex::new(0usize));
    let progress = Progress::start(what, keys.len(), {
        let done = done.clone();
        move || *done.lock().unwrap_or_else(|p| p.into_inner())
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied: HashMap<Key, Instant> = futures::stream::iter(keys.iter().cloned())
        .map(|key| {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &key.namespace, &resource);
            let object = body(&key);
            let params = params.clone();
            let done = done.clone();
            async move {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match api.patch(&key.name, &params, &Patch::Apply(&object)).await {
                        Ok(_) => break,
                        Err(error) if attempt < 5 => {
                            say(format!(
                                "apply {}/{}: {error}; retrying",
                                key.namespace, key.name
                            ));
                            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                        }
                        Err(error) => return Err(anyhow::Error::from(error)),
                    }
                }
                *done.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                Ok((key, Instant::now()))
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    progress.finish();
    Ok(applied)
}

pub fn identity_body(key: &Key, token_lifetime: &str) -> Value {
    json!({
        "apiVersion": "acs-operator.io/v1alpha1",
        "kind": "CommunicationIdentity",
        "metadata": {"name": key.name, "namespace": key.namespace, "labels": {BENCH_LABEL: "identity"}},
        "spec": {
            "connectionSecretRef": {"name": CONNECTION_SECRET},
            "scopes": ["chat"],
            "tokenLifetime": token_lifetime,
        },
    })
}

/// A plain Secret about the size of the operator's (a JWT and four short keys): ~1 KiB.
pub fn plain_secret_body(key: &Key) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": key.name, "namespace": key.namespace, "labels": {BENCH_LABEL: "plain"}},
        "stringData": {"blob": "x".repeat(1024)},
    })
}

pub fn secret_resource() -> ApiResource {
    ApiResource::erase::<Secret>(&())
}

/// Applies `count` plain Secrets into `namespace`; returns how long that took.
pub async fn create_plain_secrets(
    client: &Client,
    namespace: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let keys: Vec<Key> = (0..count)
        .map(|i| Key::new(namespace, format!("plain-{i:05}")))
        .collect();
    let started = Instant::now();
    apply_all(
        client,
        "plain Secrets applied",
        &keys,
        concurrency,
        secret_resource(),
        plain_secret_body,
    )
    .await?;
    Ok(started.elapsed())
}

#[derive(Default)]
struct TrackState {
    present: HashSet<Key>,
    ready: HashSet<Key>,
    first_ready: HashMap<Key, Instant>,
    /// When each first had a condition: the operator's first pass over it wrote its status.
    first_condition: HashMap<Key, Instant>,
    /// Filled during a (re)list, swapped in when it is complete.
    relist: Option<(HashSet<Key>, HashSet<Key>)>,
    synced: bool,
}

/// One watcher over every bench CommunicationIdentity in the cluster, recording when each
/// first became Ready and which exist and are Ready now.
pub struct Tracker {
    tracked: Tracked,
    task: tokio::task::JoinHandle<()>,
}

/// What the watcher has seen so far; cheap to clone.
#[derive(Clone)]
pub struct Tracked {
    state: Arc<Mutex<TrackState>>,
}

impl std::ops::Deref for Tracker {
    type Target = Tracked;

    fn deref(&self) -> &Tracked {
        &self.tracked
    }
}

fn has_condition(object: &DynamicObject) -> bool {
    object.data["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| !conditions.is_empty())
}

fn is_ready(object: &DynamicObject) -> bool {
    object.data["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

impl Tracker {
    pub async fn start(client: &Client) -> anyhow::Result<Self> {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &identity_resource());
        let config = watcher::Config::default().labels(&format!("{BENCH_LABEL}=identity"));
        let state = Arc::new(Mutex::new(TrackState::default()));
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                let mut events = watcher(api, config).default_backoff().boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let now = Instant::now();
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    let key = |o: &DynamicObject| {
                        Key::new(&o.namespace().unwrap_or_default(), o.name_any())
                    };
                    match event {
                        watcher::Event::Init => s.relist = Some(Default::default()),
                        watcher::Event::InitApply(object) => {
                            let k = key(&object);
                            if has_condition(&object) {
                                s.first_condition.entry(k.clone()).or_insert(now);
                            }
                            let ready = is_ready(&object);
                            if ready {
                                s.first_ready.entry(k.clone()).or_insert(now);
                            }
                            if let Some((present, ready_set)) = s.relist.as_mut() {
                                if ready {
                                    ready_set.insert(k.clone());
                                }
                                present.insert(k);
                            }
                        }
                        watcher::Event::InitDone => {
                            if let Some((present, ready)) = s.relist.take() {
                                s.present = present;
                                s.ready = ready;
                            }
                            s.synced = true;
                        }
                        watcher::Event::Apply(object) => {
                            let k = key(&object);
                            if has_condition(&object) {
                                s.first_condition.entry(k.clone()).or_insert(now);
                            }
                            if is_ready(&object) {
                                s.first_ready.entry(k.clone()).or_insert(now);
                                s.ready.insert(k.clone());
                            } else {
                                s.ready.remove(&k);
                            }
                            s.present.insert(k);
                        }
                        watcher::Event::Delete(object) => {
                            let k = key(&object);
                            s.present.remove(&k);
                            s.ready.remove(&k);
                        }
                    }
                }
            }
        });
        let tracker = Self {
            tracked: Tracked { state },
            task,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !tracker.lock().synced {
            if Instant::now() > deadline {
                bail!("the watcher did not sync within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(tracker)
    }
}

impl Tracked {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ready_now(&self) -> usize {
        self.lock().ready.len()
    }

    pub fn present(&self) -> usize {
        self.lock().present.len()
    }

    /// How many resources of `namespace` exist whose status the operator has not written yet.
    pub fn without_condition(&self, namespace: &str) -> usize {
        let state = self.lock();
        (state.present.iter())
            .filter(|k| k.namespace == namespace && !state.first_condition.contains_key(k))
            .count()
    }

    /// When each resource first had a condition.
    pub fn first_condition(&self) -> HashMap<Key, Instant> {
        self.lock().first_condition.clone()
    }

    pub fn first_ready(&self) -> HashMap<Key, Instant> {
        self.lock().first_ready.clone()
    }

    /// Waits, printing progress, until `done()` reaches `total`; fails after `timeout`.
    pub async fn wait(
        &self,
        what: &str,
        total: usize,
        timeout: Duration,
        done: impl Fn(&Tracked) -> usize + Send + Sync + 'static,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let progress = Progress::start(what, total, {
            let tracked = self.clone();
            move || done(&tracked)
        });
        let result = loop {
            let count = progress.current();
            if count >= total {
                break Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                break Err(anyhow::anyhow!(
                    "{what}: only {count} of {total} after {}s",
                    timeout.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        progress.finish();
        result
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The API server's request counters (`apiserver_request_total`) for everything but watches,
/// by `VERB resource[/subresource]`.
pub async fn apiserver_requests(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut writes = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let verb = label("verb");
        if verb.starts_with("WATCH") {
            continue;
        }
        let mut resource = label("resource");
        let sub = label("subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        *writes.entry(format!("{verb} {resource}")).or_insert(0.0) +=
            value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(writes)
}

/// Writes (`writes`) or reads (`!writes`) between two [`apiserver_requests`] readings, for the
/// resources the operator touches, and their total.
pub fn operator_requests(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    writes: bool,
) -> (BTreeMap<String, f64>, f64) {
    let mut diff = BTreeMap::new();
    for (key, value) in after {
        let (verb, resource) = key.split_once(' ').unwrap_or(("", ""));
        let mutating = matches!(
            verb,
            "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION"
        );
        if mutating != writes {
            continue;
        }
        // Not leases: the API server renews its own identity Lease every 10 s, and the bench
        // runs the operator without leader election.
        let ours = ["communicationidentities", "secrets", "events"]
            .iter()
            .any(|r| resource.split('/').next() == Some(r));
        let delta = value - before.get(key).copied().unwrap_or(0.0);
        if ours && delta > 0.0 {
            diff.insert(key.clone(), delta);
        }
    }
    // Sums of f64 start at -0.0.
    let total = diff.values().sum::<f64>() + 0.0;
    (diff, total)
}

/// The operator's Secrets in `namespace`: name → (token, expiresOn, identityId).
pub async fn managed_secrets(
    client: &Client,
    namespace: &str,
) -> anyhow::Result<BTreeMap<String, (String, String, String)>> {
    let list = Api::<Secret>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(MANAGED_SECRETS))
        .await?;
    let mut out = BTreeMap::new();
    for secret in list {
        let data = secret.data.clone().unwrap_or_default();
        let value = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                .unwrap_or_default()
        };
        out.insert(
            secret.name_any(),
            (value("token"), value("expiresOn"), value("identityId")),
        );
    }
    Ok(out)
}

/// status.identityId of every bench CommunicationIdentity in `namespace`.
pub async fn identity_ids(client: &Client, namespace: &str) -> anyhow::Result<Vec<String>> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &identity_resource());
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter_map(|o| o.data["status"]["identityId"].as_str().map(str::to_owned))
        .collect())
}

/// Deletes every CommunicationIdentity in `namespace` (one collection delete).
pub async fn delete_identities(client: &Client, namespace: &str) -> anyhow::Result<()> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &identity_resource());
    api.delete_collection(&DeleteParams::background(), &ListParams::default())
        .await
        .context("deleting the CommunicationIdentities")?;
    Ok(())
}
