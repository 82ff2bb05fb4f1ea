//! What one tenant can do to the operator and to the others. Namespaces are tenants and each
//! writes its own connection string, so an ACS endpoint can be any HTTPS server a tenant runs:
//! here, servers of the test's own that misbehave in every way they can, beside an honest
//! tenant on the emulator, all served by one operator process. Then what a tenant can provoke
//! inside its namespace: two resources naming one Secret, a hand-made Secret, a quota refusing
//! the Secret, adopting an identity that is not its own.
//!
//! Every endpoint is on loopback (127.0.0.1); the one refused endpoint is 127.0.0.2.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acs_emulator::random_guid;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ResourceQuota, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::support::{
    Emulator, Operator, PROMPTLY, Setup, TempDir, TestNamespace, basic_spec, connection_secret,
    create_connection_secret, create_identity, ensure_crd, list_events, ready, ready_message,
    secret_strings, wait_condition, wait_for, wait_identity,
};
use acs_identity_operator::crd::{
    CONNECTION_SECRET_FINALIZER, CommunicationIdentity, FINALIZER, reason, secret_key,
};

/// For a failure to be reported: the client retries 5xx and timeouts a few times first.
const FAILURE_REPORTED: Duration = Duration::from_secs(60);
/// From its creation, for a resource whose endpoint never answers to show `AcsUnavailable`.
const SILENCE_REPORTED: Duration = Duration::from_secs(70);
/// The longest condition message and Event note.
const MESSAGE_LIMIT: usize = 1024;
/// The operator's peak memory with every hostile endpoint at once (975 MiB after one 400 MiB
/// body, when bodies were read whole).
const PEAK_RSS_LIMIT: u64 = 150 << 20;
/// The "endless" body: far beyond the 64 KiB the client may read, yet finite, so an operator
/// that reads it whole fails the memory check instead of exhausting the machine.
const ENDLESS_BODY_BYTES: usize = 400 << 20;
const ENDLESS_CHUNK_BYTES: usize = 64 << 10;
/// The messages of the oversized ACS error answers: one just under the 64 KiB the client reads
/// (parsed, so its echo must be cut), one of a megabyte (not even read).
const LONG_MESSAGE_BYTES: usize = 60 << 10;
const HUGE_MESSAGE_BYTES: usize = 1 << 20;
/// Seconds: about 3,000 years, beyond any timestamp (a panic on overflow, before).
const RETRY_AFTER_FOREVER: &str = "99999999999";
/// The longest wait a throttled resource may be given, whatever `Retry-After` says.
const LONGEST_THROTTLE: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);
/// How long the expired-token endpoint's requests are counted, and how many may come (an
/// operator that took an expired token for a good one asked again at once: thousands).
const EXPIRED_WINDOW: Duration = Duration::from_secs(50);
const EXPIRED_MAX_REQUESTS: u64 = 8;
/// Any well-formed key: the hostile endpoints check no signature.
const HOSTILE_KEY: &str = "aG9zdGlsZS10ZW5hbnQta2V5";

