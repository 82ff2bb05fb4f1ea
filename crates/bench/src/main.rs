//! `acs-bench SCENARIO`: the performance and chaos harness of issue 7 (and 12). Each scenario starts its
//! own local control plane (scripts/local-cluster.sh, state under .dev/bench-SCENARIO),
//! emulator(s) and operator(s), prints progress and a table, writes JSON under bench-results/,
//! and stops everything it started. Never part of the test command; run it through
//! scripts/bench.sh, which builds the release binaries first.

mod kube;
mod probe;
mod procs;
mod report;
mod scenarios;

use clap::{Parser, Subcommand};

use crate::scenarios::{Common, Soak};

#[derive(Parser)]
#[command(about = "Performance and chaos scenarios for acs-identity-operator")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// 1: N identities applied at once against the service's limits; time to all Ready vs the
    /// floor the limits allow, 429s, ACS calls per identity.
    ProvisionLimited {
        #[arg(long, default_value_t = 10_000)]
        n: usize,
    },
    /// 2: the same with limits off (spread over --resources emulators), beside the API
    /// server's raw rate for N plain Secrets measured in the same run.
    ProvisionUnlimited {
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Emulators (and namespaces) to spread the identities over; the operator's client-side
        /// rate limiter is per ACS endpoint, so more resources lift it out of the way.
        #[arg(long, default_value_t = 1)]
        resources: usize,
    },
    /// 3: operator RSS with N identities, without and with N unrelated Secrets.
    Memory {
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Unrelated Secrets (default: N).
        #[arg(long)]
        secrets: Option<usize>,
        /// Seconds to idle before each measurement.
        #[arg(long, default_value_t = 15)]
        settle: u64,
    },
    /// 4: ACS calls and API-server writes of an idle operator; then a restart.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        #[arg(long, default_value_t = 300)]
        idle_seconds: u64,
    },
    /// 5: SIGKILL the operator while provisioning and while deleting; count leaks.
    Crash {
        #[arg(long, default_value_t = 200)]
        n: usize,
        #[arg(long, default_value_t = 20)]
        kills: usize,
        #[arg(long, default_value_t = 10)]
        delete_kills: usize,
        /// Longest random pause before a kill, in milliseconds (the shortest is 100).
        #[arg(long, default_value_t = 1500)]
        max_pause_ms: u64,
    },
    /// 6: compressed-time soak with 5xx, 429 bursts and an outage.
    Soak {
        #[arg(long, default_value_t = 200)]
        n: usize,
        #[arg(long, default_value_t = 24.0)]
        sim_hours: f64,
        /// 60: a 60-minute token lives 60 s (the emulator's --minutes-are-seconds).
        #[arg(long, default_value_t = 60.0)]
        time_scale: f64,
        /// Fraction of ACS requests failing with 5xx (half 500, half 503).
        #[arg(long, default_value_t = 0.3)]
        fail_5xx: f64,
        /// Real seconds of the outage (every request 503) halfway through.
        #[arg(long, default_value_t = 120)]
        outage_seconds: u64,
        /// 429 bursts (issues cut to 2 per 1-s window) spread over the run.
        #[arg(long, default_value_t = 4)]
        bursts: usize,
        #[arg(long, default_value_t = 10)]
        burst_seconds: u64,
    },
    /// 7: one resource, then --resources resources with limits on, in the same run.
    ScaleOut {
        /// Identities per resource (phase 1 uses this many on one resource).
        #[arg(long, default_value_t = 2_500)]
        n: usize,
        #[arg(long, default_value_t = 4)]
        resources: usize,
        /// Skip measuring the API server's raw Secret rate at the end.
        #[arg(long)]
        skip_raw: bool,
    },
    /// 8: one namespace applies --burst identities while another, on the same ACS resource,
    /// has --due tokens due; the second's refresh delays.
    RefreshUnderBurst {
        #[arg(long, default_value_t = 5_000)]
        burst: usize,
        #[arg(long, default_value_t = 100)]
        due: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        procs::install_cleanup_handlers();
        let common = &args.common;
        let result = match args.scenario {
            Scenario::ProvisionLimited { n } => scenarios::provision_limited(common, n).await,
            Scenario::ProvisionUnlimited { n, resources } => {
                scenarios::provision_unlimited(common, n, resources).await
            }
            Scenario::Memory { n, secrets, settle } => {
                scenarios::memory(common, n, secrets.unwrap_or(n), settle).await
            }
            Scenario::Idle { n, idle_seconds } => scenarios::idle(common, n, idle_seconds).await,
            Scenario::Crash {
                n,
                kills,
                delete_kills,
                max_pause_ms,
            } => scenarios::crash(common, n, kills, delete_kills, max_pause_ms).await,
            Scenario::Soak {
                n,
                sim_hours,
                time_scale,
                fail_5xx,
                outage_seconds,
                bursts,
                burst_seconds,
            } => {
                scenarios::soak(
                    common,
                    Soak {
                        n,
                        sim_hours,
                        time_scale,
                        fail_5xx,
                        outage_seconds,
                        bursts,
                        burst_seconds,
                    },
                )
                .await
            }
            Scenario::ScaleOut {
                n,
                resources,
                skip_raw,
            } => scenarios::scale_out(common, n, resources, !skip_raw).await,
            Scenario::RefreshUnderBurst { burst, due } => {
                scenarios::refresh_under_burst(common, burst, due).await
            }
        };
        procs::kill_everything();
        result
    })
}
