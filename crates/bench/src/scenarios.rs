//! The seven scenarios of issue 7. Each starts its own control plane, emulator(s) and
//! operator(s), prints progress while it works, and ends with a table and a JSON file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use kube::Client;
use rand::Rng as _;
use serde_json::{Value, json};

use crate::kube::{self as k, Key, Tracker};
use crate::probe::{self, Admin, Stats};
use crate::procs::{Cluster, Emulator, Operator, cpu_seconds};
use crate::report::{Progress, Results, quantile, say};

/// The service's create-with-token budget per resource and window (acs-identity-api.md).
const CREATE_LIMIT: usize = 1000;
const WINDOW_SECONDS: usize = 30;

/// Options every scenario shares.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Where acs-emulator and acs-identity-operator are (default: next to this binary).
    #[arg(long, global = true)]
    pub bin_dir: Option<PathBuf>,
    /// Server-side apply requests in flight while creating objects.
    #[arg(long, global = true, default_value_t = 32)]
    pub concurrency: usize,
}

/// One scenario's cluster, client and working folder.
pub struct Env {
    pub repo: PathBuf,
    pub bin_dir: PathBuf,
    pub dir: PathBuf,
    pub client: Client,
    pub concurrency: usize,
    operator_starts: std::sync::atomic::AtomicUsize,
    // Last: dropped after everything that talks to it.
    pub cluster: Cluster,
}

impl Env {
    pub async fn up(scenario: &str, common: &Common) -> anyhow::Result<Self> {
        let repo = std::env::current_dir()?;
        ensure!(
            repo.join("scripts/local-cluster.sh").exists(),
            "run from the repository root (scripts/bench.sh does)"
        );
        let bin_dir = match &common.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("the binary's folder")?
                .to_owned(),
        };
        for bin in ["acs-emulator", "acs-identity-operator"] {
            ensure!(
                bin_dir.join(bin).exists(),
                "{bin} is not in {}; build with `cargo build --release --workspace --bins`",
                bin_dir.display()
            );
        }
        let cluster = Cluster::up(&repo, scenario)?;
        let dir = cluster.state.join("bench");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let client = k::client(&cluster).await?;
        k::install_crd(&cluster, &repo)?;
        say(format!(
            "logs of emulators and operators: {}",
            dir.display()
        ));
        Ok(Self {
            repo,
            bin_dir,
            dir,
            client,
            concurrency: common.concurrency,
            operator_starts: Default::default(),
            cluster,
        })
    }

    pub fn emulator(&self, name: &str, extra: &[&str]) -> anyhow::Result<(Emulator, Admin)> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let emulator = Emulator::start(&self.bin_dir, &self.dir, name, &extra)?;
        let admin = Admin::new(&emulator)?;
        Ok((emulator, admin))
    }

    /// Starts an operator with `extra` arguments after `run`'s defaults.
    pub fn operator(&self, extra: &[&str]) -> anyhow::Result<Operator> {
        let start = 1 + self
            .operator_starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Operator::start(
            &self.bin_dir,
            &self.cluster,
            &self.dir.join("emulator-tls/ca.crt"),
            self.dir.join(format!("operator-{start:03}.log")),
            extra,
        )
    }

    pub async fn apply_identities(
        &self,
        keys: &[Key],
        lifetime: &str,
    ) -> anyhow::Result<HashMap<Key, Instant>> {
        let lifetime = lifetime.to_owned();
        k::apply_all(
            &self.client,
            "CommunicationIdentities applied",
            keys,
            self.concurrency,
            k::identity_resource(),
            move |key| k::identity_body(key, &lifetime),
        )
        .await
    }

    /// CPU seconds used so far by the control plane's processes, by name.
    pub fn control_plane_cpu(&self) -> BTreeMap<String, f64> {
        self.cluster
            .pids()
            .into_iter()
            .map(|(name, pid)| (name, cpu_seconds(pid)))
            .collect()
    }
}

fn cpu_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Value {
    json!(
        after
            .iter()
            .map(|(k, v)| (
                k.clone(),
                round(v - before.get(k).copied().unwrap_or(0.0), 1)
            ))
            .collect::<BTreeMap<_, _>>()
    )
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// The least time the service's limits allow for `n` creates on one resource: the first
/// window's budget at t = 0, one more budget every window after.
/// Operator arguments for an emulator started with `--no-limits`: the client-side limiter off too.
const LIMITS_OFF: &[&str] = &["--acs-rate-limit", "off"];

fn floor_seconds(n: usize) -> usize {
    n.saturating_sub(1) / CREATE_LIMIT * WINDOW_SECONDS
}

/// How a provisioning run went.
struct Provisioned {
    /// First apply sent → last resource Ready.
    all_ready: Duration,
    /// Time the applies themselves took.
    applied_in: Duration,
    latencies: Vec<f64>,
    /// Per namespace: first apply → its last resource Ready, in seconds.
    per_namespace: BTreeMap<String, f64>,
}

impl Provisioned {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.all_ready.as_secs_f64()
    }

    fn p(&mut self, q: f64) -> f64 {
        quantile(&mut self.latencies, q)
    }
}

/// Applies `keys` and waits until every one is Ready (fails after `timeout`).
async fn provision(
    env: &Env,
    tracker: &Tracker,
    keys: &[Key],
    lifetime: &str,
    timeout: Duration,
) -> anyhow::Result<Provisioned> {
    let wanted: HashSet<Key> = keys.iter().cloned().collect();
    let started = Instant::now();
    let applied = env.apply_identities(keys, lifetime).await?;
    let applied_in = started.elapsed();
    let total = keys.len();
    let target = wanted.clone();
    tracker
        .wait("Ready", total, timeout, move |t| {
            t.first_ready()
                .keys()
                .filter(|k| target.contains(k))
                .count()
        })
        .await?;
    let first_ready = tracker.first_ready();
    let mut latencies = Vec::with_capacity(total);
    let mut last = started;
    let mut per_namespace: BTreeMap<String, f64> = BTreeMap::new();
    for key in keys {
        let ready = first_ready[key];
        last = last.max(ready);
        latencies.push(ready.saturating_duration_since(applied[key]).as_secs_f64());
        let secs = ready.duration_since(started).as_secs_f64();
        let entry = per_namespace.entry(key.namespace.clone()).or_insert(0.0);
        *entry = entry.max(secs);
    }
    Ok(Provisioned {
        all_ready: last.duration_since(started),
        applied_in,
        latencies,
        per_namespace,
    })
}

