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

/// The Entra flags as the operator's integration tests give them: an exchange succeeds, a
/// refused bearer token is logged as refused, and neither the assertion nor a token reaches
/// the log, even at debug level.
#[tokio::test]
async fn entra_flags_work_and_no_assertion_or_token_is_logged() {
    use acs_emulator::SigningKey;

    let dir = std::env::temp_dir().join(format!("acs-emulator-entra-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let issuer_key = SigningKey::generate().unwrap();
    let jwks = dir.join("jwks.json");
    let set = acs_emulator::JwkSet {
        keys: vec![issuer_key.public_jwk()],
    };
    std::fs::write(&jwks, serde_json::to_string(&set).unwrap()).unwrap();
    let (tenant, client_id, issuer) =
        ("t-1", "c-1", "https://kubernetes.default.svc.cluster.local");
    let subject = "system:serviceaccount:ns:sa";
    let mut child = emulator()
        .args(["--http", "--access-key", KEY, "--federated-credential"])
        .arg(format!(
            "tenant={tenant},client={client_id},issuer={issuer},subject={subject}"
        ))
        .arg("--issuer-jwks-file")
        .arg(format!("{issuer}={}", jwks.display()))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let endpoint = line
        .trim()
        .strip_prefix("endpoint=")
        .and_then(|l| l.split_once("/;"))
        .unwrap()
        .0
        .to_owned();

    let now = jiff::Timestamp::now().as_second();
    let assertion = issuer_key.mint(&serde_json::json!({
        "iss": issuer, "sub": subject, "aud": "api://AzureADTokenExchange", "exp": now + 600,
    }));
    let http = reqwest::Client::new();
    let answer: serde_json::Value = http
        .post(format!("{endpoint}/{tenant}/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("scope", "https://communication.azure.com//.default"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = answer["access_token"].as_str().unwrap().to_owned();
    let created = http
        .post(format!("{endpoint}/identities?api-version=2026-09-23"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // Refused: the assertion is no access token.
    let refused = http
        .post(format!("{endpoint}/identities?api-version=2026-09-23"))
        .bearer_auth(&assertion)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(stderr.contains("bearer token refused"), "{stderr}");
    for secret in [&assertion, &token] {
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!stderr.contains(signature), "a token leaked to the log");
    }
}
