//! The operator binary: `run` runs the controller, `crd` prints the CustomResourceDefinition.

use std::path::PathBuf;

use acs_identity_operator::context::AcsSettings;
use acs_identity_operator::run::{RunConfig, run};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Print the CommunicationIdentity CustomResourceDefinition (as checked in under crds/).
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
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    log_format: LogFormat,
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
                },
            };
            tokio::runtime::Runtime::new()?.block_on(run(config))?;
        }
    }
    Ok(())
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