/// A provisioning run with the API-server requests and control-plane CPU it cost.
struct Costed {
    run: Provisioned,
    writes: (BTreeMap<String, f64>, f64),
    reads: (BTreeMap<String, f64>, f64),
    /// CPU seconds of the control plane's processes, by name.
    cpu: Value,
}

/// [`provision`] (1-hour tokens), counting what it cost the API server.
async fn provision_costed(
    env: &Env,
    tracker: &Tracker,
    keys: &[Key],
    timeout: Duration,
) -> anyhow::Result<Costed> {
    let requests_before = k::apiserver_requests(&env.client).await?;
    let cpu_before = env.control_plane_cpu();
    let run = provision(env, tracker, keys, "1h", timeout).await?;
    let requests_after = k::apiserver_requests(&env.client).await?;
    Ok(Costed {
        run,
        writes: k::operator_requests(&requests_before, &requests_after, true),
        reads: k::operator_requests(&requests_before, &requests_after, false),
        cpu: cpu_delta(&cpu_before, &env.control_plane_cpu()),
    })
}

/// The API server's own rate for `n` plain Secrets by server-side apply (same client, same
/// concurrency as the identities).
async fn raw_secrets_per_second(env: &Env, n: usize) -> anyhow::Result<f64> {
    k::namespace(&env.client, "raw", None).await?;
    say(format!(
        "measuring the API server: {n} plain Secrets by server-side apply"
    ));
    let took = k::create_plain_secrets(&env.client, "raw", n, env.concurrency).await?;
    Ok(n as f64 / took.as_secs_f64())
}

/// The raw Secret rate and `rate`'s ratio to it.
fn raw_rate_figures(results: &mut Results, raw_rate: f64, rate: f64, ratio_label: &str) {
    results.figure(
        "rawSecretsPerSecond",
        "API server: plain Secrets/s",
        json!(round(raw_rate, 1)),
        format!("{raw_rate:.1}/s"),
        "",
    );
    results.figure(
        "ratioToRawSecrets",
        ratio_label,
        json!(round(rate / raw_rate, 3)),
        format!("{:.3}", rate / raw_rate),
        "",
    );
}

fn provision_timeout(n: usize, resources: usize) -> Duration {
    Duration::from_secs((floor_seconds(n / resources.max(1)) * 3 + n / 5 + 300) as u64)
}

