//! A local stand-in for the Azure Communication Services identity API, faithful enough that
//! Microsoft's own SDK runs against it unchanged (see `shared/design/acs-identity-api.md`).
//!
//! [`start`] binds, prepares TLS, and serves in the background; the returned [`Emulator`]
//! tells the bound address and the connection string. The `acs-emulator` binary is a thin
//! command line over it, and Rust tests start it in-process the same way; [`process`] starts
//! the binary as a child process instead.

mod admin;
mod api;
pub mod cli;
pub mod clock;
pub mod entra;
pub mod jwks;
pub mod jwt;
pub mod limits;
pub mod process;
mod reply;
mod server;
pub mod store;
mod tls;
pub mod tokens;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use acs::AccessKey;
use anyhow::Context as _;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use clock::{Clock, ManualClock, SystemClock};
pub use entra::{EntraConfig, FederatedCredential};
/// The key-set types [`IssuerKeys::Jwks`] and [`SigningKey::public_jwk`] speak.
pub use jsonwebtoken::jwk::{Jwk, JwkSet};
pub use jwks::IssuerKeys;
pub use limits::Limits;
pub use tokens::SigningKey;

/// The longest duration a setting or admin request may name (ten years): far beyond any
/// test, and far from where time arithmetic overflows.
pub const MAX_DURATION_SECONDS: u64 = 10 * 365 * 24 * 60 * 60;

/// Injected failures, settable at start and at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    /// Fraction (0..=1) of API requests answered 500.
    pub fail500: f64,
    /// Fraction (0..=1) of API requests answered 503.
    pub fail503: f64,
    /// Added to every API request before it is answered (at most [`Faults::MAX_LATENCY_MS`]).
    pub latency_ms: u64,
    /// Fraction (0..=1) of API requests carried out but never answered: the connection is held
    /// until the client gives up, as when an answer is lost on its way back. For testing that a
    /// create whose answer never came leaks nothing.
    #[serde(default)]
    pub lose_answers: f64,
}

impl Faults {
    pub const MAX_LATENCY_MS: u64 = MAX_DURATION_SECONDS * 1000;

    pub fn validate(&self) -> Result<(), String> {
        let fraction = |v: f64| (0.0..=1.0).contains(&v);
        if !fraction(self.lose_answers) {
            return Err("loseAnswers is a fraction between 0 and 1".into());
        }
        if !fraction(self.fail500) || !fraction(self.fail503) || self.fail500 + self.fail503 > 1.0 {
            return Err(
                "fail500 and fail503 are fractions between 0 and 1 whose sum is at most 1".into(),
            );
        }
        if self.latency_ms > Self::MAX_LATENCY_MS {
            return Err(format!(
                "faults.latencyMs must be at most {} (ten years)",
                Self::MAX_LATENCY_MS
            ));
        }
        Ok(())
    }
}

/// What can change while the emulator runs (through `PATCH /_emulator/config`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    pub limits: Limits,
    pub faults: Faults,
    /// How much faster than real time token lifetimes run: 60 makes a 60-minute token
    /// expire after 60 real seconds (`--minutes-are-seconds`).
    pub time_scale: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            faults: Faults::default(),
            time_scale: 1.0,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        self.faults.validate()?;
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err("timeScale must be a positive number".into());
        }
        // A tiny scale stretches lifetimes past what a timestamp can hold.
        let longest = self.token_lifetime_seconds(acs::wire::MAX_TOKEN_MINUTES);
        if longest.unsigned_abs() > MAX_DURATION_SECONDS {
            return Err(format!(
                "timeScale {} would make a {}-minute token last longer than ten years",
                self.time_scale,
                acs::wire::MAX_TOKEN_MINUTES
            ));
        }
        self.limits.validate()
    }

    /// The real lifetime, in whole seconds (at least 1), of a token asked for `minutes`.
    pub fn token_lifetime_seconds(&self, minutes: u32) -> i64 {
        ((f64::from(minutes) * 60.0 / self.time_scale).round() as i64).max(1)
    }
}

/// How an outage shows itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OutageMode {
    /// Every API request is answered 503.
    Unavailable,
    /// The listening socket is closed (new connections are refused) and requests arriving on
    /// open connections have their connection dropped unanswered.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outage {
    mode: OutageMode,
    until: Instant,
}

/// Plain HTTP, or HTTPS with the emulator's own CA kept in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Http,
    /// `tls_dir: None`: a fresh private directory (mode 0700) of this emulator's own, removed
    /// when it is shut down or dropped. `Some(dir)`: the CA is kept there and reused on the
    /// next start; `dir` is created with mode 0700 if missing, and refused if group or others
    /// may write it or access its `ca.key`.
    Https {
        tls_dir: Option<PathBuf>,
    },
}