#[tokio::test]
async fn hostile_endpoints_cannot_harm_the_operator_or_an_honest_tenant() {
    ensure_crd().await;
    let emulator = Emulator::start(&[]);
    let ca = HostileCa::new();
    let trap = Trap::start().await;
    let throttling = Endpoint::serve(&ca, Behaviour::Throttle).await;
    let endless = Endpoint::serve(&ca, Behaviour::EndlessBody).await;
    let redirecting = Endpoint::serve(&ca, Behaviour::RedirectTo(trap.addr)).await;
    let silent = Endpoint::serve(&ca, Behaviour::Silent).await;
    let expired = Endpoint::serve(&ca, Behaviour::expired_tokens()).await;
    let long_bad_request = Endpoint::serve(
        &ca,
        Behaviour::HugeError(StatusCode::BAD_REQUEST, LONG_MESSAGE_BYTES),
    )
    .await;
    let huge_bad_request = Endpoint::serve(
        &ca,
        Behaviour::HugeError(StatusCode::BAD_REQUEST, HUGE_MESSAGE_BYTES),
    )
    .await;
    let server_error = Endpoint::serve(
        &ca,
        Behaviour::HugeError(StatusCode::INTERNAL_SERVER_ERROR, HUGE_MESSAGE_BYTES),
    )
    .await;

    // The operator trusts the emulator's CA and the hostile tenants' own, as it would a
    // private CA given with --acs-ca-file.
    let ca_dir = TempDir::new("hostile-ca");
    let bundle = ca_dir.path().join("ca-bundle.pem");
    let emulator_ca = std::fs::read_to_string(&emulator.ca_file).unwrap();
    std::fs::write(&bundle, format!("{emulator_ca}{}", ca.ca_pem)).unwrap();

    let ns = TestNamespace::new("hostile").await;
    let identities: Api<CommunicationIdentity> = ns.api();
    let conditions = History::start(identities.clone(), ready).await;
    let mut operator = Operator::start_with_ca_file(&ns.name, &bundle, &[]);

    let tenants = [
        ("honest", emulator.connection_string.clone()),
        (
            "not-allowed",
            hostile_connection_string("https://127.0.0.2:9"),
        ),
        ("throttling", throttling.connection_string()),
        ("endless-body", endless.connection_string()),
        ("redirecting", redirecting.connection_string()),
        ("silent", silent.connection_string()),
        ("expired-tokens", expired.connection_string()),
        ("long-bad-request", long_bad_request.connection_string()),
        ("huge-bad-request", huge_bad_request.connection_string()),
        ("huge-server-error", server_error.connection_string()),
    ];
    for (name, connection_string) in &tenants {
        add_tenant(&ns, name, connection_string).await;
    }
    let created = Instant::now();
    let expired_first_request = wait_for(
        "the expired-token endpoint's first request",
        PROMPTLY,
        || async { (expired.requests() > 0).then(Instant::now) },
    )
    .await;

    wait_condition(
        &identities,
        "honest",
        "True",
        reason::TOKEN_ISSUED,
        PROMPTLY,
    )
    .await;

    let refused = wait_failure(&identities, "not-allowed", reason::ENDPOINT_NOT_ALLOWED).await;
    let message = ready_message(&refused);
    assert!(message.contains("--acs-endpoint-suffixes"), "{message}");

    let throttled = wait_failure(&identities, "throttling", reason::THROTTLED).await;
    let next_refresh = throttled
        .status
        .as_ref()
        .and_then(|s| s.next_refresh_time.as_ref())
        .expect("a throttled resource has a nextRefreshTime")
        .0;
    let latest = jiff::Timestamp::now() + LONGEST_THROTTLE + jiff::SignedDuration::from_mins(1);
    assert!(
        next_refresh <= latest,
        "Retry-After {RETRY_AFTER_FOREVER} s was honoured: next refresh {next_refresh}"
    );

    wait_failure(&identities, "endless-body", reason::ACS_UNAVAILABLE).await;

    wait_failure(&identities, "redirecting", reason::ACS_UNAVAILABLE).await;
    assert_eq!(trap.connections(), 0, "the operator followed the redirect");

    // While the silent endpoint holds a request, a new honest resource is still served.
    wait_for("the silent endpoint's first request", PROMPTLY, || async {
        (silent.requests() > 0).then_some(())
    })
    .await;
    add_tenant(&ns, "honest-during-silence", &emulator.connection_string).await;
    wait_condition(
        &identities,
        "honest-during-silence",
        "True",
        reason::TOKEN_ISSUED,
        PROMPTLY,
    )
    .await;
    wait_condition(
        &identities,
        "silent",
        "False",
        reason::ACS_UNAVAILABLE,
        SILENCE_REPORTED.saturating_sub(created.elapsed()),
    )
    .await;

    // The reason of an answer too large to read is open (the client may refuse it for its
    // size alone); that the failure is reported, and briefly, is not.
    for (name, expected) in [
        ("long-bad-request", Some(reason::INVALID_REQUEST)),
        ("huge-bad-request", None),
        ("huge-server-error", Some(reason::ACS_UNAVAILABLE)),
    ] {
        let resource = match expected {
            Some(expected) => wait_failure(&identities, name, expected).await,
            None => {
                let failed = |r: &CommunicationIdentity| {
                    ready(r).is_some_and(|(status, _)| status == "False")
                };
                wait_identity(&identities, name, "a failure", FAILURE_REPORTED, failed).await
            }
        };
        let length = ready_message(&resource).chars().count();
        assert!(
            length <= MESSAGE_LIMIT,
            "{name}: a {length}-character message"
        );
        // The API server refuses an Event whose note is over 1 KiB: one must exist at all.
        let notes = wait_for(
            &format!("a Warning Event about {name}"),
            PROMPTLY,
            || async { Some(warning_notes(&ns, name).await).filter(|n| !n.is_empty()) },
        )
        .await;
        for note in notes {
            let length = note.chars().count();
            assert!(length <= MESSAGE_LIMIT, "{name}: a {length}-character note");
        }
    }

    // A fixed window is the measurement itself: how often an endpoint whose every token is
    // already expired gets asked again.
    tokio::time::sleep_until((expired_first_request + EXPIRED_WINDOW).into()).await;
    let requests = expired.requests();
    assert!(
        requests <= EXPIRED_MAX_REQUESTS,
        "the expired-token endpoint got {requests} requests in {EXPIRED_WINDOW:?}"
    );

    // Each hostile behaviour was met (a TLS failure would also read AcsUnavailable).
    for (name, endpoint) in [
        ("throttling", &throttling),
        ("endless-body", &endless),
        ("redirecting", &redirecting),
        ("long-bad-request", &long_bad_request),
        ("huge-bad-request", &huge_bad_request),
        ("huge-server-error", &server_error),
    ] {
        assert!(endpoint.requests() > 0, "{name}: no request reached it");
    }
    for (name, _) in &tenants[1..] {
        let seen = conditions.of(name);
        assert!(
            !seen
                .iter()
                .any(|c| c.as_ref().is_some_and(|(status, _)| status == "True")),
            "{name} was Ready=True at some point: {seen:?}"
        );
    }
    let honest = identities.get("honest").await.unwrap();
    assert_eq!(
        ready(&honest),
        Some(("True".into(), reason::TOKEN_ISSUED.into())),
        "the honest tenant at the end"
    );
    assert_eq!(operator.exit_status(), None, "the operator exited");
    assert!(
        !operator.logs().contains("panicked"),
        "the operator panicked:\n{}",
        operator.logs()
    );
    let peak = operator.peak_rss_bytes();
    eprintln!(
        "operator peak RSS {} MiB; expired-token endpoint asked {requests} times in {EXPIRED_WINDOW:?}",
        peak >> 20
    );
    assert!(
        peak < PEAK_RSS_LIMIT,
        "the operator's peak RSS was {} MiB",
        peak >> 20
    );
}

