//! The operator binary: `run` runs the controller, `crd` prints the CustomResourceDefinition.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use acs_identity_operator::context::AcsSettings;
use acs_identity_operator::leader::{LeaseSettings, default_identity};
use acs_identity_operator::run::{RunConfig, run};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

// jemalloc, with background threads returning freed pages to the system within seconds: at
// 10,000 identities a fresh operator holds 48.8 MiB, against 65.5 MiB with glibc's malloc
// (docs/benchmarks.md, scenario 3).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Keeps Azure Communication Services identities and tokens in step with CommunicationIdentity resources"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (kubeconfig from KUBECONFIG or ~/.kube/config, or in-cluster).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions (as checked in under crds/).
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace; all namespaces when absent.
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// PEM file of extra CA certificates to trust for ACS endpoints (e.g. the emulator's ca.crt).
    #[arg(long, env = "ACS_CA_FILE")]
    acs_ca_file: Option<PathBuf>,
    /// Accept plain-http ACS endpoints. For local development against the emulator only.
    #[arg(long)]
    allow_insecure_http: bool,
    /// Host suffixes a connection string's endpoint may have, comma-separated (an IP address or
    /// `localhost` only as listed). The default admits Azure's public and sovereign ACS domains
    /// and nothing else: tenants write their own connection strings, and the operator must not
    /// be sent to arbitrary servers with them.
    #[arg(long, env = "ACS_ENDPOINT_SUFFIXES", value_parser = parse_endpoint_policy)]
    acs_endpoint_suffixes: Option<acs::EndpointPolicy>,
    /// Requests sent to each ACS resource, as a multiple of the published limits (1000 creates
    /// and 1000 token issues per 30 s): raise it for a resource whose quotas Microsoft raised;
    /// `off` lifts the client-side limit (for the emulator's --no-limits mode).
    #[arg(long, default_value = "1", value_parser = parse_quota, env = "ACS_RATE_LIMIT")]
    acs_rate_limit: acs::Quota,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    log_format: LogFormat,
    /// Address for /metrics, /healthz and /readyz (port 0 picks a free port, logged at start).
    #[arg(long, default_value = "0.0.0.0:8080", env = "METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// Run the controller only while holding a Lease, so that several replicas can run with
    /// one acting and the others standing by.
    #[arg(long)]
    leader_elect: bool,
    /// The operator's own namespace: its leader election Lease, and where a ClusterAcsConnection's
    /// Secret is unless the connection names a namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader election Lease.
    #[arg(long, default_value = "acs-identity-operator")]
    leader_election_lease_name: String,
    /// Seconds a leader's Lease stays valid without renewal; a standby takes over within this
    /// long after a leader dies. The leader renews every 2 s and stops acting when it could not
    /// for two thirds of it, which must leave room for one more renewal before expiry.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(9..=3600))]
    leader_election_lease_duration: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crd => print!("{}", acs_identity_operator::crd::crd_yaml()),
        Command::Run(args) => {
            init_logging(args.log_format);
            let extra_ca_pem = match &args.acs_ca_file {
                Some(path) => Some(
                    std::fs::read(path)
                        .with_context(|| format!("cannot read --acs-ca-file {}", path.display()))?,
                ),
                None => None,
            };
            let config = RunConfig {
                watch_namespace: args.watch_namespace,
                acs: AcsSettings {
                    extra_ca_pem,
                    allow_http: args.allow_insecure_http,
                    endpoint_policy: args
                        .acs_endpoint_suffixes
                        .unwrap_or_else(acs::EndpointPolicy::azure_default),
                    quota: args.acs_rate_limit,
                    operator_namespace: args.leader_election_namespace.clone(),
                },
                metrics_addr: args.metrics_addr,
                leader_election: args.leader_elect.then(|| LeaseSettings {
                    namespace: args.leader_election_namespace,
                    name: args.leader_election_lease_name,
                    identity: default_identity(),
                    lease_duration: Duration::from_secs(args.leader_election_lease_duration),
                }),
            };
            tokio::runtime::Runtime::new()?.block_on(run(config))?;
        }
    }
    Ok(())
}

fn parse_quota(text: &str) -> Result<acs::Quota, String> {
    if text == "off" {
        return Ok(acs::Quota::Unlimited);
    }
    match text.parse::<f64>() {
        Ok(factor) if factor.is_finite() && factor > 0.0 => Ok(acs::Quota::Scaled(factor)),
        _ => Err(format!(
            "{text:?} is neither a positive multiple of the published limits (e.g. 1 or 2.5) nor \"off\""
        )),
    }
}

fn parse_endpoint_policy(text: &str) -> Result<acs::EndpointPolicy, String> {
    acs::EndpointPolicy::from_list(text).map_err(|error| error.to_string())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_is_a_multiple_of_the_published_limits_or_off() {
        assert_eq!(parse_quota("1"), Ok(acs::Quota::Scaled(1.0)));
        assert_eq!(parse_quota("2.5"), Ok(acs::Quota::Scaled(2.5)));
        assert_eq!(parse_quota("off"), Ok(acs::Quota::Unlimited));
        for bad in ["0", "-1", "NaN", "fast"] {
            let message = parse_quota(bad).unwrap_err();
            assert!(
                message.contains(bad) && message.contains("off"),
                "{message}"
            );
        }
    }
}
