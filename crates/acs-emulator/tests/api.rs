//! The emulator served in-process and driven over loopback with signed requests.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use acs::AccessKey;
use acs::wire::{AccessToken, CreateIdentityResponse, ErrorResponse, IdentityDetails};
use acs_emulator::{Clock, Config, Emulator, ManualClock, SigningKey, Transport};
use base64::Engine as _;
use jiff::Timestamp;
use serde_json::{Value, json};

const KEY: &str = "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=";
const V: &str = "api-version=2023-10-01";
const PREVIEW: &str = "api-version=2025-03-02-preview";

/// One RSA key for every emulator of this test binary: generating one costs ~100 ms.
fn signing_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap()).clone()
}

fn config() -> Config {
    let mut config = Config::new(AccessKey::from_base64(KEY).unwrap());
    config.admin = true;
    config.signing_key = Some(signing_key());
    config
}

/// Starts `config` with a manual clock and returns a client signing with that clock's time.
async fn start_manual(mut config: Config) -> (Emulator, Client, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(Timestamp::now()));
    config.clock = clock.clone();
    let emulator = acs_emulator::start(config).await.unwrap();
    let client = Client::new(&emulator, clock.clone());
    (emulator, client, clock)
}

async fn start(config: Config) -> (Emulator, Client) {
    let emulator = acs_emulator::start(config).await.unwrap();
    let client = Client::new(&emulator, Arc::new(acs_emulator::SystemClock));
    (emulator, client)
}

struct Client {
    http: reqwest::Client,
    endpoint: String,
    key: AccessKey,
    clock: Arc<dyn Clock>,
}

impl Client {
    fn new(emulator: &Emulator, clock: Arc<dyn Clock>) -> Self {
        Self {
            http: reqwest::Client::new(),
            endpoint: emulator.endpoint(),
            key: AccessKey::from_base64(KEY).unwrap(),
            clock,
        }
    }

    fn host(&self) -> &str {
        self.endpoint.split_once("://").unwrap().1
    }

