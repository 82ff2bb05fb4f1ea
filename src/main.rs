//! The operator binary: `acs-identity-operator crd` prints the CustomResourceDefinition.

use clap::{Parser, Subcommand};

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
    /// Print the CommunicationIdentity CustomResourceDefinition (as checked in under crds/).
    Crd,
}

fn main() {
    match Args::parse().command {
        Command::Crd => print!("{}", acs_identity_operator::crd::crd_yaml()),
    }
}
