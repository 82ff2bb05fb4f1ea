//! The command line: `acs-emulator --listen 127.0.0.1:PORT --access-key BASE64KEY [--http]
//! [--tls-dir DIR] [--admin] [--no-limits] …`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use acs::AccessKey;
use base64::Engine as _;
use clap::Parser;

use crate::entra::TOKEN_EXCHANGE_AUDIENCE;
use crate::limits::MAX_LIMIT;
use crate::{Config, Faults, FederatedCredential, IssuerKeys, MAX_DURATION_SECONDS, Transport};

#[derive(Debug, Parser)]
#[command(
    name = "acs-emulator",
    version,
    about = "A local stand-in for the Azure Communication Services identity API.",
    long_about = "A local stand-in for the Azure Communication Services identity API.\n\nPrints one line, the connection string, on stdout once it accepts connections."
)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the printed line tells which).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The resource's access key (base64); a random one is generated if omitted.
    #[arg(long, value_name = "BASE64KEY")]
    access_key: Option<String>,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long)]
    http: bool,
    /// Keep the CA (ca.crt, ca.key) in DIR and reuse it on restart. DIR is created with mode
    /// 0700 if missing, and refused if group or others may write it or access ca.key.
    /// Without it, the CA is made in a fresh private directory of this process's own (see
    /// the log for its ca.crt), removed on exit.
    #[arg(long, value_name = "DIR", conflicts_with = "http")]
    tls_dir: Option<PathBuf>,
    /// Serve the /_emulator/ admin endpoints (stats, token validation, runtime config).
    #[arg(long)]
    admin: bool,
    /// Turn the service limits (429 + Retry-After) off.
    #[arg(long)]
    no_limits: bool,
    /// Override one limit, e.g. `--limit issueAccessToken=5` (repeatable; N from 1 to
    /// 1000000).
    /// Names: createIdentity, createIdentityWithToken, issueAccessToken, deleteIdentity,
    /// revokeAccessTokens.
    #[arg(long = "limit", value_name = "OPERATION=N")]
    limits: Vec<String>,
    /// Length of the sliding limit window (1 to 315360000, ten years).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_SECONDS)
    )]
    limit_window_seconds: u64,
    /// Keep identities in this file (a JSON-lines journal) across restarts.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// The resource GUID in identity ids and tokens (random, or the state file's, if omitted).
    #[arg(long, value_name = "GUID")]
    resource_id: Option<String>,
    /// Token lifetimes in minutes really last that many seconds (time scale 60).
    #[arg(long, conflicts_with = "time_scale")]
    minutes_are_seconds: bool,
    /// Token lifetimes run this many times faster than real time.
    #[arg(long, value_name = "FACTOR")]
    time_scale: Option<f64>,
    /// Fraction of API requests answered 500.
    #[arg(long = "fail-500", value_name = "FRACTION", default_value_t = 0.0)]
    fail500: f64,
    /// Fraction of API requests answered 503.
    #[arg(long = "fail-503", value_name = "FRACTION", default_value_t = 0.0)]
    fail503: f64,
    /// Latency added to every API request (at most ten years).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(..=Faults::MAX_LATENCY_MS)
    )]
    latency_ms: u64,
    /// Refuse this api-version as the service refuses a retired one: 400
    /// UnsupportedApiVersion (repeatable), e.g. `--retire-api-version 2025-03-02-preview`.
    #[arg(long = "retire-api-version", value_name = "VERSION")]
    retired_api_versions: Vec<String>,
    /// An Entra application's federated credential (repeatable):
    /// `tenant=GUID,client=GUID,issuer=URL,subject=SUBJECT[,audience=AUD]`; the audience
    /// defaults to api://AzureADTokenExchange.
    #[arg(long = "federated-credential", value_name = "FIELDS")]
    federated_credentials: Vec<String>,
    /// Take an issuer's keys from a JWKS file (re-read on each use) instead of fetching them
    /// through the issuer's OIDC discovery (repeatable): `ISSUER_URL=FILE`.
    #[arg(long = "issuer-jwks-file", value_name = "ISSUER=FILE")]
    issuer_jwks_files: Vec<String>,
    /// Fetch an issuer's keys from this JWKS URL instead of through the issuer's discovery
    /// (repeatable): `ISSUER_URL=JWKS_URL`, e.g. a local kube-apiserver's
    /// `https://127.0.0.1:6443/openid/v1/jwks` for `https://kubernetes.default.svc.cluster.local`.
    #[arg(long = "issuer-jwks-url", value_name = "ISSUER=URL")]
    issuer_jwks_urls: Vec<String>,
    /// A PEM CA bundle to trust, besides the public roots, when fetching issuers' keys (the
    /// kube-apiserver's CA).
    #[arg(long, value_name = "FILE")]
    issuer_ca: Option<PathBuf>,
    /// Lifetime of the Entra access tokens issued (1 to 86400).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = crate::entra::DEFAULT_TOKEN_LIFETIME_SECONDS,
        value_parser = clap::value_parser!(u64).range(1..=crate::entra::MAX_TOKEN_LIFETIME_SECONDS)
    )]
    entra_token_lifetime_seconds: u64,
}