    /// A request signed over `signed_body` at `date`, sending `body`.
    async fn raw(
        &self,
        key: &AccessKey,
        method: &str,
        target: &str,
        date: Timestamp,
        signed_body: &[u8],
        body: &[u8],
    ) -> reqwest::Response {
        let date = acs::signing::http_date(date);
        let signed =
            acs::signing::sign_request(key, method, target, self.host(), &date, signed_body);
        self.http
            .request(
                method.parse().unwrap(),
                format!("{}{target}", self.endpoint),
            )
            .header("x-ms-date", signed.date)
            .header("x-ms-content-sha256", signed.content_hash)
            .header("authorization", signed.authorization)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    async fn send(&self, method: &str, target: &str, body: &str) -> reqwest::Response {
        let now = self.clock.now();
        self.raw(
            &self.key,
            method,
            target,
            now,
            body.as_bytes(),
            body.as_bytes(),
        )
        .await
    }

    async fn create(&self, body: &str) -> CreateIdentityResponse {
        let response = self.send("POST", &format!("/identities?{V}"), body).await;
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    async fn issue(&self, id: &str, minutes: u32) -> reqwest::Response {
        let body = json!({"scopes": ["chat", "voip"], "expiresInMinutes": minutes}).to_string();
        self.send(
            "POST",
            &format!("/identities/{}/:issueAccessToken?{V}", encode(id)),
            &body,
        )
        .await
    }

    /// `PATCH /_emulator/config` with these faults (a subset of the fields).
    async fn set_faults(&self, faults: Value) {
        self.admin("PATCH", "config", Some(json!({ "faults": faults })))
            .await;
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let response = self.admin_response(method, path, body).await;
        assert_eq!(response.status(), 200, "{method} {path}");
        response.json().await.unwrap()
    }

    async fn admin_response(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self.http.request(
            method.parse().unwrap(),
            format!("{}/_emulator/{path}", self.endpoint),
        );
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    }

    /// An admin request that must be refused with 400; returns the error message.
    async fn admin_refused(&self, method: &str, path: &str, body: Value) -> String {
        let response = self.admin_response(method, path, Some(body)).await;
        assert_eq!(response.status(), 400, "{method} {path}");
        error_of(response).await.error.message
    }

    async fn validate(&self, token: &str) -> Value {
        self.admin("POST", "validate", Some(json!({ "token": token })))
            .await
    }
}

/// As the sync SDK sends ids.
fn encode(id: &str) -> String {
    id.replace(':', "%3A")
}

async fn error_of(response: reqwest::Response) -> ErrorResponse {
    response.json().await.unwrap()
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    assert!(
        !payload.contains(['-', '_']),
        "the Python SDK could not decode {payload}"
    );
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

fn expires_on_second(token: &AccessToken) -> i64 {
    acs::wire::parse_expires_on(&token.expires_on)
        .unwrap()
        .as_second()
}

#[tokio::test]
async fn the_quickstart_flow_with_exact_status_codes() {
    let (emulator, client) = start(config()).await;
    // The SDK's create_user: Content-Type application/json and Content-Length 0.
    let bare = client.create("").await;
    assert!(bare.access_token.is_none());
    let prefix = format!("8:acs:{}_", emulator.resource_id());
    assert!(
        bare.identity.id.starts_with(&prefix),
        "{}",
        bare.identity.id
    );
    assert!(client.create("{}").await.access_token.is_none());

    let with_token = client
        .create(r#"{"createTokenWithScopes": ["chat", "voip"], "expiresInMinutes": 60}"#)
        .await;
    let token = with_token.access_token.unwrap();
    let c = claims(&token.token);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    assert_eq!(c["exp"].as_i64().unwrap(), expires_on_second(&token));
    assert_eq!(c["acsScope"], "chat,voip");
    assert_eq!(
        c["skypeid"],
        with_token.identity.id.strip_prefix("8:").unwrap()
    );
    assert_eq!(c["resourceId"], emulator.resource_id());
    assert_eq!(c["csi"], c["iat"].to_string());
    // Seven fractional digits and +00:00, as the service writes it.
    assert!(token.expires_on.ends_with("+00:00"), "{}", token.expires_on);
    assert_eq!(token.expires_on.split('.').nth(1).unwrap().len(), 7 + 6);

    // The default lifetime is 24 h.
    let id = bare.identity.id;
    let response = client
        .send(
            "POST",
            &format!("/identities/{}/:issueAccessToken?{V}", encode(&id)),
            r#"{"scopes": ["voip"]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    let day: AccessToken = response.json().await.unwrap();
    let c = claims(&day.token);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        86_400
    );
    assert_eq!(client.validate(&day.token).await["status"], "valid");

    let revoke = format!("/identities/{}/:revokeAccessTokens?{V}", encode(&id));
    let response = client.send("POST", &revoke, "").await;
    assert_eq!(response.status(), 204);
    assert_eq!(client.validate(&day.token).await["status"], "revoked");
    // A token issued right after the revoke (same second) is valid.
    let fresh: AccessToken = client.issue(&id, 60).await.json().await.unwrap();
    assert_eq!(client.validate(&fresh.token).await["valid"], true);

    let delete = format!("/identities/{}?{V}", encode(&id));
    assert_eq!(client.send("DELETE", &delete, "").await.status(), 204);
    assert_eq!(client.validate(&fresh.token).await["status"], "deleted");
    // A retried delete succeeds again; everything else about the identity is gone.
    assert_eq!(client.send("DELETE", &delete, "").await.status(), 204);
    let refused = client.issue(&id, 60).await;
    assert_eq!(refused.status(), 404);
    assert_eq!(error_of(refused).await.error.code, "IdentityNotFound");
    assert_eq!(client.send("POST", &revoke, "").await.status(), 404);
    let never = format!("/identities/{}?{V}", encode(&format!("{prefix}nope")));
    assert_eq!(client.send("DELETE", &never, "").await.status(), 404);

    let stats = client.admin("GET", "stats", None).await;
    assert_eq!(stats["identitiesAlive"], 2);
    assert_eq!(stats["identitiesDeleted"], 1);
    assert_eq!(stats["tokensIssued"], 3);
    assert_eq!(stats["requests"]["createIdentity"]["201"], 2);
    assert_eq!(stats["requests"]["createIdentityWithToken"]["201"], 1);
    assert_eq!(stats["requests"]["issueAccessToken"]["404"], 1);
    assert_eq!(stats["requests"]["deleteIdentity"]["204"], 2);
    emulator.shutdown().await;
}

#[tokio::test]
async fn percent_encoded_and_raw_ids_both_verify() {
    let (emulator, client) = start(config()).await;
    let id = client.create("").await.identity.id;
    let body = r#"{"scopes": ["chat"], "expiresInMinutes": 60}"#;
    for target in [
        format!("/identities/{}/:issueAccessToken?{V}", encode(&id)),
        format!("/identities/{id}/:issueAccessToken?{V}"),
    ] {
        let response = client.send("POST", &target, body).await;
        assert_eq!(response.status(), 200, "{target}");
    }
    emulator.shutdown().await;
}

#[tokio::test]
async fn authentication_failures_are_401_with_the_service_messages() {
    let (emulator, client) = start(config()).await;
    let target = format!("/identities?{V}");
    let now = Timestamp::now();

    let wrong = AccessKey::from_base64("d3Jvbmcta2V5").unwrap();
    let response = client.raw(&wrong, "POST", &target, now, b"", b"").await;
    assert_eq!(response.status(), 401);
    let error = error_of(response).await.error;
    assert_eq!(
        (error.code.as_str(), error.message.as_str()),
        ("Denied", "Denied by the resource provider.")
    );

    let tampered = client
        .raw(
            &client.key,
            "POST",
            &target,
            now,
            b"{}",
            br#"{"customId":"x"}"#,
        )
        .await;
    assert_eq!(tampered.status(), 401);
    assert_eq!(
        error_of(tampered).await.error.message,
        "Request 'x-ms-content-sha256' differs from generated content hash."
    );

    let late = now - jiff::SignedDuration::from_mins(16);
    assert_eq!(
        client
            .raw(&client.key, "POST", &target, late, b"", b"")
            .await
            .status(),
        401
    );
    let early = now + jiff::SignedDuration::from_mins(16);
    assert_eq!(
        client
            .raw(&client.key, "POST", &target, early, b"", b"")
            .await
            .status(),
        401
    );
    let within = now - jiff::SignedDuration::from_mins(14);
    assert_eq!(
        client
            .raw(&client.key, "POST", &target, within, b"", b"")
            .await
            .status(),
        201
    );

    // Signed for one target, sent to another.
    let date = acs::signing::http_date(now);
    let signed = acs::signing::sign_request(
        &client.key,
        "POST",
        "/identities?api-version=2025-06-30",
        client.host(),
        &date,
        b"",
    );
    let moved = client
        .http
        .post(format!("{}{target}", client.endpoint))
        .header("x-ms-date", signed.date)
        .header("x-ms-content-sha256", signed.content_hash)
        .header("authorization", signed.authorization)
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), 401);
    let unsigned = client
        .http
        .post(format!("{}{target}", client.endpoint))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    assert_eq!(error_of(unsigned).await.error.code, "Denied");
    emulator.shutdown().await;
}

#[tokio::test]
async fn api_versions_and_bad_input_are_400_without_retry_after() {
    let (emulator, client) = start(config()).await;
    for version in [
        "2025-06-30",
        "2026-09-23",
        "2025-03-02-preview",
        "2021-03-07",
    ] {
        let response = client
            .send("POST", &format!("/identities?api-version={version}"), "")
            .await;
        assert_eq!(response.status(), 201, "{version}");
    }
    let unknown = client
        .send("POST", "/identities?api-version=2099-01-01", "")
        .await;
    assert_eq!(unknown.status(), 400);
    assert_eq!(error_of(unknown).await.error.code, "UnsupportedApiVersion");
    let missing = client.send("POST", "/identities", "").await;
    assert_eq!(missing.status(), 400);

    let id = client.create("").await.identity.id;
    for minutes in [30, 59, 1441] {
        let response = client.issue(&id, minutes).await;
        assert_eq!(response.status(), 400, "{minutes}");
        assert!(response.headers().get("retry-after").is_none());
        assert_eq!(error_of(response).await.error.code, "ValidationError");
    }
    for body in [
        r#"{"scopes": ["admin"]}"#,
        r#"{"scopes": []}"#,
        r#"{"scopes": ["chat"], "expiresInMinutes": -5}"#,
        "not json",
    ] {
        let target = format!("/identities/{}/:issueAccessToken?{V}", encode(&id));
        assert_eq!(
            client.send("POST", &target, body).await.status(),
            400,
            "{body}"
        );
    }
    let unknown_route = client
        .send("POST", &format!("/teamsUser/:exchangeAccessToken?{V}"), "")
        .await;
    assert_eq!(unknown_route.status(), 404);
    assert!(error_of(unknown_route).await.error.message.len() > 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_1001st_issue_in_a_window_gets_429_with_retry_after() {
    let (emulator, client, clock) = start_manual(config()).await;
    let id = client.create("").await.identity.id;
    let body = r#"{"scopes": ["voip"], "expiresInMinutes": 60}"#;
    let target = format!("/identities/{}/:issueAccessToken?{V}", encode(&id));
    for _ in 0..1000 {
        assert_eq!(client.send("POST", &target, body).await.status(), 200);
    }
    clock.advance(Duration::from_secs(10));
    let refused = client.send("POST", &target, body).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "20");
    assert_eq!(error_of(refused).await.error.code, "TooManyRequests");
    // Other operations have their own budgets.
    client.create("").await;
    clock.advance(Duration::from_secs(20));
    assert_eq!(client.send("POST", &target, body).await.status(), 200);
    let stats = client.admin("GET", "stats", None).await;
    assert_eq!(stats["throttled"], 1);
    assert_eq!(stats["requests"]["issueAccessToken"]["429"], 1);

    // Limits can be lowered at runtime, and turned off.
    client
        .admin(
            "PATCH",
            "config",
            Some(json!({"limits": {"revokeAccessTokens": 2, "windowSeconds": 5}})),
        )
        .await;
    let revoke = format!("/identities/{}/:revokeAccessTokens?{V}", encode(&id));
    assert_eq!(client.send("POST", &revoke, "").await.status(), 204);
    assert_eq!(client.send("POST", &revoke, "").await.status(), 204);
    let refused = client.send("POST", &revoke, "").await;
    assert_eq!(refused.headers()["retry-after"], "5");
    client
        .admin(
            "PATCH",
            "config",
            Some(json!({"limits": {"enabled": false}})),
        )
        .await;
    assert_eq!(client.send("POST", &revoke, "").await.status(), 204);
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_zero_limit_is_refused_at_runtime_and_the_limits_keep_working() {
    let (emulator, client) = start(config()).await;
    let before = client.admin("GET", "config", None).await;
    let message = client
        .admin_refused(
            "PATCH",
            "config",
            json!({"limits": {"issueAccessToken": 0}}),
        )
        .await;
    assert!(
        message.contains("limits.issueAccessToken must be between 1 and"),
        "{message}"
    );
    assert_eq!(client.admin("GET", "config", None).await, before);
    // A poisoned windows lock would fail every limited request from here on.
    let id = client.create("").await.identity.id;
    for _ in 0..2 {
        assert_eq!(client.issue(&id, 60).await.status(), 200);
    }
    emulator.shutdown().await;
}

#[tokio::test]
async fn admin_durations_and_counts_beyond_ten_years_are_400_not_a_panic() {
    let (emulator, client) = start(config()).await;
    let before = client.admin("GET", "config", None).await;
    for seconds in [json!(1e30), json!(315_360_001), json!(0), json!(-5)] {
        let message = client
            .admin_refused(
                "POST",
                "outage",
                json!({"mode": "unavailable", "seconds": seconds}),
            )
            .await;
        assert!(
            message.contains("seconds must be a positive number of at most 315360000"),
            "{message}"
        );
    }
    for (patch, field) in [
        (
            json!({"limits": {"windowSeconds": u64::MAX}}),
            "limits.windowSeconds",
        ),
        (
            json!({"limits": {"deleteIdentity": u32::MAX}}),
            "limits.deleteIdentity",
        ),
        (
            json!({"faults": {"latencyMs": u64::MAX}}),
            "faults.latencyMs",
        ),
        (json!({"timeScale": 1e-300}), "timeScale"),
    ] {
        let message = client.admin_refused("PATCH", "config", patch).await;
        assert!(message.starts_with(field), "{message}");
    }
    assert_eq!(client.admin("GET", "config", None).await, before);
    // The server is unharmed, and the longest outage is accepted.
    client.create("").await;
    let longest = client
        .admin(
            "POST",
            "outage",
            Some(json!({"mode": "unavailable", "seconds": 315_360_000})),
        )
        .await;
    assert_eq!(longest["outage"]["mode"], "unavailable");
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_token_expiring_past_the_last_timestamp_is_a_500_not_a_panic() {
    let (emulator, client, clock) = start_manual(config()).await;
    let id = client.create("").await.identity.id;
    clock.set(Timestamp::MAX - jiff::SignedDuration::from_hours(1));
    let response = client.issue(&id, 1440).await;
    assert_eq!(response.status(), 500);
    emulator.shutdown().await;
}

#[tokio::test]
async fn bodies_past_64_kib_are_413_for_admin_and_api_requests() {
    let (emulator, client) = start(config()).await;
    let before = client.admin("GET", "config", None).await;
    let padding = "x".repeat(65 * 1024);
    for (method, path, body) in [
        ("POST", "validate", json!({ "token": padding })),
        (
            "PATCH",
            "config",
            json!({ "timeScale": 2, "padding": padding }),
        ),
    ] {
        let response = client.admin_response(method, path, Some(body)).await;
        assert_eq!(response.status(), 413, "{method} {path}");
    }
    assert_eq!(client.admin("GET", "config", None).await, before);
    let id = client.create("").await.identity.id;
    let body = json!({"scopes": ["chat"], "padding": padding}).to_string();
    let response = client
        .send(
            "POST",
            &format!("/identities/{}/:issueAccessToken?{V}", encode(&id)),
            &body,
        )
        .await;
    assert_eq!(response.status(), 413);
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_custom_id_makes_create_idempotent_in_the_preview() {
    let (emulator, client) = start(config()).await;
    let target = format!("/identities?{PREVIEW}");
    let body =
        r#"{"customId": "alice", "createTokenWithScopes": ["chat"], "expiresInMinutes": 60}"#;
    let first = client.send("POST", &target, body).await;
    assert_eq!(first.status(), 201);
    let first: CreateIdentityResponse = first.json().await.unwrap();
    let again = client.send("POST", &target, body).await;
    assert_eq!(again.status(), 200);
    let again: CreateIdentityResponse = again.json().await.unwrap();
    assert_eq!(again.identity, first.identity);
    assert!(again.access_token.is_some());
    // A different customId, or a version without customIds, makes a new identity.
    let bob: CreateIdentityResponse = client
        .send("POST", &target, r#"{"customId": "bob"}"#)
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(bob.identity, first.identity);
    let old = client
        .send(
            "POST",
            &format!("/identities?{V}"),
            r#"{"customId": "alice"}"#,
        )
        .await;
    assert_eq!(old.status(), 201);

    let id = first.identity.id;
    let get = format!("/identities/{}?{PREVIEW}", encode(&id));
    let details: IdentityDetails = client.send("GET", &get, "").await.json().await.unwrap();
    assert_eq!(details.id, id);
    assert_eq!(details.custom_id.as_deref(), Some("alice"));
    assert!(details.last_token_issued_at.is_some());
    let raw_get = format!("/identities/{id}?{PREVIEW}");
    assert_eq!(client.send("GET", &raw_get, "").await.status(), 200);
    assert_eq!(
        client
            .send("GET", &format!("/identities/{}?{V}", encode(&id)), "")
            .await
            .status(),
        404
    );

    // Deleting frees the customId: the next create makes a new identity.
    assert_eq!(client.send("DELETE", &get, "").await.status(), 204);
    assert_eq!(client.send("GET", &get, "").await.status(), 404);
    let reborn = client
        .send("POST", &target, r#"{"customId": "alice"}"#)
        .await;
    assert_eq!(reborn.status(), 201);
    let reborn: CreateIdentityResponse = reborn.json().await.unwrap();
    assert_ne!(reborn.identity.id, id);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_time_scale_shortens_real_lifetimes() {
    let mut cfg = config();
    cfg.settings.time_scale = 60.0;
    let (emulator, client, clock) = start_manual(cfg).await;
    let id = client.create("").await.identity.id;
    let before = clock.now();
    let token: AccessToken = client.issue(&id, 60).await.json().await.unwrap();
    let c = claims(&token.token);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 60);
    assert_eq!(c["exp"].as_i64().unwrap(), expires_on_second(&token));
    let expires = acs::wire::parse_expires_on(&token.expires_on).unwrap();
    // expiresOn has 100 ns resolution.
    let lifetime = expires.duration_since(before);
    assert!(
        lifetime <= jiff::SignedDuration::from_secs(60),
        "{lifetime:?}"
    );
    assert!(lifetime > jiff::SignedDuration::from_secs(60) - jiff::SignedDuration::from_nanos(100));
    assert_eq!(client.validate(&token.token).await["status"], "valid");
    clock.advance(Duration::from_secs(59));
    assert_eq!(client.validate(&token.token).await["status"], "valid");
    clock.advance(Duration::from_secs(1));
    assert_eq!(client.validate(&token.token).await["status"], "expired");

    // 24 h at 60x is 24 min; the scale can change at runtime.
    client
        .admin("PATCH", "config", Some(json!({"timeScale": 3600})))
        .await;
    let token: AccessToken = client.issue(&id, 1440).await.json().await.unwrap();
    let c = claims(&token.token);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 24);
    emulator.shutdown().await;
}

#[tokio::test]
async fn validation_rejects_foreign_and_malformed_tokens() {
    let (emulator, client) = start(config()).await;
    assert_eq!(client.validate("abc").await["status"], "malformed");
    let id = client.create("").await.identity.id;
    let token: AccessToken = client.issue(&id, 60).await.json().await.unwrap();
    let parts: Vec<&str> = token.token.split('.').collect();
    let forged_claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&json!({"skypeid": "acs:x", "exp": 9_999_999_999_i64})).unwrap(),
    );
    let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
    let verdict = client.validate(&forged).await;
    assert_eq!(verdict["status"], "badSignature");
    assert_eq!(verdict["valid"], false);
    emulator.shutdown().await;
}

#[tokio::test]
async fn faults_and_outages() {
    let (emulator, client) = start(config()).await;
    let target = format!("/identities?{V}");
    client.set_faults(json!({"fail500": 1.0})).await;
    let failed = client.send("POST", &target, "").await;
    assert_eq!(failed.status(), 500);
    assert_eq!(error_of(failed).await.error.code, "InternalServerError");
    client
        .set_faults(json!({"fail500": 0.0, "fail503": 1.0}))
        .await;
    assert_eq!(client.send("POST", &target, "").await.status(), 503);
    client
        .set_faults(json!({"fail503": 0.0, "latencyMs": 150}))
        .await;
    let started = std::time::Instant::now();
    assert_eq!(client.send("POST", &target, "").await.status(), 201);
    assert!(started.elapsed() >= Duration::from_millis(150));
    client.set_faults(json!({"latencyMs": 0})).await;

    // A lost answer: the create is carried out, but no answer ever comes.
    let alive = client.admin("GET", "stats", None).await["identitiesAlive"].clone();
    client.set_faults(json!({"loseAnswers": 1.0})).await;
    let unanswered =
        tokio::time::timeout(Duration::from_millis(300), client.send("POST", &target, "")).await;
    assert!(unanswered.is_err(), "no answer comes");
    client.set_faults(json!({"loseAnswers": 0.0})).await;
    let stats = client.admin("GET", "stats", None).await;
    assert_eq!(
        stats["identitiesAlive"],
        alive.as_u64().unwrap() + 1,
        "{stats}"
    );

    client
        .admin(
            "POST",
            "outage",
            Some(json!({"mode": "unavailable", "seconds": 60})),
        )
        .await;
    assert_eq!(client.send("POST", &target, "").await.status(), 503);
    assert_eq!(
        client.admin("GET", "config", None).await["outage"]["mode"],
        "unavailable"
    );
    client.admin("DELETE", "outage", None).await;
    assert_eq!(client.send("POST", &target, "").await.status(), 201);

    // An admin connection opened before the outage stays usable during it.
    let admin = Client {
        http: reqwest::Client::new(),
        endpoint: client.endpoint.clone(),
        key: client.key.clone(),
        clock: client.clock.clone(),
    };
    admin.admin("GET", "config", None).await;
    admin
        .admin(
            "POST",
            "outage",
            Some(json!({"mode": "refuse", "seconds": 60})),
        )
        .await;
    // Requests on an open connection are dropped unanswered...
    let on_open = client
        .http
        .post(format!("{}{target}", client.endpoint))
        .send()
        .await;
    assert!(on_open.is_err());
    // ...and new connections are refused once the accept loop has closed the listener.
    let fresh = reqwest::Client::new();
    let refused = async {
        loop {
            match fresh
                .post(format!("{}{target}", client.endpoint))
                .send()
                .await
            {
                Err(e) if e.is_connect() => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .unwrap();
    admin.admin("DELETE", "outage", None).await;
    let back = async {
        loop {
            if let Ok(response) = fresh
                .post(format!("{}{target}", client.endpoint))
                .send()
                .await
            {
                return response.status();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Unsigned, so 401: what matters is that it was answered.
    let status = tokio::time::timeout(Duration::from_secs(10), back)
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(client.send("POST", &target, "").await.status(), 201);

    let bad = client
        .http
        .patch(format!("{}/_emulator/config", client.endpoint))
        .json(&json!({"faults": {"fail500": 2.0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_admin_prefix_is_off_without_admin() {
    let mut cfg = config();
    cfg.admin = false;
    let (emulator, client) = start(cfg).await;
    let response = client
        .http
        .get(format!("{}/_emulator/stats", client.endpoint))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    emulator.shutdown().await;
}

#[tokio::test]
async fn https_with_the_emulators_own_ca() {
    let dir = tempdir("https");
    let mut cfg = config();
    cfg.transport = Transport::Https {
        tls_dir: Some(dir.clone()),
    };
    let emulator = acs_emulator::start(cfg.clone()).await.unwrap();
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    assert_eq!(emulator.ca_cert_pem().unwrap().as_bytes(), ca);
    assert!(
        emulator
            .connection_string()
            .starts_with("endpoint=https://127.0.0.1:")
    );
    for host in ["127.0.0.1", "localhost"] {
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        let endpoint = format!("https://{host}:{}", emulator.local_addr().port());
        let client = Client {
            http,
            endpoint,
            key: AccessKey::from_base64(KEY).unwrap(),
            clock: Arc::new(acs_emulator::SystemClock),
        };
        client.create("").await;
    }
    emulator.shutdown().await;
    // A restart reuses the CA, so clients keep trusting it.
    let again = acs_emulator::start(cfg).await.unwrap();
    assert_eq!(again.ca_cert_pem().unwrap().as_bytes(), ca);
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let client = Client {
        http,
        endpoint: again.endpoint(),
        key: AccessKey::from_base64(KEY).unwrap(),
        clock: Arc::new(acs_emulator::SystemClock),
    };
    client.create("").await;
    again.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempdir("state");
    let mut cfg = config();
    cfg.signing_key = None;
    cfg.state_file = Some(dir.join("state.jsonl"));
    let (emulator, client) = start(cfg.clone()).await;
    let body =
        r#"{"customId": "carol", "createTokenWithScopes": ["chat"], "expiresInMinutes": 60}"#;
    let created: CreateIdentityResponse = client
        .send("POST", &format!("/identities?{PREVIEW}"), body)
        .await
        .json()
        .await
        .unwrap();
    let gone = client.create("").await.identity.id;
    assert_eq!(
        client
            .send("DELETE", &format!("/identities/{}?{V}", encode(&gone)), "")
            .await
            .status(),
        204
    );
    let resource = emulator.resource_id().to_owned();
    emulator.shutdown().await;

    let (emulator, client) = start(cfg).await;
    assert_eq!(emulator.resource_id(), resource);
    let again = client
        .send("POST", &format!("/identities?{PREVIEW}"), body)
        .await;
    assert_eq!(again.status(), 200);
    let again: CreateIdentityResponse = again.json().await.unwrap();
    assert_eq!(again.identity, created.identity);
    // Tokens minted before the restart still verify: the signing key was kept.
    let old = created.access_token.unwrap();
    assert_eq!(client.validate(&old.token).await["status"], "valid");
    assert_eq!(client.issue(&gone, 60).await.status(), 404);
    let stats = client.admin("GET", "stats", None).await;
    assert_eq!(
        (
            stats["identitiesAlive"].as_u64(),
            stats["identitiesDeleted"].as_u64()
        ),
        (Some(1), Some(1))
    );
    emulator.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "acs-emulator-test-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    // Private, whatever the umask: the emulator refuses a TLS directory others may write.
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.recursive(true).create(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    Timestamp::now().as_nanosecond() as u64
}

// --- Entra ID: the authority, bearer tokens, and api-versions --------------------------------

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "4a1e0b3f-5c6d-4e7f-8a9b-0c1d2e3f4a5b";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const SUBJECT: &str = "system:serviceaccount:acs-system:acs-identity-operator";
const EXCHANGE: &str = "api://AzureADTokenExchange";
const ACS_SCOPE: &str = "https://communication.azure.com//.default";

/// The ServiceAccount issuer's key (a stand-in for the kube-apiserver's).
fn issuer_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap()).clone()
}

fn federated_credential(issuer: &str) -> acs_emulator::FederatedCredential {
    acs_emulator::FederatedCredential {
        tenant_id: TENANT.into(),
        client_id: CLIENT_ID.into(),
        issuer: issuer.into(),
        subject: SUBJECT.into(),
        audience: EXCHANGE.into(),
    }
}

/// An emulator whose Entra authority trusts [`ISSUER`] with [`issuer_key`]'s keys given inline.
fn entra_config() -> Config {
    let mut config = config();
    config
        .entra
        .federated_credentials
        .push(federated_credential(ISSUER));
    config.entra.issuers.insert(
        ISSUER.into(),
        acs_emulator::IssuerKeys::Jwks(acs_emulator::JwkSet {
            keys: vec![issuer_key().public_jwk()],
        }),
    );
    config
}

/// A projected ServiceAccount token's claims, valid from `now` for an hour.
fn assertion_claims(now: Timestamp) -> Value {
    let now = now.as_second();
    json!({"iss": ISSUER, "sub": SUBJECT, "aud": [EXCHANGE], "iat": now, "nbf": now, "exp": now + 3600})
}

impl Client {
    /// `POST /{tenant}/oauth2/v2.0/token` with these form fields.
    async fn entra_token(&self, tenant: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}/{tenant}/oauth2/v2.0/token", self.endpoint))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// The client credentials grant as azure-identity sends it, for `client_id`.
    async fn exchange(&self, client_id: &str, assertion: &str) -> reqwest::Response {
        self.entra_token(
            TENANT,
            &[
                ("client_id", client_id),
                ("grant_type", "client_credentials"),
                ("scope", ACS_SCOPE),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion),
            ],
        )
        .await
    }

    /// An access token for a fresh, valid assertion.
    async fn entra_access_token(&self) -> String {
        let assertion = issuer_key().mint(&assertion_claims(self.clock.now()));
        let response = self.exchange(CLIENT_ID, &assertion).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn with_bearer(
        &self,
        token: &str,
        method: &str,
        target: &str,
        body: &str,
    ) -> reqwest::Response {
        self.http
            .request(
                method.parse().unwrap(),
                format!("{}{target}", self.endpoint),
            )
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }
}

/// The AADSTS code and `error` of an Entra refusal with `status`.
async fn entra_refusal(response: reqwest::Response, status: u16) -> (u64, String) {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    let code = body["error_codes"][0].as_u64().unwrap();
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "{description}"
    );
    (code, body["error"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_federated_assertion_buys_an_acs_token_that_runs_the_quickstart() {
    let mut cfg = entra_config();
    cfg.entra.token_lifetime_seconds = 1800;
    let (emulator, client) = start(cfg).await;
    assert_eq!(emulator.entra_authority(), emulator.endpoint());

    let discovery: Value = client
        .http
        .get(format!(
            "{}/{TENANT}/v2.0/.well-known/openid-configuration",
            client.endpoint
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        discovery["token_endpoint"],
        format!("{}/{TENANT}/oauth2/v2.0/token", client.endpoint)
    );
    let keys: acs_emulator::JwkSet = client
        .http
        .get(discovery["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let assertion = issuer_key().mint(&assertion_claims(Timestamp::now()));
    let response = client.exchange(CLIENT_ID, &assertion).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 1800);
    let token = body["access_token"].as_str().unwrap();
    let claims = acs_emulator::jwt::verify(
        token,
        &keys,
        &["https://communication.azure.com/"],
        Timestamp::now().as_second(),
    )
    .expect("signed with the key the discovery document names");
    assert_eq!(claims.iss, format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(claims.exp - Timestamp::now().as_second(), 1800);

    // The quickstart with the bearer token in place of the HMAC signature.
    let created = client
        .with_bearer(
            token,
            "POST",
            &format!("/identities?{V}"),
            r#"{"createTokenWithScopes": ["chat"]}"#,
        )
        .await;
    assert_eq!(created.status(), 201);
    let id = created
        .json::<CreateIdentityResponse>()
        .await
        .unwrap()
        .identity
        .id;
    let issue = format!("/identities/{}/:issueAccessToken?{V}", encode(&id));
    let issued = client
        .with_bearer(token, "POST", &issue, r#"{"scopes": ["voip"]}"#)
        .await;
    assert_eq!(issued.status(), 200);
    let revoke = format!("/identities/{}/:revokeAccessTokens?{V}", encode(&id));
    assert_eq!(
        client
            .with_bearer(token, "POST", &revoke, "")
            .await
            .status(),
        204
    );
    let delete = format!("/identities/{}?{V}", encode(&id));
    assert_eq!(
        client
            .with_bearer(token, "DELETE", &delete, "")
            .await
            .status(),
        204
    );

    let stats = client.admin("GET", "stats", None).await;
    assert_eq!(stats["requests"]["entraToken"]["200"], 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn entra_refuses_with_its_own_codes() {
    let (emulator, client, clock) = start_manual(entra_config()).await;
    let now = clock.now();
    let good = issuer_key().mint(&assertion_claims(now));

    // Unknown tenant, unknown application.
    let response = client
        .entra_token("00000000-0000-0000-0000-000000000000", &[])
        .await;
    assert_eq!(
        entra_refusal(response, 400).await,
        (90002, "invalid_tenant".into())
    );
    let response = client
        .exchange("11111111-1111-1111-1111-111111111111", &good)
        .await;
    assert_eq!(
        entra_refusal(response, 400).await,
        (700016, "unauthorized_client".into())
    );

    // No federated credential for this issuer, subject or audience.
    for (field, value) in [
        ("iss", "https://evil.example"),
        ("sub", "system:serviceaccount:default:other"),
        ("aud", "api://somewhere-else"),
    ] {
        let mut claims = assertion_claims(now);
        claims[field] = json!(value);
        let response = client
            .exchange(CLIENT_ID, &issuer_key().mint(&claims))
            .await;
        assert_eq!(
            entra_refusal(response, 400).await,
            (70021, "invalid_request".into()),
            "{field}"
        );
    }

    // Signed by a key the issuer does not have; expired; not yet valid.
    let forged = signing_key().mint(&assertion_claims(now));
    let response = client.exchange(CLIENT_ID, &forged).await;
    assert_eq!(
        entra_refusal(response, 401).await,
        (700027, "invalid_client".into())
    );
    let mut expired = assertion_claims(now - jiff::SignedDuration::from_hours(2));
    expired["exp"] = json!(now.as_second() - 600);
    let response = client
        .exchange(CLIENT_ID, &issuer_key().mint(&expired))
        .await;
    assert_eq!(
        entra_refusal(response, 401).await,
        (700024, "invalid_client".into())
    );
    let future = assertion_claims(now + jiff::SignedDuration::from_hours(1));
    let response = client
        .exchange(CLIENT_ID, &issuer_key().mint(&future))
        .await;
    assert_eq!(
        entra_refusal(response, 401).await,
        (700024, "invalid_client".into())
    );
    let response = client.exchange(CLIENT_ID, "not.a.jwt").await;
    assert_eq!(
        entra_refusal(response, 400).await,
        (50027, "invalid_request".into())
    );

    // The request itself.
    let base = [
        ("client_id", CLIENT_ID),
        ("grant_type", "client_credentials"),
        ("scope", ACS_SCOPE),
    ];
    let response = client.entra_token(TENANT, &base).await;
    assert_eq!(
        entra_refusal(response, 401).await,
        (7000218, "invalid_client".into())
    );
    let mut wrong_grant = base;
    wrong_grant[1].1 = "password";
    let response = client.entra_token(TENANT, &wrong_grant).await;
    assert_eq!(
        entra_refusal(response, 400).await,
        (70003, "unsupported_grant_type".into())
    );
    let mut vault = base;
    vault[2].1 = "https://vault.azure.net/.default";
    let response = client.entra_token(TENANT, &vault).await;
    assert_eq!(
        entra_refusal(response, 400).await,
        (500011, "invalid_resource".into())
    );

    // An outage of the authority alone: the identity API still answers.
    client
        .admin("POST", "entra/outage", Some(json!({"seconds": 60})))
        .await;
    let response = client.exchange(CLIENT_ID, &good).await;
    assert_eq!(
        entra_refusal(response, 503).await,
        (90033, "temporarily_unavailable".into())
    );
    assert_eq!(
        client
            .send("POST", &format!("/identities?{V}"), "")
            .await
            .status(),
        201
    );
    client.admin("DELETE", "entra/outage", None).await;
    assert_eq!(client.exchange(CLIENT_ID, &good).await.status(), 200);
    emulator.shutdown().await;
}

#[tokio::test]
async fn bearer_tokens_are_refused_401_denied_for_audience_expiry_and_signature() {
    let (emulator, client, clock) = start_manual(entra_config()).await;
    let target = format!("/identities?{V}");
    let denied = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 401);
        let error = error_of(response).await.error;
        assert_eq!(
            (error.code.as_str(), error.message.as_str()),
            ("Denied", "Denied by the resource provider.")
        );
    };
    let token = client.entra_access_token().await;
    assert_eq!(
        client
            .with_bearer(&token, "POST", &target, "")
            .await
            .status(),
        201
    );
    let lower_case_scheme = client
        .http
        .post(format!("{}{target}", client.endpoint))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower_case_scheme.status(), 201);

    // Signed by the authority's key, but for another resource.
    let now = clock.now().as_second();
    let vault = signing_key().mint(&json!({"aud": "https://vault.azure.net", "exp": now + 600}));
    denied(client.with_bearer(&vault, "POST", &target, "").await).await;
    // For ACS, but signed by someone else.
    let foreign =
        issuer_key().mint(&json!({"aud": "https://communication.azure.com", "exp": now + 600}));
    denied(client.with_bearer(&foreign, "POST", &target, "").await).await;
    denied(client.with_bearer("garbage", "POST", &target, "").await).await;
    // Expired: past the lifetime and the five minutes of skew.
    clock.advance(Duration::from_secs(3600 + 301));
    denied(client.with_bearer(&token, "POST", &target, "").await).await;
    // A fresh one works again.
    let fresh = client.entra_access_token().await;
    assert_eq!(
        client
            .with_bearer(&fresh, "POST", &target, "")
            .await
            .status(),
        201
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn issuer_keys_come_from_a_jwks_file_a_jwks_url_or_the_issuers_discovery() {
    // The file is read on every exchange, so a rotated key is used at once.
    let dir = tempdir("jwks");
    let file = dir.join("jwks.json");
    std::fs::write(
        &file,
        json!({"keys": [signing_key().public_jwk()]}).to_string(),
    )
    .unwrap();
    let mut cfg = entra_config();
    cfg.entra.issuers.insert(
        ISSUER.into(),
        acs_emulator::IssuerKeys::JwksFile(file.clone()),
    );
    let (emulator, client) = start(cfg).await;
    let assertion = issuer_key().mint(&assertion_claims(Timestamp::now()));
    assert_eq!(client.exchange(CLIENT_ID, &assertion).await.status(), 401);
    std::fs::write(
        &file,
        json!({"keys": [issuer_key().public_jwk()]}).to_string(),
    )
    .unwrap();
    assert_eq!(client.exchange(CLIENT_ID, &assertion).await.status(), 200);

    // Discovery: another emulator's authority plays the OIDC issuer. Its discovery document
    // names its own issuer and serves its key set; assertions signed with that key verify.
    let (issuer_emulator, _) = start({
        let mut cfg = config();
        cfg.signing_key = Some(issuer_key());
        cfg.entra
            .federated_credentials
            .push(federated_credential(ISSUER));
        cfg
    })
    .await;
    let discovered_issuer = format!("{}/{TENANT}/v2.0", issuer_emulator.endpoint());
    client
        .admin(
            "PUT",
            "entra",
            Some(json!({"federatedCredentials": [{
                "tenantId": TENANT, "clientId": CLIENT_ID,
                "issuer": discovered_issuer, "subject": SUBJECT,
            }]})),
        )
        .await;
    let config = client.admin("GET", "entra", None).await;
    assert_eq!(config["federatedCredentials"][0]["audience"], EXCHANGE);
    let mut claims = assertion_claims(Timestamp::now());
    claims["iss"] = json!(discovered_issuer);
    let response = client
        .exchange(CLIENT_ID, &issuer_key().mint(&claims))
        .await;
    assert_eq!(response.status(), 200);

    // A JWKS URL: for an issuer whose name is no address (a local kube-apiserver's).
    let jwks_url = format!(
        "{}/{TENANT}/discovery/v2.0/keys",
        issuer_emulator.endpoint()
    );
    client
        .admin(
            "PUT",
            "entra",
            Some(json!({
                "federatedCredentials": [federated_credential(ISSUER)],
                "issuers": {ISSUER: {"jwksUrl": jwks_url}},
            })),
        )
        .await;
    let assertion = issuer_key().mint(&assertion_claims(Timestamp::now()));
    assert_eq!(client.exchange(CLIENT_ID, &assertion).await.status(), 200);

    // An issuer that cannot be reached is Entra's AADSTS50166.
    issuer_emulator.shutdown().await;
    client
        .admin(
            "PUT",
            "entra",
            Some(json!({"federatedCredentials": [{
                "tenantId": TENANT, "clientId": CLIENT_ID,
                "issuer": "http://127.0.0.1:1", "subject": SUBJECT,
            }]})),
        )
        .await;
    claims["iss"] = json!("http://127.0.0.1:1");
    let response = client
        .exchange(CLIENT_ID, &issuer_key().mint(&claims))
        .await;
    assert_eq!(entra_refusal(response, 400).await.0, 50166);
    let refused = client
        .admin_refused("PUT", "entra", json!({"tokenLifetimeSeconds": 0}))
        .await;
    assert!(refused.contains("tokenLifetimeSeconds"), "{refused}");
    emulator.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn ga_versions_have_no_custom_id_and_no_get_of_an_identity() {
    let (emulator, client) = start(config()).await;
    for version in ["2025-06-30", "2026-07-22", "2026-09-23"] {
        let target = format!("/identities?api-version={version}");
        let body =
            r#"{"customId": "alice", "createTokenWithScopes": ["chat"], "expiresInMinutes": 60}"#;
        let first = client.send("POST", &target, body).await;
        let again = client.send("POST", &target, body).await;
        assert_eq!(
            (first.status().as_u16(), again.status().as_u16()),
            (201, 201),
            "{version}"
        );
        let first: CreateIdentityResponse = first.json().await.unwrap();
        let again: CreateIdentityResponse = again.json().await.unwrap();
        assert_ne!(
            first.identity, again.identity,
            "{version}: customId is not in its spec"
        );
        let id = encode(&first.identity.id);
        let get = format!("/identities/{id}?api-version={version}");
        assert_eq!(
            client.send("GET", &get, "").await.status(),
            404,
            "{version}"
        );
        let issue = format!("/identities/{id}/:issueAccessToken?api-version={version}");
        assert_eq!(client.issue_at(&issue).await, 200, "{version}");
        let delete = format!("/identities/{id}?api-version={version}");
        assert_eq!(
            client.send("DELETE", &delete, "").await.status(),
            204,
            "{version}"
        );
    }
    emulator.shutdown().await;
}

impl Client {
    async fn issue_at(&self, target: &str) -> u16 {
        self.send("POST", target, r#"{"scopes": ["chat"]}"#)
            .await
            .status()
            .as_u16()
    }
}

#[tokio::test]
async fn a_retired_preview_is_refused_as_an_unsupported_api_version() {
    let (emulator, client) = start(config()).await;
    let preview = format!("/identities?{PREVIEW}");
    assert_eq!(client.send("POST", &preview, "").await.status(), 201);
    let versions = client
        .admin(
            "PUT",
            "api-versions",
            Some(json!({"retired": ["2025-03-02-preview"]})),
        )
        .await;
    assert_eq!(versions["retired"], json!(["2025-03-02-preview"]));
    assert!(
        !versions["served"]
            .as_array()
            .unwrap()
            .contains(&json!("2025-03-02-preview"))
    );
    let refused = client.send("POST", &preview, "").await;
    assert_eq!(refused.status(), 400);
    let error = error_of(refused).await.error;
    assert_eq!(error.code, "UnsupportedApiVersion");
    assert!(
        error.message.contains("'2025-03-02-preview'"),
        "{}",
        error.message
    );
    assert_eq!(
        client
            .send("POST", "/identities?api-version=2026-09-23", "")
            .await
            .status(),
        201
    );
    let unknown = client
        .admin_refused("PUT", "api-versions", json!({"retired": ["2099-01-01"]}))
        .await;
    assert!(unknown.contains("2099-01-01"), "{unknown}");
    client
        .admin("PUT", "api-versions", Some(json!({"retired": []})))
        .await;
    assert_eq!(client.send("POST", &preview, "").await.status(), 201);
    emulator.shutdown().await;

    // Retired from the start.
    let mut cfg = config();
    cfg.retired_api_versions.insert("2025-03-02-preview".into());
    let (emulator, client) = start(cfg).await;
    assert_eq!(client.send("POST", &preview, "").await.status(), 400);
    emulator.shutdown().await;
}