#[tokio::test]
async fn two_resources_racing_for_one_secret_name() {
    // Every ACS answer takes 2 s: both racers are between their ACS call and their Secret
    // write at once, and a Secret made by hand can appear while one waits.
    let setup = Setup::start(
        "secret-race",
        Emulator::start(&["--latency-ms", "2000"]),
        &[],
    )
    .await;
    let identities = &setup.identities;
    let secrets = History::start(setup.secrets.clone(), SecretVersion::of).await;
    let conditions = History::start(identities.clone(), ready).await;

    let racer =
        |name: &'static str| create_identity(identities, name, with_secret_name("shared-token"));
    tokio::join!(racer("racer-a"), racer("racer-b"));
    let settled = |r: &CommunicationIdentity| matches!(ready(r), Some((_, reason)) if reason == reason::TOKEN_ISSUED || reason == reason::SECRET_CONFLICT);
    let a = wait_identity(
        identities,
        "racer-a",
        "a settled race",
        FAILURE_REPORTED,
        settled,
    )
    .await;
    let b = wait_identity(
        identities,
        "racer-b",
        "a settled race",
        FAILURE_REPORTED,
        settled,
    )
    .await;
    let (winner, loser) = if ready(&a).unwrap().1 == reason::TOKEN_ISSUED {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(
        (ready(&winner), ready(&loser)),
        (
            Some(("True".into(), reason::TOKEN_ISSUED.into())),
            Some(("False".into(), reason::SECRET_CONFLICT.into()))
        ),
        "exactly one racer wins"
    );
    let winner_id = winner.status.as_ref().unwrap().identity_id.clone();
    let secret = setup.secrets.get("shared-token").await.unwrap();
    let owned = SecretVersion::of(&secret);
    assert_eq!(owned.controller, winner.uid(), "the Secret's owner");
    assert_eq!(owned.identity_id, winner_id, "the Secret's identity");
    // Once written, neither its owner nor its identity ever changed.
    let versions = secrets.of("shared-token");
    assert!(
        versions
            .iter()
            .all(|v| v.controller == owned.controller && v.identity_id == owned.identity_id),
        "winner {}, versions {versions:#?}",
        winner.name_any()
    );
    let loser_seen = conditions.of(&loser.name_any());
    assert!(
        !loser_seen
            .iter()
            .any(|c| c.as_ref().is_some_and(|(status, _)| status == "True")),
        "{loser_seen:?}"
    );

    // A Secret created by hand while the operator waits on ACS for its resource.
    create_connection_secret(
        &setup.secrets,
        "latecomer-connection",
        &setup.emulator.connection_string,
    )
    .await;
    let mut spec = with_secret_name("hand-made");
    spec["connectionSecretRef"]["name"] = json!("latecomer-connection");
    create_identity(identities, "latecomer", spec).await;
    // Both finalizers are set before the ACS call (nothing could be cleaned up otherwise), and
    // the call then takes 2 s.
    wait_for(
        "the operator to call ACS for latecomer",
        PROMPTLY,
        || async {
            let resource = identities.get("latecomer").await.unwrap();
            let connection = setup.secrets.get("latecomer-connection").await.unwrap();
            (has_finalizer(&resource, FINALIZER)
                && has_finalizer(&connection, CONNECTION_SECRET_FINALIZER))
            .then_some(())
        },
    )
    .await;
    let hand_made: Secret = serde_json::from_value(json!({
        "metadata": { "name": "hand-made" },
        "stringData": { "note": "made by hand" },
    }))
    .unwrap();
    let hand_made = setup
        .secrets
        .create(&PostParams::default(), &hand_made)
        .await
        .expect("the name is free while the operator waits on ACS");
    let original = SecretVersion::of(&hand_made);
    assert_eq!(original.owners, 0);
    wait_condition(
        identities,
        "latecomer",
        "False",
        reason::SECRET_CONFLICT,
        FAILURE_REPORTED,
    )
    .await;
    let now = SecretVersion::of(&setup.secrets.get("hand-made").await.unwrap());
    assert_eq!(now, original, "the hand-made Secret was touched");
    let versions = secrets.of("hand-made");
    assert!(versions.iter().all(|v| *v == original), "{versions:#?}");
}

#[tokio::test]
async fn a_refused_secret_write_is_a_failure_and_costs_no_tokens() {
    let setup = Setup::start("refused-write", Emulator::start(&[]), &[]).await;
    let quotas: Api<ResourceQuota> = setup.ns.api();
    let present = setup
        .secrets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len()
        .to_string();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": { "name": "no-more-secrets" },
        "spec": { "hard": { "count/secrets": present } },
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // The local control plane runs no quota controller: the test records the usage it would
    // have computed, which the API server's quota admission reads.
    let usage = json!({ "count/secrets": present });
    quotas
        .patch_status(
            "no-more-secrets",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "hard": usage, "used": usage } })),
        )
        .await
        .unwrap();
    wait_for("the API server to enforce the quota", PROMPTLY, || async {
        let probe = connection_secret("quota-probe", "unused");
        match setup.secrets.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("exceeded quota") => {
                Some(())
            }
            Err(e) => panic!("creating a probe Secret: {e}"),
            // Admission has not seen the quota yet.
            Ok(_) => {
                let _ = setup
                    .secrets
                    .delete("quota-probe", &DeleteParams::default())
                    .await;
                None
            }
        }
    })
    .await;

    create_identity(&setup.identities, "refused", basic_spec()).await;
    let refused = wait_failure(&setup.identities, "refused", reason::SECRET_WRITE_FAILED).await;
    let message = ready_message(&refused);
    assert!(
        message.contains("exceeded quota: no-more-secrets"),
        "the API server's refusal is quoted: {message}"
    );
    assert_eq!(tokens_issued(&setup).await, 1, "the first token");
    // The contract is about a stretch of time: retrying the write never asks for a new token.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(30) {
        assert_eq!(
            tokens_issued(&setup).await,
            1,
            "a token was issued again after {:?} of refused writes",
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    quotas
        .delete("no-more-secrets", &DeleteParams::default())
        .await
        .unwrap();
    // Failures the user must fix are retried every minute at the latest.
    let ready_now = wait_condition(
        &setup.identities,
        "refused",
        "True",
        reason::TOKEN_ISSUED,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(tokens_issued(&setup).await, 1, "the held token was written");
    let data = secret_strings(&setup.secrets.get("refused-acs-token").await.unwrap());
    assert_eq!(
        Some(&data[secret_key::IDENTITY_ID]),
        ready_now.status.as_ref().unwrap().identity_id.as_ref()
    );
}

#[tokio::test]
async fn adoption_is_checked() {
    let setup = Setup::start("adoption", Emulator::start(&[]), &[]).await;
    let identities = &setup.identities;
    create_identity(identities, "original", basic_spec()).await;
    let original = setup.wait_ready("original").await;
    let taken = original.status.unwrap().identity_id.unwrap();
    let issued = tokens_issued(&setup).await;

    let adopting = |id: &str| {
        let mut spec = basic_spec();
        spec["identityId"] = json!(id);
        spec
    };
    create_identity(identities, "impostor", adopting(&taken)).await;
    wait_failure(identities, "impostor", reason::IDENTITY_IN_USE).await;
    assert_eq!(
        tokens_issued(&setup).await,
        issued,
        "a token for the impostor"
    );

    // The emulator's shape, `8:acs:<resource>_<guid>`, with a guid it never minted.
    let (acs_resource, _) = taken
        .strip_prefix("8:acs:")
        .and_then(|rest| rest.split_once('_'))
        .expect("an emulator identity id");
    let ghost_id = format!("8:acs:{acs_resource}_{}", random_guid());
    create_identity(identities, "ghost", adopting(&ghost_id)).await;
    wait_failure(identities, "ghost", reason::IDENTITY_NOT_FOUND).await;
    assert_eq!(tokens_issued(&setup).await, issued, "a token for the ghost");

    let data = secret_strings(&setup.secrets.get("original-acs-token").await.unwrap());
    assert_eq!(data[secret_key::IDENTITY_ID], taken);
    assert_eq!(
        ready(&identities.get("original").await.unwrap()),
        Some(("True".into(), reason::TOKEN_ISSUED.into()))
    );
}

// --- Tenants and their resources ---

/// A connection Secret `<name>-connection` and a CommunicationIdentity `name` using it.
async fn add_tenant(ns: &TestNamespace, name: &str, connection_string: &str) {
    let connection = format!("{name}-connection");
    create_connection_secret(&ns.api(), &connection, connection_string).await;
    let mut spec = basic_spec();
    spec["connectionSecretRef"]["name"] = json!(connection);
    create_identity(&ns.api(), name, spec).await;
}

fn hostile_connection_string(endpoint: &str) -> String {
    format!("endpoint={endpoint}/;accesskey={HOSTILE_KEY}")
}

fn with_secret_name(secret_name: &str) -> Value {
    let mut spec = basic_spec();
    spec["secretName"] = json!(secret_name);
    spec
}

fn has_finalizer(object: &impl kube::Resource, finalizer: &str) -> bool {
    object.finalizers().iter().any(|f| f == finalizer)
}

/// Waits until a resource that never got a token reports `reason`.
async fn wait_failure(
    identities: &Api<CommunicationIdentity>,
    name: &str,
    reason: &str,
) -> CommunicationIdentity {
    wait_condition(identities, name, "False", reason, FAILURE_REPORTED).await
}

/// The notes of the Warning Events about the resource `name`.
async fn warning_notes(ns: &TestNamespace, name: &str) -> Vec<String> {
    list_events(&ns.client, &ns.name)
        .await
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

async fn tokens_issued(setup: &Setup) -> u64 {
    let stats = setup.emulator.stats().await;
    stats["tokensIssued"]
        .as_u64()
        .unwrap_or_else(|| panic!("{stats}"))
}

// --- What the API server showed ---

/// What matters of one version of a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SecretVersion {
    /// The uid of its controller ownerReference.
    controller: Option<String>,
    owners: usize,
    identity_id: Option<String>,
    data: BTreeMap<String, String>,
}

impl SecretVersion {
    fn of(secret: &Secret) -> Self {
        let owners = secret.owner_references();
        let data = secret_strings(secret);
        Self {
            controller: owners
                .iter()
                .find(|o| o.controller == Some(true))
                .map(|o| o.uid.clone()),
            owners: owners.len(),
            identity_id: data.get(secret_key::IDENTITY_ID).cloned(),
            data,
        }
    }
}

/// Every version of the objects of one kind in a namespace from now until dropped, as
/// `summary` describes them: a watch sees each change, where polling could miss one.
struct History<T> {
    seen: Arc<Mutex<Vec<(String, T)>>>,
    _watch: AbortOnDrop,
}

impl<T: Clone + Send + 'static> History<T> {
    async fn start<K>(api: Api<K>, summary: impl Fn(&K) -> T + Send + 'static) -> Self
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (listed, on_listed) = tokio::sync::oneshot::channel();
        let record = seen.clone();
        let watch = tokio::spawn(async move {
            let mut listed = Some(listed);
            let mut events =
                std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                        let entry = (object.name_any(), summary(&object));
                        record.lock().unwrap().push(entry);
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(listed) = listed.take() {
                            let _ = listed.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(PROMPTLY, on_listed)
            .await
            .expect("the watch starts")
            .unwrap();
        Self {
            seen,
            _watch: AbortOnDrop(watch),
        }
    }

    /// Every version of `name` seen so far, oldest first.
    fn of(&self, name: &str) -> Vec<T> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .collect()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// --- The hostile server ---

/// A CA of the tenant's own and a certificate for 127.0.0.1 signed by it: an endpoint the
/// operator trusts, run by someone it should not.
struct HostileCa {
    ca_pem: String,
    tls: Arc<ServerConfig>,
}

impl HostileCa {
    fn new() -> Self {
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "hostile tenant CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "hostile tenant");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            ca_pem: ca_cert.pem(),
            tls: Arc::new(config),
        }
    }
}

/// One misbehaviour. Each is served on a port of its own: the client sends every request to
/// the same few paths, so the port is what tells the tenants apart.
enum Behaviour {
    /// 429 with a `Retry-After` beyond any timestamp.
    Throttle,
    /// 200 with a body that never ends (see `ENDLESS_BODY_BYTES`).
    EndlessBody,
    /// 307 to a plain-http address.
    RedirectTo(SocketAddr),
    /// Takes the request and never answers.
    Silent,
    /// Well-formed answers, like the real API's, whose tokens have already expired.
    ExpiredTokens { identity_id: String },
    /// An ACS error answer whose message has this many bytes.
    HugeError(StatusCode, usize),
}

type Body = BoxBody<Bytes, Infallible>;

impl Behaviour {
    fn expired_tokens() -> Self {
        Self::ExpiredTokens {
            identity_id: format!("8:acs:{}_{}", random_guid(), random_guid()),
        }
    }

    async fn answer(&self, request: &Request<Incoming>) -> Response<Body> {
        match self {
            Self::Throttle => {
                let mut response = json_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    &error_body("TooManyRequests", "Come back later."),
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, RETRY_AFTER_FOREVER.parse().unwrap());
                response
            }
            Self::EndlessBody => {
                let chunk = Bytes::from(vec![b'a'; ENDLESS_CHUNK_BYTES]);
                let chunks =
                    std::iter::once(Bytes::from_static(b"{\"identity\":{\"id\":\"")).chain(
                        std::iter::repeat_n(chunk, ENDLESS_BODY_BYTES / ENDLESS_CHUNK_BYTES),
                    );
                // No Content-Length: the client learns the size only by reading.
                let body = StreamBody::new(
                    futures::stream::iter(chunks).map(|c| Ok::<_, Infallible>(Frame::data(c))),
                );
                Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, "application/json")
                    .body(BodyExt::boxed(body))
                    .unwrap()
            }
            Self::RedirectTo(trap) => {
                let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header(LOCATION, format!("http://{trap}{path}"))
                    .body(empty())
                    .unwrap()
            }
            Self::Silent => std::future::pending().await,
            Self::ExpiredTokens { identity_id } => {
                let token = json!({
                    "token": format!("eyJhbGciOiJSUzI1NiJ9.{}.{}", random_guid(), random_guid()),
                    "expiresOn": format!("{:.0}", jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)),
                });
                let path = request.uri().path();
                match *request.method() {
                    Method::POST if path == "/identities" => json_response(
                        StatusCode::CREATED,
                        &json!({ "identity": { "id": identity_id }, "accessToken": token }),
                    ),
                    Method::POST if path.ends_with("/:issueAccessToken") => {
                        json_response(StatusCode::OK, &token)
                    }
                    Method::POST if path.ends_with("/:revokeAccessTokens") => {
                        empty_response(StatusCode::NO_CONTENT)
                    }
                    Method::DELETE => empty_response(StatusCode::NO_CONTENT),
                    _ => json_response(
                        StatusCode::NOT_FOUND,
                        &error_body("NotFound", "No such operation."),
                    ),
                }
            }
            Self::HugeError(status, bytes) => {
                let message = "This message goes on and on. ".repeat(bytes / 29);
                let code = status
                    .canonical_reason()
                    .unwrap_or("Error")
                    .replace(' ', "");
                json_response(*status, &error_body(&code, &message))
            }
        }
    }
}

fn error_body(code: &str, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message } })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn empty_response(status: StatusCode) -> Response<Body> {
    Response::builder().status(status).body(empty()).unwrap()
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

/// An HTTPS listener on 127.0.0.1 answering with one `Behaviour` and counting requests; it
/// and its connections stop when dropped.
struct Endpoint {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    _server: AbortOnDrop,
}

impl Endpoint {
    async fn serve(ca: &HostileCa, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(ca.tls.clone());
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let behaviour = Arc::new(behaviour);
        let server = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let (acceptor, counter, behaviour) =
                    (acceptor.clone(), counter.clone(), behaviour.clone());
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let behaviour = behaviour.clone();
                        async move { Ok::<_, Infallible>(behaviour.answer(&request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            _server: AbortOnDrop(server),
        }
    }

    fn connection_string(&self) -> String {
        hostile_connection_string(&format!("https://{}", self.addr))
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A plain-http listener on 127.0.0.1 that only counts the connections it gets: where a
/// hostile redirect points, and where the operator must never go.
struct Trap {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    _server: AbortOnDrop,
}

impl Trap {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let counter = connections.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self {
            addr,
            connections,
            _server: AbortOnDrop(server),
        }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}