fn namespaces(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// ACS requests per operation from the emulators' stats, summed.
fn acs_requests(stats: &[Stats]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for s in stats {
        for (op, statuses) in s.requests() {
            for (status, count) in statuses {
                *out.entry(op.clone())
                    .or_default()
                    .entry(status)
                    .or_default() += count;
            }
        }
    }
    out
}

async fn all_stats(admins: &[Admin]) -> anyhow::Result<Vec<Stats>> {
    let mut out = Vec::new();
    for admin in admins {
        out.push(admin.stats().await?);
    }
    Ok(out)
}

/// Figures every provisioning run reports.
async fn provisioning_figures(
    results: &mut Results,
    n: usize,
    costed: Costed,
    stats: &[Stats],
    operator: &Operator,
) -> anyhow::Result<()> {
    let Costed {
        mut run,
        writes,
        reads,
        cpu,
    } = costed;
    let secs = run.all_ready.as_secs_f64();
    results.figure(
        "allReadySeconds",
        "apply → all Ready",
        json!(round(secs, 1)),
        format!("{secs:.1} s"),
        "",
    );
    let rate = run.rate(n);
    results.figure(
        "readyPerSecond",
        "identities Ready per second",
        json!(round(rate, 1)),
        format!("{rate:.1}/s"),
        "",
    );
    let (p50, p99) = (run.p(0.5), run.p(0.99));
    results.figure(
        "latencyP50Seconds",
        "apply→Ready p50",
        json!(round(p50, 2)),
        format!("{p50:.2} s"),
        "",
    );
    results.figure(
        "latencyP99Seconds",
        "apply→Ready p99",
        json!(round(p99, 2)),
        format!("{p99:.2} s"),
        "",
    );
    let applied = run.applied_in.as_secs_f64();
    results.figure(
        "appliedSeconds",
        "time to apply all",
        json!(round(applied, 1)),
        format!("{applied:.1} s"),
        "",
    );
    let requests = acs_requests(stats);
    let total: u64 = requests.values().flat_map(|s| s.values()).sum();
    let throttled: u64 = requests.values().filter_map(|s| s.get("429")).sum();
    results.figure(
        "acsCallsPerIdentity",
        "ACS calls per identity",
        json!(round(total as f64 / n as f64, 3)),
        format!("{:.3}", total as f64 / n as f64),
        "exactly 1 (create-with-token)",
    );
    let share = 100.0 * throttled as f64 / total.max(1) as f64;
    results.figure(
        "throttled429",
        "429s received",
        json!(throttled),
        format!("{throttled} ({share:.2} %)"),
        "≤ 1 % of ACS requests",
    );
    results.data("acsRequests", json!(requests));
    let metrics = probe::operator_metrics(&operator.metrics_addr).await?;
    let waited = probe::metric_sum(
        &metrics,
        "acs_identity_operator_acs_rate_limit_wait_seconds_sum",
        &[],
    );
    results.figure(
        "rateLimiterWaitSecondsSum",
        "client rate-limiter wait (sum)",
        json!(round(waited, 1)),
        format!("{waited:.0} s"),
        "",
    );
    let (by_kind, writes_total) = writes;
    results.figure(
        "apiWritesPerIdentity",
        "API-server writes per identity",
        json!(round(writes_total / n as f64, 2)),
        format!(
            "{:.2} (incl. the bench's own apply)",
            writes_total / n as f64
        ),
        "",
    );
    results.data("apiWrites", json!(by_kind));
    results.figure(
        "apiReadsPerIdentity",
        "API-server reads per identity",
        json!(round(reads.1 / n as f64, 2)),
        format!("{:.2}", reads.1 / n as f64),
        "",
    );
    results.data("apiReads", json!(reads.0));
    results.data("controlPlaneCpuSeconds", cpu);
    let operator_cpu = operator.proc.cpu_seconds();
    results.figure(
        "operatorCpuSeconds",
        "operator CPU",
        json!(round(operator_cpu, 1)),
        format!("{operator_cpu:.1} s"),
        "",
    );
    let (rss, hwm) = operator.proc.memory_kib()?;
    results.figure(
        "operatorRssKib",
        "operator RSS (peak)",
        json!({"rss": rss, "peak": hwm}),
        format!(
            "{:.1} MiB ({:.1})",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        ),
        "",
    );
    results.data("perNamespaceAllReadySeconds", json!(run.per_namespace));
    Ok(())
}

/// Scenarios 1, 2 and 7 share this: emulators, namespaces, one operator, provision, figures.
pub async fn provision_limited(common: &Common, n: usize) -> anyhow::Result<()> {
    let env = Env::up("provision-limited", common).await?;
    let (emulator, admin) = env.emulator("emulator", &[])?;
    k::namespace(&env.client, "bench", Some(&emulator.connection_string)).await?;
    let tracker = Tracker::start(&env.client).await?;
    let operator = env.operator(&[])?;
    let keys = k::identity_keys(&["bench".to_owned()], n);
    say(format!(
        "provisioning {n} identities on one resource with the service's limits on"
    ));
    let costed = provision_costed(&env, &tracker, &keys, provision_timeout(n, 1)).await?;
    let mut results = Results::new("provision-limited");
    results.data("n", json!(n));
    let floor = floor_seconds(n);
    let secs = costed.run.all_ready.as_secs_f64();
    results.figure(
        "floorSeconds",
        "floor the limits allow",
        json!(floor),
        format!("{floor} s"),
        "",
    );
    let ratio = if floor > 0 {
        format!("{:.3}", secs / floor as f64)
    } else {
        "n/a (N ≤ one window's budget)".to_owned()
    };
    results.figure(
        "ratioToFloor",
        "time / floor",
        if floor > 0 {
            json!(round(secs / floor as f64, 3))
        } else {
            Value::Null
        },
        ratio,
        "≤ 1.15",
    );
    let stats = vec![admin.stats().await?];
    provisioning_figures(&mut results, n, costed, &stats, &operator).await?;
    drop(operator);
    results.finish(&env.repo)?;
    Ok(())
}

pub async fn provision_unlimited(
    common: &Common,
    n: usize,
    resources: usize,
) -> anyhow::Result<()> {
    let env = Env::up("provision-unlimited", common).await?;
    let namespaces = namespaces("bench", resources);
    let mut emulators = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let (emulator, admin) = env.emulator(&format!("emulator-{i}"), &["--no-limits"])?;
        k::namespace(&env.client, ns, Some(&emulator.connection_string)).await?;
        emulators.push((emulator, admin));
    }
    let admins: Vec<Admin> = emulators.iter().map(|(_, a)| a.clone()).collect();

    let raw_rate = raw_secrets_per_second(&env, n).await?;

    let tracker = Tracker::start(&env.client).await?;
    let operator = env.operator(LIMITS_OFF)?;
    let keys = k::identity_keys(&namespaces, n);
    say(format!(
        "provisioning {n} identities over {resources} resource(s) with limits off"
    ));
    let costed = provision_costed(&env, &tracker, &keys, provision_timeout(n, 8)).await?;
    let mut results = Results::new("provision-unlimited");
    results.data("n", json!(n));
    results.data("resources", json!(resources));
    raw_rate_figures(
        &mut results,
        raw_rate,
        costed.run.rate(n),
        "identities/s ÷ Secrets/s",
    );
    let stats = all_stats(&admins).await?;
    provisioning_figures(&mut results, n, costed, &stats, &operator).await?;
    drop(operator);
    results.finish(&env.repo)?;
    Ok(())
}