/// How to start an emulator.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub access_key: AccessKey,
    pub transport: Transport,
    /// Serve the `/_emulator/` admin endpoints.
    pub admin: bool,
    pub settings: Settings,
    /// The journal keeping identities across restarts (`--state`).
    pub state_file: Option<PathBuf>,
    /// The ACS resource's GUID in identity ids and tokens; random (or the state file's) if
    /// not given.
    pub resource_id: Option<String>,
    /// The token-signing key; generated (or the state file's) if not given. Tests that start
    /// many emulators pass one key to skip the generation.
    pub signing_key: Option<SigningKey>,
    pub clock: Arc<dyn Clock>,
    /// The Entra authority's applications and trusted issuers (see [`entra`]).
    pub entra: EntraConfig,
    /// API versions refused as the service refuses a retired one (`--retire-api-version`;
    /// at runtime `PUT /_emulator/api-versions`).
    pub retired_api_versions: BTreeSet<String>,
}

impl Config {
    /// Plain HTTP on an ephemeral loopback port, documented limits, no admin endpoints.
    pub fn new(access_key: AccessKey) -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            access_key,
            transport: Transport::Http,
            admin: false,
            settings: Settings::default(),
            state_file: None,
            resource_id: None,
            signing_key: None,
            clock: Arc::new(SystemClock),
            entra: EntraConfig::default(),
            retired_api_versions: BTreeSet::new(),
        }
    }
}

/// Checks that every version in `versions` is one the service has served.
pub fn validate_retired_api_versions<'a>(
    versions: impl IntoIterator<Item = &'a String>,
) -> Result<(), String> {
    match versions
        .into_iter()
        .find(|v| !acs::wire::API_VERSIONS.contains(&v.as_str()))
    {
        Some(unknown) => Err(format!(
            "api-version '{unknown}' is not one the service serves ({})",
            acs::wire::API_VERSIONS.join(", ")
        )),
        None => Ok(()),
    }
}

/// Request and outcome counters for `GET /_emulator/stats`.
#[derive(Default)]
pub(crate) struct Stats {
    tokens_issued: std::sync::atomic::AtomicU64,
    throttled: std::sync::atomic::AtomicU64,
    /// (operation, status) → count.
    requests: Mutex<std::collections::BTreeMap<(&'static str, u16), u64>>,
}

/// State shared by every connection.
pub(crate) struct Shared {
    key: AccessKey,
    /// `http` or `https`: how clients reach this emulator (for the Entra discovery document).
    scheme: &'static str,
    resource_id: String,
    signing: SigningKey,
    clock: Arc<dyn Clock>,
    admin: bool,
    store: Mutex<store::Store>,
    windows: Mutex<limits::SlidingWindows>,
    settings: RwLock<Settings>,
    outage: watch::Sender<Option<Outage>>,
    stats: Stats,
    entra: RwLock<EntraConfig>,
    /// The Entra authority's public keys (those of `signing`).
    entra_keys: JwkSet,
    issuer_keys: jwks::KeyCache,
    retired_api_versions: RwLock<BTreeSet<String>>,
    /// Until when the Entra token endpoint answers 503.
    entra_outage: Mutex<Option<Instant>>,
}

impl Shared {
    fn settings(&self) -> Settings {
        *self.settings.read().expect("settings lock")
    }

    fn entra(&self) -> EntraConfig {
        self.entra.read().expect("entra lock").clone()
    }

    fn entra_outage_now(&self) -> bool {
        self.entra_outage
            .lock()
            .expect("entra outage lock")
            .is_some_and(|until| until > Instant::now())
    }

    fn is_retired(&self, api_version: &str) -> bool {
        self.retired_api_versions
            .read()
            .expect("api versions lock")
            .contains(api_version)
    }

    /// Counts a request under `operation` and the status it got, for the stats.
    fn count(&self, operation: &'static str, status: hyper::StatusCode) {
        *self
            .stats
            .requests
            .lock()
            .expect("stats lock")
            .entry((operation, status.as_u16()))
            .or_default() += 1;
    }

