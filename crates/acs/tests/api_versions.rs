//! The client when the service retires the preview api-version: it falls back to the newest GA
//! version, where a create has no `customId` and there is no GET of an identity.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use acs::{AcsClient, ApiVersionPolicy, ClientOptions, Observer};
use acs_emulator::{Config, Emulator};

const KEY: &str = "dGVzdC1hY2Nlc3Mta2V5LTAxMjM0NTY3ODk=";

#[derive(Default)]
struct Seen {
    fallbacks: Mutex<Vec<(&'static str, &'static str)>>,
    orphans: AtomicUsize,
}

impl Observer for Seen {
    fn on_api_version_fallback(&self, from: &'static str, to: &'static str) {
        self.fallbacks.lock().unwrap().push((from, to));
    }
    fn on_possible_orphan(&self) {
        self.orphans.fetch_add(1, Ordering::SeqCst);
    }
}

async fn emulator(retired: &[&str]) -> Emulator {
    let mut config = Config::new(acs::AccessKey::from_base64(KEY).unwrap());
    config.admin = true;
    config.retired_api_versions = retired.iter().map(|v| v.to_string()).collect();
    acs_emulator::start(config).await.unwrap()
}

fn client(emulator: &Emulator, policy: ApiVersionPolicy, seen: Arc<Seen>) -> AcsClient {
    let connection = acs::ConnectionString::parse(&emulator.connection_string(), true).unwrap();
    let options = ClientOptions {
        allow_http: true,
        endpoint_policy: acs::EndpointPolicy::from_list("127.0.0.1").unwrap(),
        retry: acs::RetryPolicy::NEVER,
        api_version: policy,
        observer: seen,
        ..ClientOptions::default()
    };
    AcsClient::new(connection, options).unwrap()
}

async fn stats(emulator: &Emulator) -> serde_json::Value {
    let url = format!("{}/_emulator/stats", emulator.endpoint());
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn a_retired_preview_moves_the_client_to_the_newest_ga_version() {
    let emulator = emulator(&["2025-03-02-preview"]).await;
    let seen = Arc::new(Seen::default());
    let acs = client(&emulator, ApiVersionPolicy::default(), seen.clone());
    assert!(acs.creates_exactly_once());
    let scopes = vec!["chat".to_owned()];
    let created = acs
        .create_identity_with_token("uid-1", &scopes, 60)
        .await
        .unwrap();
    assert!(created.created);
    assert_eq!(acs.api_version(), "2026-09-23");
    assert!(!acs.creates_exactly_once());
    assert_eq!(
        *seen.fallbacks.lock().unwrap(),
        [("2025-03-02-preview", "2026-09-23")]
    );
    // Without customId a second create makes a second identity: no longer exactly-once.
    let again = acs
        .create_identity_with_token("uid-1", &scopes, 60)
        .await
        .unwrap();
    assert_ne!(again.id, created.id);
    assert_eq!(acs.get_identity(&created.id).await.unwrap(), None);
    acs.issue_token(&created.id, &scopes, 60).await.unwrap();
    let stats = stats(&emulator).await;
    // The refusal is counted before the body is read (the emulator names it createIdentity).
    assert_eq!(
        stats["requests"]["createIdentity"],
        serde_json::json!({ "400": 1 }),
        "{stats}"
    );
    assert_eq!(
        stats["requests"]["createIdentityWithToken"],
        serde_json::json!({ "201": 2 }),
        "{stats}"
    );
    assert_eq!(stats["requests"].get("getIdentity"), None, "{stats}");
    assert_eq!(seen.orphans.load(Ordering::SeqCst), 0);
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_get_that_meets_the_retired_preview_falls_back_without_asking_ga() {
    let emulator = emulator(&["2025-03-02-preview"]).await;
    let seen = Arc::new(Seen::default());
    let acs = client(&emulator, ApiVersionPolicy::default(), seen.clone());
    let id = "8:acs:00000000-0000-0000-0000-000000000000_00000000-0000-0000-0000-000000000001";
    // GA has no GET: nothing can be told, which is not "no such identity".
    assert_eq!(acs.get_identity(id).await.unwrap(), None);
    assert_eq!(acs.api_version(), "2026-09-23");
    let stats = stats(&emulator).await;
    assert_eq!(
        stats["requests"]["getIdentity"],
        serde_json::json!({ "400": 1 }),
        "one GET, refused for its version, and none at GA: {stats}"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_pinned_version_is_kept_whatever_the_service_answers() {
    let emulator = emulator(&["2025-03-02-preview"]).await;
    let seen = Arc::new(Seen::default());
    let pinned = ApiVersionPolicy::pinned("2025-03-02-preview").unwrap();
    let acs = client(&emulator, pinned, seen.clone());
    let refused = acs
        .create_identity_with_token("uid-1", &["chat".into()], 60)
        .await;
    assert!(
        matches!(&refused, Err(error) if error.is_unsupported_api_version()),
        "{refused:?}"
    );
    assert_eq!(acs.api_version(), "2025-03-02-preview");
    assert!(seen.fallbacks.lock().unwrap().is_empty());
    emulator.shutdown().await;
}

#[tokio::test]
async fn under_ga_a_create_whose_answer_is_lost_is_a_possible_orphan() {
    let emulator = emulator(&[]).await;
    let seen = Arc::new(Seen::default());
    let ga = ApiVersionPolicy::pinned("2026-09-23").unwrap();
    let connection = acs::ConnectionString::parse(&emulator.connection_string(), true).unwrap();
    let options = ClientOptions {
        allow_http: true,
        endpoint_policy: acs::EndpointPolicy::from_list("127.0.0.1").unwrap(),
        retry: acs::RetryPolicy::NEVER,
        request_timeout: std::time::Duration::from_millis(500),
        api_version: ga,
        observer: seen.clone(),
        ..ClientOptions::default()
    };
    let acs = AcsClient::new(connection, options).unwrap();
    let url = format!("{}/_emulator/config", emulator.endpoint());
    let faults = serde_json::json!({ "faults": { "loseAnswers": 1.0 } });
    let answer = reqwest::Client::new()
        .patch(url)
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let lost = acs
        .create_identity_with_token("uid-1", &["chat".into()], 60)
        .await;
    assert!(
        matches!(&lost, Err(error) if error.is_lost_answer()),
        "{lost:?}"
    );
    assert_eq!(seen.orphans.load(Ordering::SeqCst), 1);
    assert_eq!(stats(&emulator).await["identitiesAlive"], 1);
    emulator.shutdown().await;
}
