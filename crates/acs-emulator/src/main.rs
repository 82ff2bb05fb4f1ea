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
    wait_for_termination().await;
    tracing::info!("shutting down");
    emulator.shutdown().await;
    Ok(())
}

async fn wait_for_termination() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