    /// The outage in force now, if any.
    fn outage_now(&self) -> Option<OutageMode> {
        self.outage
            .borrow()
            .filter(|o| o.until > Instant::now())
            .map(|o| o.mode)
    }
}

/// A running emulator. Dropping it does not stop it; call [`Emulator::shutdown`].
pub struct Emulator {
    addr: SocketAddr,
    scheme: &'static str,
    key: AccessKey,
    resource_id: String,
    ca_pem: Option<String>,
    ca_cert_path: Option<PathBuf>,
    /// Held only to be removed with the emulator.
    _fresh_tls_dir: Option<tls::PrivateTempDir>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://127.0.0.1:PORT`, without a trailing `/`.
    pub fn endpoint(&self) -> String {
        // Listening on the unspecified address serves loopback too, and clients cannot
        // connect to 0.0.0.0 / :: themselves.
        let host = match self.addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.addr.port())
            }
            ip if ip.is_unspecified() => {
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), self.addr.port())
            }
            _ => self.addr,
        };
        format!("{}://{host}", self.scheme)
    }

    /// `endpoint=…/;accesskey=…`, as the Azure portal shows it. Contains the key.
    pub fn connection_string(&self) -> String {
        format!(
            "endpoint={}/;accesskey={}",
            self.endpoint(),
            self.key.to_base64()
        )
    }

    /// The CA certificate (PEM) to trust, when serving HTTPS.
    pub fn ca_cert_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Where that CA certificate is written (`ca.crt` in the TLS directory).
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.ca_cert_path.as_deref()
    }

    /// The Entra authority (`authority` / `authority_host` for Microsoft's credentials): the
    /// emulator's own endpoint, tenants under it as under `https://login.microsoftonline.com`.
    pub fn entra_authority(&self) -> String {
        self.endpoint()
    }

    pub fn resource_id(&self) -> &str {
        &self.resource_id
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Binds, prepares TLS (writing `ca.crt` before the first connection is accepted), loads the
/// state, and serves in the background.
pub async fn start(config: Config) -> anyhow::Result<Emulator> {
    config
        .settings
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid settings: {e}"))?;
    config
        .entra
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid Entra configuration: {e}"))?;
    validate_retired_api_versions(&config.retired_api_versions).map_err(anyhow::Error::msg)?;
    let loaded = match &config.state_file {
        Some(path) => Some(store::load_state(path)?),
        None => None,
    };
    let header = loaded.as_ref().and_then(|l| l.header.as_ref());
    let resource_id = match (header, &config.resource_id) {
        (Some(h), Some(wanted)) if &h.resource_id != wanted => anyhow::bail!(
            "the state file belongs to resource {} but --resource-id {wanted} was given",
            h.resource_id
        ),
        (Some(h), _) => h.resource_id.clone(),
        (None, Some(wanted)) => wanted.clone(),
        (None, None) => random_guid(),
    };
    let signing = match (header, config.signing_key) {
        (Some(h), _) => SigningKey::from_pkcs8(
            &base64::engine::general_purpose::STANDARD
                .decode(&h.signing_key)
                .context("the state file's signing key is not base64")?,
        )?,
        (None, Some(key)) => key,
        (None, None) => tokio::task::spawn_blocking(SigningKey::generate).await??,
    };
    let store = match (&config.state_file, loaded) {
        (Some(path), Some(loaded)) => store::Store::persistent(
            path,
            &store::StateHeader {
                resource_id: resource_id.clone(),
                signing_key: base64::engine::general_purpose::STANDARD.encode(signing.pkcs8_der()),
            },
            loaded.records,
        )?,
        _ => store::Store::in_memory(),
    };
    let (tls_dir, fresh_tls_dir) = match &config.transport {
        Transport::Http => (None, None),
        Transport::Https { tls_dir: Some(dir) } => (Some(dir.clone()), None),
        Transport::Https { tls_dir: None } => {
            let fresh = tls::PrivateTempDir::create()?;
            (Some(fresh.path().to_owned()), Some(fresh))
        }
    };
    let tls = tls_dir.as_deref().map(tls::prepare).transpose()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let shared = Arc::new(Shared {
        key: config.access_key.clone(),
        scheme,
        entra_keys: entra::key_set(&signing),
        resource_id: resource_id.clone(),
        signing,
        clock: config.clock,
        admin: config.admin,
        store: Mutex::new(store),
        windows: Mutex::default(),
        settings: RwLock::new(config.settings),
        outage: watch::Sender::new(None),
        stats: Stats::default(),
        entra: RwLock::new(config.entra),
        issuer_keys: jwks::KeyCache::default(),
        retired_api_versions: RwLock::new(config.retired_api_versions),
        entra_outage: Mutex::new(None),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let acceptor = tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.config.clone()));
    let task = tokio::spawn(server::accept_loop(
        listener,
        addr,
        shared,
        acceptor,
        shutdown_rx,
    ));
    Ok(Emulator {
        addr,
        scheme,
        key: config.access_key,
        resource_id,
        ca_pem: tls.map(|t| t.ca_pem),
        ca_cert_path: tls_dir.map(|dir| dir.join("ca.crt")),
        _fresh_tls_dir: fresh_tls_dir,
        shutdown,
        task,
    })
}

/// A random (version 4) GUID, the form ACS uses for resource ids and identity suffixes.
pub fn random_guid() -> String {
    let bits = rand::random::<u128>() & !(0xf << 76) & !(0b11 << 62) | (0x4 << 76) | (0b10 << 62);
    hyphenated(&format!("{bits:032x}"))
}

/// 32 hex digits in the 8-4-4-4-12 form of a GUID.
pub(crate) fn hyphenated(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