pub async fn scale_out(
    common: &Common,
    per_resource: usize,
    resources: usize,
    raw_secrets: bool,
) -> anyhow::Result<()> {
    let env = Env::up("scale-out", common).await?;
    let (single, single_admin) = env.emulator("emulator-single", &[])?;
    k::namespace(&env.client, "single", Some(&single.connection_string)).await?;
    let many = namespaces("multi", resources);
    let mut emulators = Vec::new();
    for (i, ns) in many.iter().enumerate() {
        let (emulator, admin) = env.emulator(&format!("emulator-{i}"), &[])?;
        k::namespace(&env.client, ns, Some(&emulator.connection_string)).await?;
        emulators.push((emulator, admin));
    }
    let tracker = Tracker::start(&env.client).await?;
    let operator = env.operator(&[])?;
    let mut results = Results::new("scale-out");
    results.data("perResource", json!(per_resource));
    results.data("resources", json!(resources));

    say(format!(
        "phase 1: {per_resource} identities on one resource"
    ));
    let keys = k::identity_keys(&["single".to_owned()], per_resource);
    let one = provision(
        &env,
        &tracker,
        &keys,
        "1h",
        provision_timeout(per_resource, 1),
    )
    .await?;
    let one_rate = one.rate(per_resource);
    results.figure(
        "oneResourcePerSecond",
        "1 resource: identities Ready/s",
        json!(round(one_rate, 1)),
        format!(
            "{one_rate:.1}/s ({per_resource} in {:.1} s)",
            one.all_ready.as_secs_f64()
        ),
        "",
    );

    let total = per_resource * resources;
    say(format!(
        "phase 2: {total} identities over {resources} resources"
    ));
    let keys: Vec<Key> = k::identity_keys(&many, total);
    let cpu_before = env.control_plane_cpu();
    let operator_cpu_before = operator.proc.cpu_seconds();
    let many_run = provision(
        &env,
        &tracker,
        &keys,
        "1h",
        provision_timeout(total, resources),
    )
    .await?;
    let cpu = cpu_delta(&cpu_before, &env.control_plane_cpu());
    let many_rate = many_run.rate(total);
    results.figure(
        "manyResourcesPerSecond",
        &format!("{resources} resources: identities Ready/s"),
        json!(round(many_rate, 1)),
        format!(
            "{many_rate:.1}/s ({total} in {:.1} s)",
            many_run.all_ready.as_secs_f64()
        ),
        "",
    );
    results.figure(
        "speedup",
        "speed-up",
        json!(round(many_rate / one_rate, 2)),
        format!("{:.2}×", many_rate / one_rate),
        "≥ 3.5× (or within 10 % of the API server's rate)",
    );
    let finish: Vec<f64> = many_run.per_namespace.values().copied().collect();
    let (first, last) = (
        finish.iter().copied().fold(f64::INFINITY, f64::min),
        finish.iter().copied().fold(0.0, f64::max),
    );
    results.figure(
        "perResourceFinishSeconds",
        "per resource: all Ready after",
        json!(many_run.per_namespace),
        format!("{first:.1}–{last:.1} s"),
        "no resource starved",
    );
    let mut stats = Vec::new();
    for (_, admin) in &emulators {
        stats.push(admin.stats().await?);
    }
    let per_resource_429: Vec<u64> = stats.iter().map(|s| s.with_status("429")).collect();
    let calls: u64 = stats.iter().map(Stats::total_requests).sum();
    results.figure(
        "throttled429",
        "429s (phase 2, per resource)",
        json!(per_resource_429),
        format!("{per_resource_429:?}"),
        "",
    );
    results.figure(
        "acsCallsPerIdentity",
        "ACS calls per identity (phase 2)",
        json!(round(calls as f64 / total as f64, 3)),
        format!("{:.3}", calls as f64 / total as f64),
        "1",
    );
    results.data("singleResourceStats", single_admin.stats().await?.0);
    results.data("controlPlaneCpuSecondsPhase2", cpu);
    let operator_cpu = operator.proc.cpu_seconds() - operator_cpu_before;
    results.figure(
        "operatorCpuSecondsPhase2",
        "operator CPU (phase 2)",
        json!(round(operator_cpu, 1)),
        format!("{operator_cpu:.1} s"),
        "",
    );
    drop(operator);
    if raw_secrets {
        let raw_rate = raw_secrets_per_second(&env, total).await?;
        raw_rate_figures(
            &mut results,
            raw_rate,
            many_rate,
            "phase 2 rate ÷ Secrets/s",
        );
    }
    results.finish(&env.repo)?;
    Ok(())
}

