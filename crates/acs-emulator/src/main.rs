//! `acs-emulator`: see `acs_emulator::cli` for the flags. Prints exactly one line on stdout,
//! the connection string, once it accepts connections; everything else goes to stderr.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use acs_emulator::cli::{self, Command};

fn main() -> ExitCode {
    let config = match cli::parse(std::env::args_os()) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("acs-emulator: {message}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("acs-emulator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(*config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("acs-emulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: acs_emulator::Config) -> anyhow::Result<()> {
    // Listening before the line below: whoever reads it may stop the emulator at once, and a
    // signal before the handlers are in place would kill it without cleanup.
    let termination = termination();
    let emulator = acs_emulator::start(config).await?;
    // The one line on stdout: the documented interface, and the only place the key appears.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", emulator.connection_string())?;
    stdout.flush()?;
    drop(stdout);
    match emulator.ca_cert_path() {
        Some(ca) => tracing::info!(
            "serving HTTPS on {}; trust {}",
            emulator.local_addr(),
            ca.display()
        ),
        None => tracing::info!("serving plain HTTP on {}", emulator.local_addr()),
    }
    termination.await;
    tracing::info!("shutting down");
    emulator.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM, listened for from the moment this is called.
#[cfg(unix)]
fn termination() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}

#[cfg(not(unix))]
fn termination() -> impl Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
