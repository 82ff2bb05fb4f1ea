//! Starting the `acs-emulator` binary as a child process, the one way the integration tests and
//! the bench do it: on a free loopback port, over HTTPS with its CA in a directory of the
//! caller's, the admin endpoints on, and ready once it prints its one line on stdout, the
//! connection string (`scripts/lib/emulator.sh` reads the same line).

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

/// How to start an emulator.
pub struct Launch {
    /// The `acs-emulator` binary.
    pub program: PathBuf,
    /// Where its CA is written, or reused from when it is there already.
    pub tls_dir: PathBuf,
    /// Flags after the launch's own (`--access-key`, `--latency-ms`, …).
    pub args: Vec<String>,
}

/// A started emulator, from its first line.
pub struct Ready {
    /// Contains the access key: never print it.
    pub connection_string: String,
    /// `https://127.0.0.1:PORT`, without a trailing `/`.
    pub endpoint: String,
    /// The CA certificate to trust.
    pub ca_file: PathBuf,
}

impl Launch {
    /// The command to spawn: stdout piped for [`Launch::wait_ready`], stderr left to the caller
    /// (spawning is too, so that callers who track their children register it at once).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(["--listen", "127.0.0.1:0", "--admin", "--tls-dir"])
            .arg(&self.tls_dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        command
    }

    /// Waits for the first line of `child`, spawned from [`Launch::command`]: the emulator
    /// prints it once it accepts connections.
    pub fn wait_ready(&self, child: &mut Child) -> anyhow::Result<Ready> {
        let stdout = child
            .stdout
            .take()
            .context("the emulator's stdout is not piped")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the emulator's connection string")?;
        let connection_string = line.trim().to_owned();
        let endpoint = acs::ConnectionString::parse(&connection_string, false)
            .context("the emulator printed no connection string (see its log)")?
            .endpoint;
        Ok(Ready {
            connection_string,
            endpoint,
            ca_file: self.tls_dir.join("ca.crt"),
        })
    }
}