/// Waits until the operator's /readyz answers (its caches are synced).
async fn wait_operator_ready(operator: &Operator, timeout: Duration) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if probe::operator_ready(&operator.metrics_addr).await {
            return Ok(operator.started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the operator was not ready within {}s", timeout.as_secs())
}

pub async fn memory(common: &Common, n: usize, secrets: usize, settle: u64) -> anyhow::Result<()> {
    let env = Env::up("memory", common).await?;
    let (emulator, _admin) = env.emulator("emulator", &["--no-limits"])?;
    k::namespace(&env.client, "bench", Some(&emulator.connection_string)).await?;
    let tracker = Tracker::start(&env.client).await?;
    let mut operator = env.operator(LIMITS_OFF)?;
    let keys = k::identity_keys(&["bench".to_owned()], n);
    provision(&env, &tracker, &keys, "24h", provision_timeout(n, 1)).await?;
    let mut results = Results::new("memory");
    results.data("n", json!(n));
    results.data("unrelatedSecrets", json!(secrets));
    results.data("settleSeconds", json!(settle));

    let measure = |operator: &Operator| -> anyhow::Result<(Value, String)> {
        let (rss, peak) = operator.proc.memory_kib()?;
        Ok((
            json!({"rssKib": rss, "peakKib": peak}),
            format!(
                "{:.1} MiB (peak {:.1})",
                rss as f64 / 1024.0,
                peak as f64 / 1024.0
            ),
        ))
    };
    say(format!("settling {settle}s"));
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let (value, shown) = measure(&operator)?;
    results.figure(
        "rssWhileProvisioning",
        &format!("RSS, {n} identities, provisioned by it"),
        value,
        shown,
        "≤ 64 MiB",
    );
    // A fresh start: the steady state a restarted replica holds.
    operator.proc.kill();
    let mut operator = env.operator(LIMITS_OFF)?;
    wait_operator_ready(&operator, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let (value, shown) = measure(&operator)?;
    results.figure(
        "rssWithout",
        &format!("RSS, {n} identities, 0 other Secrets (fresh)"),
        value,
        shown,
        "≤ 40 MiB",
    );

    k::namespace(&env.client, "noise", None).await?;
    say(format!("creating {secrets} unrelated Secrets"));
    k::create_plain_secrets(&env.client, "noise", secrets, env.concurrency).await?;
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let (value, shown) = measure(&operator)?;
    results.figure(
        "rssAfterSecretsAdded",
        &format!("RSS, +{secrets} Secrets added while running"),
        value,
        shown,
        "≤ 64 MiB",
    );
    operator.proc.kill();
    let operator = env.operator(LIMITS_OFF)?;
    wait_operator_ready(&operator, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(settle)).await;
    ensure!(tracker.ready_now() == n, "not every identity is Ready");
    let (value, shown) = measure(&operator)?;
    results.figure(
        "rssWith",
        &format!("RSS, {n} identities, {secrets} other Secrets (fresh)"),
        value,
        shown,
        "≤ 40 MiB",
    );
    drop(operator);
    results.finish(&env.repo)?;
    Ok(())
}

pub async fn idle(common: &Common, n: usize, idle_seconds: u64) -> anyhow::Result<()> {
    let env = Env::up("idle", common).await?;
    let (emulator, admin) = env.emulator("emulator", &[])?;
    k::namespace(&env.client, "bench", Some(&emulator.connection_string)).await?;
    let tracker = Tracker::start(&env.client).await?;
    let mut operator = env.operator(&[])?;
    let keys = k::identity_keys(&["bench".to_owned()], n);
    provision(&env, &tracker, &keys, "24h", provision_timeout(n, 1)).await?;
    // Let the last status writes and events of provisioning land.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut results = Results::new("idle");
    results.data("n", json!(n));
    results.data("idleSeconds", json!(idle_seconds));

    let acs_before = admin.stats().await?.total_requests();
    let writes_before = k::apiserver_requests(&env.client).await?;
    let cpu_before = operator.proc.cpu_seconds();
    say(format!("idling {idle_seconds}s with {n} identities Ready"));
    let started = Instant::now();
    let progress = Progress::start("idle seconds", idle_seconds as usize, move || {
        started.elapsed().as_secs() as usize
    });
    tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
    progress.finish();
    let acs_calls = admin.stats().await?.total_requests() - acs_before;
    let (writes, writes_total) = k::operator_requests(
        &writes_before,
        &k::apiserver_requests(&env.client).await?,
        true,
    );
    results.figure(
        "idleAcsCalls",
        &format!("ACS calls in {idle_seconds}s idle"),
        json!(acs_calls),
        acs_calls.to_string(),
        "0",
    );
    results.figure(
        "idleApiWrites",
        &format!("API-server writes in {idle_seconds}s idle"),
        json!(writes_total),
        writes_total.to_string(),
        "0",
    );
    results.data("idleApiWritesByKind", json!(writes));
    let cpu = operator.proc.cpu_seconds() - cpu_before;
    results.figure(
        "idleOperatorCpuSeconds",
        "operator CPU while idle",
        json!(round(cpu, 2)),
        format!("{cpu:.2} s"),
        "",
    );

    say("restarting the operator");
    let acs_before = admin.stats().await?.total_requests();
    let writes_before = k::apiserver_requests(&env.client).await?;
    operator.proc.kill();
    let operator = env.operator(&[])?;
    let ready_after = wait_operator_ready(&operator, Duration::from_secs(120)).await?;
    // Its first pass over every resource happens right after the caches sync.
    let settle_started = Instant::now();
    let mut reconciles = 0.0;
    while settle_started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let metrics = probe::operator_metrics(&operator.metrics_addr).await?;
        let now = probe::metric_sum(&metrics, "acs_identity_operator_reconciles_total", &[]);
        if now >= n as f64 && now == reconciles {
            break;
        }
        reconciles = now;
    }
    let first_pass = settle_started.elapsed() + ready_after;
    let acs_calls = admin.stats().await?.total_requests() - acs_before;
    let (writes, writes_total) = k::operator_requests(
        &writes_before,
        &k::apiserver_requests(&env.client).await?,
        true,
    );
    results.figure(
        "restartReadySeconds",
        "restart → /readyz ready",
        json!(round(ready_after.as_secs_f64(), 2)),
        format!("{:.2} s", ready_after.as_secs_f64()),
        "",
    );
    results.figure(
        "restartFirstPassSeconds",
        "restart → every resource reconciled",
        json!(round(first_pass.as_secs_f64(), 1)),
        format!(
            "{:.1} s ({reconciles} reconciles)",
            first_pass.as_secs_f64()
        ),
        "",
    );
    results.figure(
        "restartAcsCalls",
        "ACS calls after restart",
        json!(acs_calls),
        acs_calls.to_string(),
        "0",
    );
    results.figure(
        "restartApiWrites",
        "API-server writes after restart",
        json!(writes_total),
        writes_total.to_string(),
        "",
    );
    results.data("restartApiWritesByKind", json!(writes));
    drop(operator);
    results.finish(&env.repo)?;
    Ok(())
}

/// `count` random pauses of `min..max` milliseconds (drawn up front: the generator is not Send).
fn random_pauses(count: usize, min: u64, max: u64) -> Vec<Duration> {
    let mut rng = rand::rng();
    (0..count)
        .map(|_| Duration::from_millis(rng.random_range(min..max)))
        .collect()
}

/// SIGKILLs and restarts the operator after each pause; returns the last one started.
async fn kill_repeatedly(
    env: &Env,
    mut operator: Operator,
    pauses: &[Duration],
    what: &str,
) -> anyhow::Result<Operator> {
    for (i, pause) in pauses.iter().enumerate() {
        tokio::time::sleep(*pause).await;
        operator.proc.kill();
        say(format!(
            "{what}: SIGKILL {}/{} after {:.2}s",
            i + 1,
            pauses.len(),
            pause.as_secs_f64()
        ));
        operator = env.operator(&[])?;
    }
    Ok(operator)
}

pub async fn crash(
    common: &Common,
    n: usize,
    kills: usize,
    delete_kills: usize,
    max_pause_ms: u64,
) -> anyhow::Result<()> {
    let env = Env::up("crash", common).await?;
    let (emulator, admin) = env.emulator("emulator", &[])?;
    k::namespace(&env.client, "bench", Some(&emulator.connection_string)).await?;
    let tracker = Tracker::start(&env.client).await?;
    let operator = env.operator(&[])?;
    let keys = k::identity_keys(&["bench".to_owned()], n);
    let mut results = Results::new("crash");
    results.data("n", json!(n));
    results.data("kills", json!(kills));
    results.data("deleteKills", json!(delete_kills));

    let pauses = random_pauses(kills, 100, max_pause_ms);
    // The kills begin while the resources are still being applied.
    let (applied, operator) = tokio::join!(
        env.apply_identities(&keys, "1h"),
        kill_repeatedly(&env, operator, &pauses, "provisioning")
    );
    applied?;
    let operator = operator?;
    let ready_when_done = tracker.ready_now();
    say(format!(
        "{ready_when_done}/{n} Ready when the kills ended; waiting for the rest"
    ));
    tracker
        .wait("Ready", n, Duration::from_secs(600), |t| t.ready_now())
        .await?;

    let stats = admin.stats().await?;
    let ids = k::identity_ids(&env.client, "bench").await?;
    let distinct: HashSet<&String> = ids.iter().collect();
    results.figure(
        "readyWhenKillsEnded",
        "Ready when the kills ended",
        json!(ready_when_done),
        format!("{ready_when_done}/{n}"),
        "",
    );
    results.figure(
        "emulatorIdentities",
        "identities in the emulator / resources",
        json!({"emulator": stats.alive(), "resources": n, "distinctStatusIds": distinct.len()}),
        format!("{} / {n} ({} distinct ids)", stats.alive(), distinct.len()),
        "equal: 0 leaked, 0 duplicated",
    );
    results.figure(
        "allReady",
        "resources Ready",
        json!(tracker.ready_now()),
        format!("{}/{n}", tracker.ready_now()),
        "all",
    );
    let secrets = k::managed_secrets(&env.client, "bench").await?;
    let mut verdicts: BTreeMap<String, usize> = BTreeMap::new();
    let status_ids: HashSet<String> = ids.iter().cloned().collect();
    let mut mismatched = 0;
    for (token, _, identity) in secrets.values() {
        *verdicts.entry(admin.validate(token).await?).or_default() += 1;
        if !status_ids.contains(identity) {
            mismatched += 1;
        }
    }
    let valid = verdicts.get("valid").copied().unwrap_or(0);
    results.figure(
        "validTokens",
        "Secrets with a valid token",
        json!(verdicts),
        format!("{valid}/{n} ({} Secrets)", secrets.len()),
        "all",
    );
    results.data("secretsWithUnknownIdentity", json!(mismatched));
    results.data("acsRequestsProvisioning", json!(stats.requests()));

    say(format!(
        "deleting all {n} while killing the operator {delete_kills} times"
    ));
    k::delete_identities(&env.client, "bench").await?;
    let pauses = random_pauses(delete_kills, 100, max_pause_ms);
    let operator = kill_repeatedly(&env, operator, &pauses, "deleting").await?;
    tracker
        .wait("deleted", n, Duration::from_secs(600), move |t| {
            n.saturating_sub(t.present())
        })
        .await?;
    let stats = admin.stats().await?;
    results.figure(
        "leftAfterDelete",
        "identities left in the emulator",
        json!(stats.alive()),
        stats.alive().to_string(),
        "0",
    );
    results.data("acsRequestsTotal", json!(stats.requests()));
    drop(operator);
    results.finish(&env.repo)?;
    Ok(())
}

/// Time-scaled soak options.
pub struct Soak {
    pub n: usize,
    pub sim_hours: f64,
    pub time_scale: f64,
    pub fail_5xx: f64,
    pub outage_seconds: u64,
    pub bursts: usize,
    pub burst_seconds: u64,
}

pub async fn soak(common: &Common, o: Soak) -> anyhow::Result<()> {
    let env = Env::up("soak", common).await?;
    let scale = o.time_scale.to_string();
    let (f500, f503) = (
        (o.fail_5xx / 2.0).to_string(),
        (o.fail_5xx / 2.0).to_string(),
    );
    let (emulator, admin) = env.emulator(
        "emulator",
        &[
            "--time-scale",
            &scale,
            "--fail-500",
            &f500,
            "--fail-503",
            &f503,
        ],
    )?;
    k::namespace(&env.client, "bench", Some(&emulator.connection_string)).await?;
    let tracker = Tracker::start(&env.client).await?;
    let operator = env.operator(&[])?;
    let keys = k::identity_keys(&["bench".to_owned()], o.n);
    provision(&env, &tracker, &keys, "1h", provision_timeout(o.n, 1)).await?;

    let run = Duration::from_secs_f64(o.sim_hours * 3600.0 / o.time_scale);
    // Simulated 10 minutes in real seconds.
    let low = 600.0 / o.time_scale;
    let outage_at = run / 2;
    let outage = Duration::from_secs(o.outage_seconds);
    let burst_every = run / (o.bursts as u32 + 1);
    say(format!(
        "soaking {:.0}s real = {} simulated hours (scale {}), {}% 5xx, {} 429 bursts of {}s, a {}s outage at {}s",
        run.as_secs_f64(),
        o.sim_hours,
        o.time_scale,
        o.fail_5xx * 100.0,
        o.bursts,
        o.burst_seconds,
        o.outage_seconds,
        outage_at.as_secs()
    ));
    let started = Instant::now();
    let mut last_tick = started;
    let (mut expired_reachable, mut expired_unreachable, mut expired_after_outage) =
        (0.0, 0.0, 0.0);
    let (mut low_reachable, mut low_total) = (0.0, 0.0);
    let mut outage_started = false;
    let mut next_burst = 1u32;
    let mut burst_until: Option<Instant> = None;
    let mut last_print = started;
    let mut min_left = f64::INFINITY;
    // Outage end → the first second every Secret holds an unexpired token again.
    let mut fresh_after_outage: Option<f64> = None;
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now_instant = Instant::now();
        let dt = now_instant.duration_since(last_tick).as_secs_f64();
        last_tick = now_instant;
        let t = started.elapsed();
        if !outage_started && t >= outage_at {
            admin.outage("unavailable", o.outage_seconds).await?;
            outage_started = true;
            say(format!("outage for {}s begins", o.outage_seconds));
        }
        let reachable = !(outage_started && t >= outage_at && t < outage_at + outage);
        if reachable
            && burst_until.is_none()
            && next_burst <= o.bursts as u32
            && t >= burst_every * next_burst
        {
            admin
                .patch_config(
                    // The emulator's window is real time: in compressed time a burst is a 1-s
                    // window with 2 issues (demand is ~n/40 per second), so 429s come with a
                    // Retry-After of a second, as a 30-s window is to real 1-h tokens.
                    json!({"limits": {"windowSeconds": 1, "issueAccessToken": 2, "createIdentityWithToken": 2}}),
                )
                .await?;
            burst_until = Some(now_instant + Duration::from_secs(o.burst_seconds));
            say(format!(
                "429 burst {next_burst}/{} for {}s",
                o.bursts, o.burst_seconds
            ));
            next_burst += 1;
        }
        if let Some(until) = burst_until
            && now_instant >= until
        {
            admin
                .patch_config(
                    json!({"limits": {"windowSeconds": 30, "issueAccessToken": 1000, "createIdentityWithToken": 1000}}),
                )
                .await?;
            burst_until = None;
        }
        let secrets = k::managed_secrets(&env.client, "bench").await?;
        let now = jiff::Timestamp::now();
        let mut expired_now = 0;
        for (_, expires_on, _) in secrets.values() {
            let Ok(expires) = expires_on.parse::<jiff::Timestamp>() else {
                continue;
            };
            let left = expires.duration_since(now).as_secs_f64();
            min_left = min_left.min(left);
            if left <= 0.0 {
                expired_now += 1;
                if reachable {
                    expired_reachable += dt;
                    if outage_started {
                        expired_after_outage += dt;
                    }
                } else {
                    expired_unreachable += dt;
                }
            }
            if left < low {
                low_total += dt;
                if reachable {
                    low_reachable += dt;
                }
            }
        }
        if outage_started && t >= outage_at + outage && fresh_after_outage.is_none() {
            let fresh = expired_now == 0 && secrets.len() == o.n;
            if fresh {
                fresh_after_outage = Some((t - (outage_at + outage)).as_secs_f64());
            }
        }
        if last_print.elapsed() >= Duration::from_secs(30) {
            last_print = Instant::now();
            say(format!(
                "soak: {:.1}/{} simulated h, elapsed {:.0}s, expired-while-reachable {:.0} Secret·s, <10 min left {:.0} Secret·s, {} Ready",
                t.as_secs_f64() * o.time_scale / 3600.0,
                o.sim_hours,
                t.as_secs_f64(),
                expired_reachable,
                low_total,
                tracker.ready_now()
            ));
        }
    }
    let mut results = Results::new("soak");
    results.data("n", json!(o.n));
    results.data("simulatedHours", json!(o.sim_hours));
    results.data("timeScale", json!(o.time_scale));
    results.data("realSeconds", json!(run.as_secs()));
    results.data("fail5xx", json!(o.fail_5xx));
    results.data("outageRealSeconds", json!(o.outage_seconds));
    let sim = |secs: f64| secs * o.time_scale;
    results.figure(
        "expiredWhileReachable",
        "Secret·s with an expired token, ACS reachable",
        json!({"real": round(expired_reachable, 1), "simulated": round(sim(expired_reachable), 0), "afterOutageReal": round(expired_after_outage, 1)}),
        format!(
            "{:.0} real ({:.0} simulated); {:.0} real after the outage",
            expired_reachable,
            sim(expired_reachable),
            expired_after_outage
        ),
        "0",
    );
    results.figure(
        "expiredWhileUnreachable",
        "Secret·s expired during the outage",
        json!({"real": round(expired_unreachable, 1), "simulated": round(sim(expired_unreachable), 0)}),
        format!("{:.0} real ({:.0} simulated)", expired_unreachable, sim(expired_unreachable)),
        "(not counted)",
    );
    results.figure(
        "underTenMinutes",
        "Secret·s with < 10 min (scaled) left",
        json!({"real": round(low_total, 1), "simulated": round(sim(low_total), 0), "reachableReal": round(low_reachable, 1)}),
        format!(
            "{:.0} real ({:.0} simulated; {:.0} real while reachable)",
            low_total,
            sim(low_total),
            low_reachable
        ),
        "report",
    );
    results.data("minimumSecondsLeftReal", json!(round(min_left, 2)));
    // The issue's bound: N re-issues at the issue rate, of which the 5xx share fails again.
    let issue_rate = CREATE_LIMIT as f64 / WINDOW_SECONDS as f64;
    let bound = 1.2 * o.n as f64 / (issue_rate * (1.0 - o.fail_5xx));
    results.figure(
        "freshAfterOutageSeconds",
        "outage end → every Secret fresh (1-s ticks)",
        json!({"seconds": fresh_after_outage.map(|s| round(s, 1)), "bound": round(bound, 1)}),
        match fresh_after_outage {
            Some(seconds) => format!("{seconds:.0} s"),
            None => "never within the run".to_owned(),
        },
        &format!("≤ {bound:.1} s"),
    );
    let stats = admin.stats().await?;
    let secrets = k::managed_secrets(&env.client, "bench").await?;
    let mut verdicts: BTreeMap<String, usize> = BTreeMap::new();
    for (token, _, _) in secrets.values() {
        *verdicts.entry(admin.validate(token).await?).or_default() += 1;
    }
    results.figure(
        "validTokensAtEnd",
        "valid tokens at the end",
        json!(verdicts),
        format!("{}/{}", verdicts.get("valid").copied().unwrap_or(0), o.n),
        "all",
    );
    results.figure(
        "readyAtEnd",
        "Ready at the end",
        json!(tracker.ready_now()),
        format!("{}/{}", tracker.ready_now(), o.n),
        "",
    );
    let requests = stats.requests();
    results.figure(
        "acsRequests",
        "ACS requests (5xx, 429)",
        json!(requests),
        format!(
            "{} ({} 5xx, {} 429)",
            stats.total_requests(),
            stats.with_status("500") + stats.with_status("503"),
            stats.with_status("429")
        ),
        "",
    );
    drop(operator);
    results.finish(&env.repo)?;
    Ok(())
}

