//! The processes a scenario starts: the local control plane (scripts/local-cluster.sh), the
//! emulators and the operators. Every child is registered so that it is killed when its handle
//! drops, on Ctrl-C/SIGTERM and on panic; the cluster also stops itself when this process dies
//! (ACS_WATCH_PID), however it ends.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use acs_emulator::process::{Launch as EmulatorLaunch, Ready};
use acs_identity_operator::launch::{Launch, metrics_addr};
use anyhow::{Context as _, bail};

/// Pids of the children still running, for the signal and panic handlers.
static CHILDREN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
/// State folders of the clusters that are up, for the signal handler.
static CLUSTERS: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGKILLs every registered child (only our own, by pid) and stops the clusters.
pub fn kill_everything() {
    let pids: Vec<u32> = std::mem::take(&mut *lock(&CHILDREN)).into_iter().collect();
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    let clusters = std::mem::take(&mut *lock(&CLUSTERS));
    for (script, state) in clusters {
        let _ = Command::new(&script)
            .arg("down")
            .env("ACS_DEV_DIR", &state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Ctrl-C, SIGTERM and panics end every child before the process goes.
pub fn install_cleanup_handlers() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        kill_everything();
    }));
    tokio::spawn(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("bench: interrupted; stopping every process it started");
        kill_everything();
        std::process::exit(130);
    });
}

/// A child process, SIGKILLed and reaped when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        lock(&CHILDREN).insert(child.id());
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        lock(&CHILDREN).remove(&self.child.id());
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// CPU seconds (user + system) the process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Resident set size and its peak, in KiB, from /proc.
    pub fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| {
            status
                .lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU seconds (user + system) process `pid` has used, from /proc/PID/stat (clock ticks of
/// 1/100 s on Linux); 0 when it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The local control plane of one scenario, stopped when dropped.
pub struct Cluster {
    script: PathBuf,
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    /// PATH with kubectl in front.
    pub path: String,
}

impl Cluster {
    pub fn up(repo: &Path, name: &str) -> anyhow::Result<Self> {
        let script = repo.join("scripts/local-cluster.sh");
        let state = repo.join(".dev").join(format!("bench-{name}"));
        lock(&CLUSTERS).push((script.clone(), state.clone()));
        let started = Instant::now();
        let status = Command::new(&script)
            .arg("up")
            .env("ACS_DEV_DIR", &state)
            .env("ACS_WATCH_PID", std::process::id().to_string())
            .stdout(Stdio::null())
            .status()
            .context("cannot run scripts/local-cluster.sh")?;
        if !status.success() {
            bail!("scripts/local-cluster.sh up failed ({status})");
        }
        let env = Command::new(&script)
            .arg("env")
            .env("ACS_DEV_DIR", &state)
            .output()?;
        let env = String::from_utf8(env.stdout)?;
        let mut path = std::env::var("PATH").unwrap_or_default();
        for line in env.lines() {
            if let Some(value) = line.strip_prefix("export PATH=") {
                path = value.replace("$PATH", &path);
            }
        }
        crate::report::say(format!(
            "cluster up in {:.1}s (state {})",
            started.elapsed().as_secs_f64(),
            state.display()
        ));
        Ok(Self {
            kubeconfig: state.join("kubeconfig"),
            script,
            state,
            path,
        })
    }

    /// `kubectl …` against this cluster; fails on a non-zero exit.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", &self.path)
            .output()
            .context("cannot run kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }
}

impl Cluster {
    /// The control plane's processes (etcd, kube-apiserver, kube-controller-manager) by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        std::fs::read_to_string(self.state.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (name, pid) = line.split_once(' ')?;
                Some((name.to_owned(), pid.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("down")
            .env("ACS_DEV_DIR", &self.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        lock(&CLUSTERS).retain(|(_, state)| state != &self.state);
    }
}

/// A running acs-emulator with its admin endpoints on.
pub struct Emulator {
    /// Killed when the emulator handle drops.
    _proc: Proc,
    /// The connection string; it holds the access key, so it is never printed.
    pub connection_string: String,
    /// `https://127.0.0.1:PORT`
    pub endpoint: String,
    pub ca_file: PathBuf,
}

impl Emulator {
    /// Starts `acs-emulator --admin --tls-dir DIR EXTRA…` and reads its connection string.
    /// Every emulator of a scenario shares one CA (the first creates it, the others reuse it),
    /// so one `--acs-ca-file` serves the operator for all of them.
    pub fn start(bin_dir: &Path, dir: &Path, name: &str, extra: &[String]) -> anyhow::Result<Self> {
        let launch = EmulatorLaunch {
            program: bin_dir.join("acs-emulator"),
            tls_dir: dir.join("emulator-tls"),
            args: extra.to_vec(),
        };
        std::fs::create_dir_all(&launch.tls_dir)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut proc = Proc::spawn(name, launch.command().stderr(log))?;
        let Ready {
            connection_string,
            endpoint,
            ca_file,
        } = launch.wait_ready(&mut proc.child)?;
        Ok(Self {
            _proc: proc,
            connection_string,
            endpoint,
            ca_file,
        })
    }
}

/// A running operator and the address of its /metrics.
pub struct Operator {
    pub proc: Proc,
    pub metrics_addr: String,
    pub started: Instant,
    pub log: PathBuf,
}

impl Operator {
    /// Starts `acs-identity-operator run` over all namespaces and waits (up to 30 s) for the
    /// log line that names its metrics address.
    pub fn start(
        bin_dir: &Path,
        cluster: &Cluster,
        ca_file: &Path,
        log: PathBuf,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let launch = Launch {
            program: bin_dir.join("acs-identity-operator"),
            kubeconfig: cluster.kubeconfig.clone(),
            ca_file: ca_file.to_owned(),
            args: extra.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        let proc = Proc::spawn(
            "operator",
            launch
                .command()
                .env("RUST_LOG", operator_log_filter())
                .stdout(file.try_clone()?)
                .stderr(file),
        )?;
        let mut operator = Self {
            proc,
            metrics_addr: String::new(),
            started,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&operator.log).unwrap_or_default();
            if let Some(addr) = metrics_addr(&text).filter(|_| operator.proc.alive()) {
                // The log is appended across restarts: only a line written after this start
                // counts, so wait until the port answers.
                if std::net::TcpStream::connect(addr).is_ok() {
                    operator.metrics_addr = addr.to_string();
                    return Ok(operator);
                }
            }
            if !operator.proc.alive() {
                bail!(
                    "the operator exited at start; see {}",
                    operator.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the operator logged no metrics address within 30 s; see {}",
            operator.log.display()
        )
    }
}

/// The operators' log filter: `info`, or `ACS_BENCH_OPERATOR_LOG` (e.g.
/// `info,acs_identity_operator::reconcile=debug` to see why passes wait).
fn operator_log_filter() -> String {
    std::env::var("ACS_BENCH_OPERATOR_LOG").unwrap_or_else(|_| "info".to_owned())
}
