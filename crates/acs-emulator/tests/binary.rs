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

/// Without --tls-dir the CA lives in a fresh directory only this user can enter, named in the
/// log, and gone after a clean exit.
#[cfg(unix)]
#[test]
fn the_default_tls_directory_is_private_to_the_process_and_removed_on_exit() {
    use std::os::unix::fs::PermissionsExt as _;

    let mut child = emulator()
        .args(["--listen", "127.0.0.1:0", "--access-key", KEY])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut ca = None;
    for line in (&mut stderr).lines() {
        if let Some((_, path)) = line.unwrap().split_once("; trust ") {
            ca = Some(std::path::PathBuf::from(path));
            break;
        }
    }
    let ca = ca.expect("the log names the CA certificate");
    let dir = ca.parent().unwrap().to_owned();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let (dir_mode, key_mode) = (mode(&dir), mode(&dir.join("ca.key")));
    let terminated = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {pid}"))
        .status()
        .unwrap();
    assert!(terminated.success());
    let exit = child.wait().unwrap();

    assert!(ca.starts_with(std::env::temp_dir()), "{}", ca.display());
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert!(
        !name.ends_with(&format!("-{pid}")),
        "a name derived from the pid can be planted in advance: {name}"
    );
    assert_eq!(dir_mode, 0o700);
    assert_eq!(key_mode, 0o600);
    assert!(exit.success(), "{exit:?}");
    assert!(!dir.exists(), "{} was left behind", dir.display());
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