/// 8 (issue 12): namespace `burst-a` applies `burst` new identities while namespace `burst-b`,
/// on the same ACS resource, has `due` tokens due at once (the refresh annotation, once A's
/// creates are queued); B's refresh delays: annotation written → new token in its Secret.
pub async fn refresh_under_burst(common: &Common, burst: usize, due: usize) -> anyhow::Result<()> {
    const A: &str = "burst-a";
    const B: &str = "burst-b";
    let env = Env::up("refresh-under-burst", common).await?;
    let (emulator, admin) = env.emulator("emulator", &[])?;
    for namespace in [A, B] {
        k::namespace(&env.client, namespace, Some(&emulator.connection_string)).await?;
    }
    let tracker = Tracker::start(&env.client).await?;
    let operator = env.operator(&[])?;
    let b_keys = k::identity_keys(&[B.to_owned()], due);
    say(format!("provisioning {due} identities in {B}"));
    provision(&env, &tracker, &b_keys, "1h", provision_timeout(due, 1)).await?;
    let before = k::managed_secrets(&env.client, B).await?;

    let a_keys = k::identity_keys(&[A.to_owned()], burst);
    say(format!("{A} applies {burst} identities"));
    let applying = {
        let (client, concurrency, keys) = (env.client.clone(), env.concurrency, a_keys.clone());
        tokio::spawn(async move {
            k::apply_all(
                &client,
                "burst applied",
                &keys,
                concurrency,
                k::identity_resource(),
                |key| k::identity_body(key, "1h"),
            )
            .await
        })
    };
    // B's refreshes come due once A's creates exceed a window's budget: the rest queue.
    let a_ready = |t: &k::Tracked| t.first_ready().keys().filter(|k| k.namespace == A).count();
    tracker
        .wait(
            "burst past one window",
            CREATE_LIMIT.min(burst),
            Duration::from_secs(120),
            move |t| a_ready(t),
        )
        .await?;
    // A's resources no pass has written a status to yet: each first pass still to come
    // competes with B's passes for the operator's reconcile workers.
    let a_unpassed = tracker.without_condition(A);
    let due_at = Instant::now();
    let value = format!("bench-{}", jiff::Timestamp::now().as_second());
    let annotated = k::apply_all(
        &env.client,
        "refreshes requested",
        &b_keys,
        env.concurrency,
        k::identity_resource(),
        |key| {
            let mut body = k::identity_body(key, "1h");
            body["metadata"]["annotations"] =
                json!({ "acs-operator.io/refresh-requested-at": value });
            body
        },
    )
    .await?;
    let queued_a = burst - a_ready(&tracker);
    let mut refreshed: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while refreshed.len() < due {
        ensure!(
            Instant::now() < deadline,
            "only {} of {due} refreshed within 600 s",
            refreshed.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        for (name, (token, _, _)) in k::managed_secrets(&env.client, B).await? {
            let changed = before.get(&name).is_some_and(|(old, _, _)| *old != *token);
            if changed {
                refreshed.entry(name).or_insert(now);
            }
        }
    }
    let mut delays: Vec<f64> = b_keys
        .iter()
        .map(|key| {
            let secret = format!("{}-acs-token", key.name);
            refreshed[&secret]
                .saturating_duration_since(annotated[key])
                .as_secs_f64()
        })
        .collect();
    let a_ready_at_end = a_ready(&tracker);
    applying.await??;

    let mut results = Results::new("refresh-under-burst");
    results.data("burst", json!(burst));
    results.data("due", json!(due));
    results.data("burstStillQueuedWhenDue", json!(queued_a));
    results.data("burstReadyWhenBDone", json!(a_ready_at_end));
    results.data("burstWithoutStatusWhenDue", json!(a_unpassed));
    let a_first_passes_done = (tracker.first_condition().iter())
        .filter(|(key, _)| key.namespace == A)
        .map(|(_, at)| at.saturating_duration_since(due_at).as_secs_f64())
        .fold(0.0, f64::max);
    results.data(
        "burstFirstPassesDoneAfterDueSeconds",
        json!(round(a_first_passes_done, 2)),
    );
    let (p50, p99, max) = (
        quantile(&mut delays, 0.5),
        quantile(&mut delays, 0.99),
        quantile(&mut delays, 1.0),
    );
    // B's share of the issue budget: its own refreshes at the issue rate (A's creates spend
    // the create budget, a budget of their own).
    let share = due as f64 / (CREATE_LIMIT as f64 / WINDOW_SECONDS as f64);
    results.figure(
        "refreshDelaySeconds",
        "B's refresh delay (annotated → new token in its Secret)",
        json!({"p50": round(p50, 2), "p99": round(p99, 2), "max": round(max, 2)}),
        format!("p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s"),
        &format!("≤ ~1 s + B's share of the budget ({share:.1} s)"),
    );
    let stats = admin.stats().await?;
    results.figure(
        "throttled",
        "429 answers",
        json!(stats.with_status("429")),
        stats.with_status("429").to_string(),
        "0",
    );
    drop(operator);
    results.finish(&env.repo)?;
    Ok(())
}