/// What the command line asked for.
pub enum Command {
    Run(Box<Config>),
    /// `--help` or `--version`: print this and exit successfully.
    Print(String),
}

/// Parses the command line into a [`Config`]. Errors are one line.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                return Ok(Command::Print(e.to_string()));
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return Err(format!(
                "{} (see --help)",
                first.trim_start_matches("error: ")
            ));
        }
    };
    let access_key = match &args.access_key {
        Some(text) => AccessKey::from_base64(text)
            .map_err(|_| "--access-key is not valid base64 (or is empty)".to_owned())?,
        None => {
            let bytes: [u8; 32] = rand::random();
            AccessKey::from_base64(&base64::engine::general_purpose::STANDARD.encode(bytes))
                .expect("a fresh key is valid")
        }
    };
    if let Some(id) = args.resource_id.as_deref().filter(|id| !is_guid(id)) {
        return Err(format!(
            "--resource-id `{id}` is not a GUID like 0d3c0f6e-8f0a-4c2e-9a53-1f8b9d1a2b3c"
        ));
    }
    let mut config = Config::new(access_key);
    config.listen = args.listen;
    config.transport = if args.http {
        Transport::Http
    } else {
        Transport::Https {
            tls_dir: args.tls_dir,
        }
    };
    config.admin = args.admin;
    config.state_file = args.state;
    config.resource_id = args.resource_id;
    let settings = &mut config.settings;
    settings.limits.enabled = !args.no_limits;
    settings.limits.window_seconds = args.limit_window_seconds;
    for spec in &args.limits {
        let (name, value) = spec
            .split_once('=')
            .ok_or_else(|| format!("--limit `{spec}` is not OPERATION=N"))?;
        let value = value
            .parse()
            .map_err(|_| format!("--limit `{spec}`: `{value}` is not a whole number"))?;
        if !(1..=MAX_LIMIT).contains(&value) {
            return Err(format!(
                "--limit `{spec}`: a limit must be between 1 and {MAX_LIMIT} (--no-limits turns limits off)"
            ));
        }
        settings
            .limits
            .set_by_name(name, value)
            .map_err(|e| format!("--limit: {e}"))?;
    }
    settings.time_scale = match (args.minutes_are_seconds, args.time_scale) {
        (true, _) => 60.0,
        (false, Some(scale)) => scale,
        (false, None) => 1.0,
    };
    settings.faults = Faults {
        fail500: args.fail500,
        fail503: args.fail503,
        latency_ms: args.latency_ms,
        lose_answers: 0.0,
    };
    settings.validate()?;
    config.retired_api_versions = args.retired_api_versions.into_iter().collect();
    crate::validate_retired_api_versions(&config.retired_api_versions)
        .map_err(|e| format!("--retire-api-version: {e}"))?;
    config.entra.token_lifetime_seconds = args.entra_token_lifetime_seconds;
    config.entra.issuer_ca_file = args.issuer_ca;
    for spec in &args.federated_credentials {
        config.entra.federated_credentials.push(
            parse_federated_credential(spec).map_err(|e| format!("--federated-credential: {e}"))?,
        );
    }
    type Source = fn(&str) -> IssuerKeys;
    let file: Source = |path| IssuerKeys::JwksFile(path.into());
    let url: Source = |url| IssuerKeys::JwksUrl(url.to_owned());
    let sources = (args.issuer_jwks_files.iter())
        .map(|spec| ("--issuer-jwks-file", "FILE", spec, file))
        .chain((args.issuer_jwks_urls.iter()).map(|spec| ("--issuer-jwks-url", "URL", spec, url)));
    for (flag, what, spec, source) in sources {
        // An issuer URL has no `=`, so the first one ends it.
        let (issuer, keys) = spec
            .split_once('=')
            .filter(|(issuer, keys)| !issuer.is_empty() && !keys.is_empty())
            .ok_or_else(|| format!("{flag} `{spec}` is not ISSUER={what}"))?;
        config.entra.issuers.insert(issuer.to_owned(), source(keys));
    }
    config.entra.validate()?;
    Ok(Command::Run(Box::new(config)))
}

