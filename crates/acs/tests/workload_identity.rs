//! The client under workload identity against the in-process emulator over HTTPS: its Entra
//! authority exchanges a federated token for a bearer token, which the identity API accepts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use acs::{
    AcsClient, BuildError, ClientOptions, Credential, Error, FederatedToken, WorkloadIdentity,
};
use acs_emulator::{
    Config, Emulator, FederatedCredential, IssuerKeys, JwkSet, SigningKey, Transport,
};
use serde_json::{Value, json};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "4a1e0b3f-5c6d-4e7f-8a9b-0c1d2e3f4a5b";
const OTHER_CLIENT_ID: &str = "0b6a4f21-7c3d-4e5f-9a8b-1c2d3e4f5a6b";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const SUBJECT: &str = "system:serviceaccount:acs-system:acs-identity-operator";
const KEY: &str = "dGVzdC1hY2Nlc3Mta2V5LTAxMjM0NTY3ODk=";

/// The ServiceAccount issuer's key (a stand-in for the kube-apiserver's).
fn issuer_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap()).clone()
}

/// Mints a projected-token-like assertion on each call, or fails with `failure` when set.
#[derive(Default)]
struct MintedToken {
    minted: AtomicUsize,
    failure: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl FederatedToken for MintedToken {
    async fn token(&self) -> Result<String, String> {
        if let Some(failure) = self.failure.lock().unwrap().clone() {
            return Err(failure);
        }
        self.minted.fetch_add(1, Ordering::SeqCst);
        let now = jiff::Timestamp::now().as_second();
        Ok(issuer_key().mint(&json!({
            "iss": ISSUER, "sub": SUBJECT, "aud": ["api://AzureADTokenExchange"],
            "iat": now, "nbf": now, "exp": now + 3600,
        })))
    }
}

async fn emulator() -> Emulator {
    emulator_with_token_lifetime(acs_emulator::entra::DEFAULT_TOKEN_LIFETIME_SECONDS).await
}

async fn emulator_with_token_lifetime(seconds: u64) -> Emulator {
    let mut config = Config::new(acs::AccessKey::from_base64(KEY).unwrap());
    config.admin = true;
    config.transport = Transport::Https { tls_dir: None };
    config
        .entra
        .federated_credentials
        .push(FederatedCredential {
            tenant_id: TENANT.into(),
            client_id: CLIENT_ID.into(),
            issuer: ISSUER.into(),
            subject: SUBJECT.into(),
            audience: "api://AzureADTokenExchange".into(),
        });
    config.entra.issuers.insert(
        ISSUER.into(),
        IssuerKeys::Jwks(JwkSet {
            keys: vec![issuer_key().public_jwk()],
        }),
    );
    config.entra.token_lifetime_seconds = seconds;
    acs_emulator::start(config).await.unwrap()
}

fn options(emulator: &Emulator) -> ClientOptions {
    ClientOptions {
        extra_ca_pem: Some(emulator.ca_cert_pem().unwrap().as_bytes().to_vec()),
        endpoint_policy: acs::EndpointPolicy::from_list("127.0.0.1").unwrap(),
        retry: acs::RetryPolicy::NEVER,
        ..ClientOptions::default()
    }
}

fn client(emulator: &Emulator, client_id: &str, token: Arc<MintedToken>) -> AcsClient {
    let identity = WorkloadIdentity {
        tenant_id: TENANT.into(),
        client_id: client_id.into(),
        authority_host: emulator.entra_authority(),
        federated_token: token,
    };
    let credential = Credential::WorkloadIdentity(identity);
    AcsClient::with_credential(&emulator.endpoint(), credential, options(emulator)).unwrap()
}

async fn admin(emulator: &Emulator, method: reqwest::Method, path: &str, body: Value) -> Value {
    let ca = reqwest::Certificate::from_pem(emulator.ca_cert_pem().unwrap().as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("{}/_emulator/{path}", emulator.endpoint());
    let answer = http.request(method, url).json(&body).send().await.unwrap();
    assert!(answer.status().is_success(), "{path}: {answer:?}");
    answer.json().await.unwrap()
}

#[tokio::test]
async fn one_entra_token_serves_every_call() {
    let emulator = emulator().await;
    let token = Arc::new(MintedToken::default());
    let acs = client(&emulator, CLIENT_ID, token.clone());
    let scopes = vec!["chat".to_owned()];
    let created = acs
        .create_identity_with_token("wi-1", &scopes, 60)
        .await
        .unwrap();
    acs.issue_token(&created.id, &scopes, 60).await.unwrap();
    acs.revoke_tokens(&created.id).await.unwrap();
    acs.delete_identity(&created.id).await.unwrap();

    let stats = admin(&emulator, reqwest::Method::GET, "stats", Value::Null).await;
    assert_eq!(stats["requests"]["entraToken"], json!({ "200": 1 }));
    assert_eq!(token.minted.load(Ordering::SeqCst), 1);
    assert_eq!(
        stats["requests"]["createIdentityWithToken"],
        json!({ "201": 1 })
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_token_within_five_minutes_of_expiry_is_renewed_before_the_next_call() {
    // Entra tokens of five minutes: each is already due for renewal when the next call comes.
    let emulator = emulator_with_token_lifetime(300).await;
    let token = Arc::new(MintedToken::default());
    let acs = client(&emulator, CLIENT_ID, token.clone());
    let scopes = vec!["chat".to_owned()];
    let created = acs
        .create_identity_with_token("wi-renew", &scopes, 60)
        .await
        .unwrap();
    acs.issue_token(&created.id, &scopes, 60).await.unwrap();
    let stats = admin(&emulator, reqwest::Method::GET, "stats", Value::Null).await;
    assert_eq!(stats["requests"]["entraToken"], json!({ "200": 2 }));
    assert_eq!(
        token.minted.load(Ordering::SeqCst),
        2,
        "a fresh assertion each time"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn entra_failures_are_told_apart_and_name_no_token() {
    let emulator = emulator().await;
    let scopes = vec!["chat".to_owned()];

    let unknown = client(&emulator, OTHER_CLIENT_ID, Arc::new(MintedToken::default()));
    let refused = unknown
        .create_identity_with_token("wi-2", &scopes, 60)
        .await;
    let Err(Error::EntraRefused {
        status,
        codes,
        description,
    }) = refused
    else {
        panic!("expected an Entra refusal, got {refused:?}");
    };
    assert!(status == 400 || status == 401, "{status}");
    assert!(codes.starts_with("AADSTS"), "{codes}");
    assert!(description.contains(&codes), "{description}");

    let token = Arc::new(MintedToken::default());
    *token.failure.lock().unwrap() = Some("ServiceAccount \"acs\" not found".into());
    let no_token = client(&emulator, CLIENT_ID, token.clone());
    let missing = no_token
        .create_identity_with_token("wi-3", &scopes, 60)
        .await;
    let Err(Error::FederatedTokenUnavailable { cause }) = missing else {
        panic!("expected a missing federated token, got {missing:?}");
    };
    assert_eq!(cause, "ServiceAccount \"acs\" not found");

    *token.failure.lock().unwrap() = None;
    admin(
        &emulator,
        reqwest::Method::POST,
        "entra/outage",
        json!({ "seconds": 600 }),
    )
    .await;
    let outage = no_token
        .create_identity_with_token("wi-3", &scopes, 60)
        .await;
    let Err(error @ Error::EntraUnavailable { .. }) = outage else {
        panic!("expected Entra unavailable, got {outage:?}");
    };
    assert!(error.is_transient());
    assert_eq!(
        error.to_string(),
        format!(
            "could not get a Microsoft Entra ID token from {}: HTTP 503",
            emulator.entra_authority()
        )
    );

    admin(
        &emulator,
        reqwest::Method::DELETE,
        "entra/outage",
        Value::Null,
    )
    .await;
    no_token
        .create_identity_with_token("wi-3", &scopes, 60)
        .await
        .unwrap();
    // No ACS request went out while Entra gave no token.
    let stats = admin(&emulator, reqwest::Method::GET, "stats", Value::Null).await;
    assert_eq!(
        stats["requests"]["createIdentityWithToken"],
        json!({ "201": 1 })
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn an_authority_outside_entra_and_the_endpoint_list_is_refused() {
    let emulator = emulator().await;
    let identity = |authority: &str| {
        Credential::WorkloadIdentity(WorkloadIdentity {
            tenant_id: TENANT.into(),
            client_id: CLIENT_ID.into(),
            authority_host: authority.into(),
            federated_token: Arc::new(MintedToken::default()),
        })
    };
    let build = |authority: &str| {
        AcsClient::with_credential(
            &emulator.endpoint(),
            identity(authority),
            options(&emulator),
        )
    };
    assert!(matches!(
        build("https://login.evil.example"),
        Err(BuildError::AuthorityNotAllowed { host }) if host == "login.evil.example"
    ));
    for invalid in [
        "http://127.0.0.1:1",
        "https://127.0.0.1:1/tenant",
        "not a url",
    ] {
        assert!(
            matches!(build(invalid), Err(BuildError::InvalidAuthority(_))),
            "{invalid}"
        );
    }
    assert!(build("https://login.microsoftonline.com").is_ok());
    emulator.shutdown().await;
}
