//! Starting `acs-identity-operator run` as a child process next to a local control plane and
//! the acs-emulator: the one way the integration tests and the bench do it. It serves its
//! operations endpoints on a port of its own and trusts the emulator's CA; its loopback
//! endpoints are allowed (the default allowlist has Azure's ACS domains only).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// How to start an operator.
pub struct Launch {
    /// The `acs-identity-operator` binary.
    pub program: PathBuf,
    /// The kubeconfig it talks to the API server with.
    pub kubeconfig: PathBuf,
    /// The CA certificates (PEM) to trust for ACS.
    pub ca_file: PathBuf,
    /// Flags after the launch's own (`--watch-namespace`, `--acs-rate-limit`, …).
    pub args: Vec<String>,
}

impl Launch {
    /// The command to spawn; stdin closed, output and logging left to the caller.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(["run", "--metrics-addr", "127.0.0.1:0"])
            .args(["--acs-endpoint-suffixes", "127.0.0.1,localhost"])
            .arg("--acs-ca-file")
            .arg(&self.ca_file)
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null());
        command
    }
}

/// Where the operator whose log is `log` serves its operations endpoints: the address of its
/// last `serving metrics on ADDR` line, in text or JSON logs (`run` logs it once it listens).
pub fn metrics_addr(log: &str) -> Option<SocketAddr> {
    log.lines().rev().find_map(|line| {
        let (_, rest) = line.split_once(METRICS_LINE)?;
        let end = rest.find(['"', ' ']).unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

/// What `run` logs before the address it serves on.
pub const METRICS_LINE: &str = "serving metrics on ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_address_is_read_from_text_and_json_logs() {
        let cases = [
            (
                "text",
                "2026-12-02T07:00:00Z INFO serving metrics on 127.0.0.1:4012\n",
                Some("127.0.0.1:4012"),
            ),
            (
                "json",
                "{\"fields\":{\"message\":\"serving metrics on 127.0.0.1:4013\"}}",
                Some("127.0.0.1:4013"),
            ),
            (
                "the last start",
                "serving metrics on 127.0.0.1:1\nserving metrics on 127.0.0.1:2",
                Some("127.0.0.1:2"),
            ),
            ("not yet", "INFO starting\n", None),
            ("cut short", "serving metrics on 127.0.0", None),
        ];
        for (name, log, expected) in cases {
            let expected = expected.map(|addr| addr.parse().unwrap());
            assert_eq!(metrics_addr(log), expected, "{name}");
        }
    }
}
