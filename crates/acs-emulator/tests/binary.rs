//! The `acs-emulator` command line as the tests and the demo use it.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

const KEY: &str = "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=";

fn emulator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_acs-emulator"))
}

#[test]
fn prints_one_connection_string_line_with_the_real_port_and_writes_the_ca_first() {
    let dir = std::env::temp_dir().join(format!("acs-emulator-bin-{}", std::process::id()));
    let mut child = emulator()
        .args(["--listen", "127.0.0.1:0", "--access-key", KEY, "--tls-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let ca_written = dir.join("ca.crt").exists();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let line = line.trim_end();
    let endpoint = line
        .strip_prefix("endpoint=https://127.0.0.1:")
        .and_then(|l| l.strip_suffix(&format!("/;accesskey={KEY}")))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    assert!(endpoint.parse::<u16>().unwrap() > 0);
    assert!(ca_written);
    assert_eq!(rest, "", "exactly one line on stdout");
    assert!(!stderr.contains(KEY), "the key leaked to stderr: {stderr}");
}

#[test]
fn a_bad_flag_is_a_one_line_error() {
    let output = emulator().arg("--no-such-flag").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("acs-emulator: "), "{stderr}");
    assert!(output.stdout.is_empty());
}