/// `tenant=…,client=…,issuer=…,subject=…[,audience=…]`.
fn parse_federated_credential(spec: &str) -> Result<FederatedCredential, String> {
    let mut fields = std::collections::BTreeMap::new();
    for part in spec.split(',') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not NAME=VALUE"))?;
        if !["tenant", "client", "issuer", "subject", "audience"].contains(&name) {
            return Err(format!(
                "unknown field `{name}` (fields: tenant, client, issuer, subject, audience)"
            ));
        }
        if fields.insert(name, value.to_owned()).is_some() {
            return Err(format!("`{name}` is given twice"));
        }
    }
    let mut take = |name: &str| {
        fields
            .remove(name)
            .ok_or_else(|| format!("`{name}=` is missing"))
    };
    Ok(FederatedCredential {
        tenant_id: take("tenant")?,
        client_id: take("client")?,
        issuer: take("issuer")?,
        subject: take("subject")?,
        audience: take("audience").unwrap_or_else(|_| TOKEN_EXCHANGE_AUDIENCE.to_owned()),
    })
}

fn is_guid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        let args = std::iter::once("acs-emulator")
            .chain(args.iter().copied())
            .map(OsString::from);
        match parse(args)? {
            Command::Run(config) => Ok(*config),
            Command::Print(text) => Err(format!("printed {text}")),
        }
    }

    #[test]
    fn the_documented_command_line_parses() {
        let config = run(&[
            "--listen",
            "127.0.0.1:8443",
            "--access-key",
            "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=",
            "--tls-dir",
            "/tmp/x",
            "--admin",
            "--no-limits",
            "--minutes-are-seconds",
            "--limit",
            "issueAccessToken=5",
        ])
        .unwrap();
        assert_eq!(config.listen.port(), 8443);
        assert_eq!(
            config.transport,
            Transport::Https {
                tls_dir: Some("/tmp/x".into())
            }
        );
        assert_eq!(
            run(&[]).unwrap().transport,
            Transport::Https { tls_dir: None },
            "no shared default directory"
        );
        assert!(config.admin);
        assert!(!config.settings.limits.enabled);
        assert_eq!(config.settings.limits.issue_access_token, 5);
        assert_eq!(config.settings.time_scale, 60.0);
        let http = run(&["--http", "--access-key", "a2V5"]).unwrap();
        assert_eq!(http.transport, Transport::Http);
        assert_eq!(http.access_key.to_base64(), "a2V5");
    }

    #[test]
    fn a_key_is_generated_when_omitted() {
        let a = run(&["--http"]).unwrap();
        let b = run(&["--http"]).unwrap();
        assert_eq!(a.access_key.bytes().len(), 32);
        assert_ne!(a.access_key, b.access_key);
    }

    #[test]
    fn bad_flags_get_one_line_errors_without_the_key() {
        for args in [
            &["--frobnicate"][..],
            &["--listen", "nowhere"],
            &["--access-key", "not base64!"],
            &["--limit", "issueAccessToken"],
            &["--limit", "bogus=1"],
            &["--fail-500", "2"],
            &["--resource-id", "xyz"],
            &["--http", "--tls-dir", "/tmp"],
            &["--limit", "issueAccessToken=0"],
            &["--limit-window-seconds", "0"],
        ] {
            let err = run(args).err().unwrap();
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(!err.contains("not base64!"), "{err}");
        }
    }

    #[test]
    fn entra_and_api_version_flags_parse() {
        let issuer = "https://127.0.0.1:6443";
        let config = run(&[
            "--federated-credential",
            &format!("tenant=t1,client=c1,issuer={issuer},subject=system:serviceaccount:ns:sa"),
            "--federated-credential",
            "tenant=t1,client=c2,issuer=https://other,subject=s,audience=api://custom",
            "--issuer-jwks-file",
            &format!("{issuer}=/tmp/jwks.json"),
            "--issuer-jwks-url",
            "https://other=https://127.0.0.1:6443/openid/v1/jwks",
            "--issuer-ca",
            "/tmp/ca.crt",
            "--entra-token-lifetime-seconds",
            "120",
            "--retire-api-version",
            "2025-03-02-preview",
        ])
        .unwrap();
        let entra = &config.entra;
        assert_eq!(entra.federated_credentials.len(), 2);
        let first = &entra.federated_credentials[0];
        assert_eq!(first.subject, "system:serviceaccount:ns:sa");
        assert_eq!(first.audience, TOKEN_EXCHANGE_AUDIENCE);
        assert_eq!(entra.federated_credentials[1].audience, "api://custom");
        assert_eq!(
            entra.issuers[issuer],
            IssuerKeys::JwksFile("/tmp/jwks.json".into())
        );
        assert_eq!(
            entra.issuers["https://other"],
            IssuerKeys::JwksUrl("https://127.0.0.1:6443/openid/v1/jwks".into())
        );
        assert_eq!(
            entra.issuer_ca_file.as_deref(),
            Some(std::path::Path::new("/tmp/ca.crt"))
        );
        assert_eq!(entra.token_lifetime_seconds, 120);
        assert!(config.retired_api_versions.contains("2025-03-02-preview"));
        for bad in [
            &["--federated-credential", "tenant=t,client=c,issuer=i"][..],
            &[
                "--federated-credential",
                "tenant=t,client=c,issuer=i,subject=s,colour=red",
            ],
            &["--issuer-jwks-file", "/tmp/jwks.json"],
            &["--issuer-jwks-url", "https://127.0.0.1:6443/openid/v1/jwks"],
            &["--retire-api-version", "2099-01-01"],
            &["--entra-token-lifetime-seconds", "0"],
        ] {
            let err = run(bad).err().unwrap();
            assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
            assert!(err.contains(bad[0]), "{err}");
        }
    }

    #[test]
    fn zero_limits_are_refused_naming_the_flag() {
        let err = run(&["--limit", "deleteIdentity=0"]).err().unwrap();
        assert!(
            err.starts_with("--limit `deleteIdentity=0`: a limit must be between 1 and"),
            "{err}"
        );
        let err = run(&["--limit-window-seconds", "0"]).err().unwrap();
        assert!(err.contains("--limit-window-seconds"), "{err}");
    }

    #[test]
    fn counts_and_durations_beyond_their_maximum_are_refused_naming_the_flag() {
        for (flag, too_big) in [
            ("--limit", "issueAccessToken=1000001"),
            ("--limit-window-seconds", "315360001"),
            ("--latency-ms", "315360000001"),
        ] {
            let err = run(&[flag, too_big]).err().unwrap();
            assert!(err.contains(flag), "{err}");
        }
        let err = run(&["--time-scale", "1e-300"]).err().unwrap();
        assert!(err.contains("timeScale"), "{err}");
        let longest = run(&[
            "--limit-window-seconds",
            "315360000",
            "--latency-ms",
            "315360000000",
            "--limit",
            "issueAccessToken=1000000",
        ]);
        assert!(longest.is_ok());
    }
}
