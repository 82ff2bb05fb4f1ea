//! The client against a scripted in-test HTTP server that checks every request's signature
//! from the raw request-target and body it received.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acs::signing;
use acs::{
    AcsClient, BuildError, ClientOptions, ConnectionString, EndpointPolicy, Error,
    MAX_ANSWER_BYTES, Observer, Operation, RequestOutcome, RetryPolicy,
};
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.c2ln";
const EXPIRES_ON: &str = "2026-11-24T10:00:00.1234567+00:00";
const ID: &str = "8:acs:r_1";
const ENCODED_ID: &str = "8%3Aacs%3Ar_1";
const API: &str = "api-version=2025-03-02-preview";

/// One scripted answer.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

fn reply(status: u16, body: impl Into<String>) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: body.into(),
        delay: Duration::ZERO,
    }
}

fn acs_error(status: u16, code: &str, message: &str) -> Reply {
    reply(
        status,
        serde_json::json!({"error": {"code": code, "message": message}}).to_string(),
    )
}

fn token_body() -> String {
    serde_json::json!({"token": TOKEN, "expiresOn": EXPIRES_ON}).to_string()
}

fn created_body() -> String {
    serde_json::json!({
        "identity": {"id": ID},
        "accessToken": {"token": TOKEN, "expiresOn": EXPIRES_ON},
    })
    .to_string()
}

/// What the server received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    body: Vec<u8>,
    content_type: Option<String>,
    signature_ok: bool,
}

#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
}

struct Server {
    connection: ConnectionString,
    script: Arc<Script>,
}

impl Server {
    async fn start(replies: Vec<Reply>) -> Self {
        let script = Arc::new(Script {
            replies: Mutex::new(replies.into()),
            seen: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(script.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            connection: connection_to(address),
            script,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.seen.lock().unwrap().clone()
    }

    fn client(&self, options: ClientOptions) -> AcsClient {
        AcsClient::new(self.connection.clone(), options).unwrap()
    }
}

fn connection_to(address: SocketAddr) -> ConnectionString {
    ConnectionString::parse(&format!("endpoint=http://{address}/;accesskey={KEY}"), true).unwrap()
}

/// A server speaking raw HTTP/1.1, for answers axum would not give (endless or stalled
/// bodies): `answer` gets each connection once the request head has been read.
async fn raw_server<F, Fut>(answer: F) -> ConnectionString
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && socket.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            tokio::spawn(answer(socket));
        }
    });
    connection_to(address)
}

async fn answer(State(script): State<Arc<Script>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, usize::MAX).await.unwrap().to_vec();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    // Recompute the signature as the service does: from the raw target it received.
    let target = parts.uri.path_and_query().unwrap().as_str().to_owned();
    let key = acs::AccessKey::from_base64(KEY).unwrap();
    let expected = signing::sign_request(
        &key,
        parts.method.as_str(),
        &target,
        &header("host").unwrap_or_default(),
        &header("x-ms-date").unwrap_or_default(),
        &body,
    );
    let signature_ok = header("x-ms-content-sha256").as_deref()
        == Some(expected.content_hash.as_str())
        && header("authorization").as_deref() == Some(expected.authorization.as_str())
        && header("x-ms-date")
            .as_deref()
            .and_then(signing::parse_http_date)
            .is_some();
    script.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        target,
        body,
        content_type: header("content-type"),
        signature_ok,
    });
    let next = script.replies.lock().unwrap().pop_front();
    let Reply {
        status,
        headers,
        body,
        delay,
    } = next.unwrap_or_else(|| acs_error(500, "ScriptExhausted", "no more scripted replies"));
    tokio::time::sleep(delay).await;
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    for (name, value) in headers {
        response.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    response
}

/// Records what the client reports.
#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<(Operation, RequestOutcome)>>,
    throttled: Mutex<u32>,
    limiter_waits: Mutex<u32>,
}

impl Observer for Recorder {
    fn on_request(&self, operation: Operation, outcome: RequestOutcome, _duration: Duration) {
        self.requests.lock().unwrap().push((operation, outcome));
    }
    fn on_throttled(&self, _operation: Operation) {
        *self.throttled.lock().unwrap() += 1;
    }
    fn on_rate_limit_wait(&self, _operation: Operation, _waited: Duration) {
        *self.limiter_waits.lock().unwrap() += 1;
    }
}

/// Fast retries so the tests take milliseconds.
fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

/// What a client of the local test servers needs: their address admitted, plain http allowed.
fn loopback() -> ClientOptions {
    ClientOptions {
        allow_http: true,
        endpoint_policy: EndpointPolicy::from_list("127.0.0.1").unwrap(),
        ..ClientOptions::default()
    }
}

fn options(observer: Arc<Recorder>) -> ClientOptions {
    ClientOptions {
        retry: quick_retries(),
        observer,
        ..loopback()
    }
}

fn scopes() -> Vec<String> {
    vec!["chat".into(), "voip".into()]
}

fn assert_no_secrets(error: &Error) {
    for text in [error.to_string(), format!("{error:?}")] {
        assert!(!text.contains(KEY), "{text}");
        assert!(!text.contains(TOKEN), "{text}");
    }
}

#[tokio::test]
async fn create_answers_201_for_new_and_200_for_an_existing_custom_id() {
    let server = Server::start(vec![reply(201, created_body()), reply(200, created_body())]).await;
    let client = server.client(loopback());

    let first = client
        .create_identity_with_token("ns/name", &scopes(), 60)
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.id, ID);
    assert_eq!(first.token.token, TOKEN);
    assert_eq!(first.token.expires_on, EXPIRES_ON);
    let again = client
        .create_identity_with_token("ns/name", &scopes(), 60)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.id, ID);

    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].target, format!("/identities?{API}"));
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"createTokenWithScopes": ["chat", "voip"], "expiresInMinutes": 60, "customId": "ns/name"})
    );
    assert!(seen.iter().all(|s| s.signature_ok), "{seen:?}");
}

#[tokio::test]
async fn identity_operations_sign_percent_encoded_ids() {
    let details = serde_json::json!({"id": ID, "customId": "ns/name"}).to_string();
    let server = Server::start(vec![
        reply(200, token_body()),
        reply(204, ""),
        reply(200, details),
        reply(204, ""),
    ])
    .await;
    let client = server.client(loopback());

    let token = client.issue_token(ID, &scopes(), 90).await.unwrap();
    assert_eq!(token.token, TOKEN);
    client.revoke_tokens(ID).await.unwrap();
    let identity = client
        .get_identity(ID)
        .await
        .unwrap()
        .expect("the preview has GET");
    assert_eq!(identity.custom_id.as_deref(), Some("ns/name"));
    client.delete_identity(ID).await.unwrap();

    let seen = server.seen();
    let requests: Vec<_> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.target.as_str()))
        .collect();
    assert_eq!(
        requests,
        [
            (
                "POST",
                format!("/identities/{ENCODED_ID}/:issueAccessToken?{API}").as_str()
            ),
            (
                "POST",
                format!("/identities/{ENCODED_ID}/:revokeAccessTokens?{API}").as_str()
            ),
            ("GET", format!("/identities/{ENCODED_ID}?{API}").as_str()),
            ("DELETE", format!("/identities/{ENCODED_ID}?{API}").as_str()),
        ]
    );
    let issue: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        issue,
        serde_json::json!({"scopes": ["chat", "voip"], "expiresInMinutes": 90})
    );
    // Revoke sends an empty JSON body (hashing the empty string); GET and DELETE send none.
    assert!(seen[1].body.is_empty());
    assert_eq!(seen[1].content_type.as_deref(), Some("application/json"));
    assert_eq!(seen[3].content_type, None);
    assert!(seen.iter().all(|s| s.signature_ok), "{seen:?}");
}

#[tokio::test]
async fn throttling_waits_for_retry_after_then_succeeds() {
    let mut throttled = acs_error(429, "TooManyRequests", "Rate limit exceeded.");
    throttled.headers.push(("retry-after", "1".into()));
    let server = Server::start(vec![throttled, reply(201, created_body())]).await;
    let recorder = Arc::new(Recorder::default());
    let client = server.client(options(recorder.clone()));

    let start = Instant::now();
    let created = client
        .create_identity_with_token("ns/name", &scopes(), 60)
        .await
        .unwrap();
    assert!(created.created);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.seen().len(), 2);
    assert!(server.seen().iter().all(|s| s.signature_ok));
    assert_eq!(*recorder.throttled.lock().unwrap(), 1);
    assert_eq!(*recorder.limiter_waits.lock().unwrap(), 2);
    assert_eq!(
        *recorder.requests.lock().unwrap(),
        [
            (Operation::CreateIdentity, RequestOutcome::Status(429)),
            (Operation::CreateIdentity, RequestOutcome::Status(201)),
        ]
    );
}

#[tokio::test]
async fn too_long_a_retry_after_goes_to_the_caller() {
    let mut throttled = acs_error(429, "TooManyRequests", "Rate limit exceeded.");
    throttled.headers.push(("retry-after", "120".into()));
    let server = Server::start(vec![throttled]).await;
    let client = server.client(options(Arc::default()));

    let error = client.issue_token(ID, &scopes(), 60).await.unwrap_err();
    assert_eq!(error.metric_label(), "throttled");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(120)));
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    let server = Server::start(vec![
        acs_error(503, "ServiceUnavailable", "Try again."),
        reply(502, "<html>bad gateway</html>"),
        reply(200, token_body()),
    ])
    .await;
    let client = server.client(options(Arc::default()));

    let token = client.issue_token(ID, &scopes(), 60).await.unwrap();
    assert_eq!(token.token, TOKEN);
    assert_eq!(server.seen().len(), 3);
    assert!(server.seen().iter().all(|s| s.signature_ok));
}

#[tokio::test]
async fn exhausted_retries_return_the_last_service_error() {
    let failing = || acs_error(503, "ServiceUnavailable", "Try again.");
    let server = Server::start(vec![failing(), failing()]).await;
    let client = server
        .client(options(Arc::default()))
        .with_retry_policy(RetryPolicy {
            max_retries: 1,
            ..quick_retries()
        });

    let error = client.revoke_tokens(ID).await.unwrap_err();
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    assert_eq!(error.status(), Some(503));
    assert_eq!(error.service_error().unwrap().code, "ServiceUnavailable");
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn a_rejected_key_is_not_retried_and_says_what_to_fix() {
    let server = Server::start(vec![acs_error(
        401,
        "Denied",
        "Denied by the resource provider.",
    )])
    .await;
    let client = server.client(options(Arc::default()));

    let error = client
        .create_identity_with_token("ns/name", &scopes(), 60)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
    assert_eq!(error.metric_label(), "unauthorized");
    let service = error.service_error().unwrap();
    assert_eq!((service.status, service.code.as_str()), (401, "Denied"));
    assert_eq!(service.message, "Denied by the resource provider.");
    let text = error.to_string();
    assert!(
        text.contains("401 Denied: Denied by the resource provider."),
        "{text}"
    );
    assert!(
        text.contains("check the accesskey in the connection Secret"),
        "{text}"
    );
    assert_no_secrets(&error);
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn bad_requests_are_not_retried() {
    let server = Server::start(vec![acs_error(
        400,
        "ValidationError",
        "expiresInMinutes must be between 60 and 1440.",
    )])
    .await;
    let client = server.client(options(Arc::default()));

    let error = client.issue_token(ID, &scopes(), 5).await.unwrap_err();
    assert!(matches!(error, Error::BadRequest(_)), "{error:?}");
    assert!(error.to_string().contains("ValidationError"));
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn the_service_words_are_echoed_bounded_and_on_one_line() {
    let message = format!("first line\nforged line {}", "x".repeat(50_000));
    let server = Server::start(vec![acs_error(401, &"C".repeat(1_000), &message)]).await;
    let client = server.client(options(Arc::default()));

    let error = client.issue_token(ID, &scopes(), 60).await.unwrap_err();
    let text = error.to_string();
    assert!(text.len() < 600, "{} bytes", text.len());
    assert!(text.contains("first line forged line xxx"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    let service = error.service_error().unwrap();
    assert!(service.code.ends_with("CCC…"), "{}", service.code);
    assert!(service.message.ends_with("xxx…"), "{}", service.message);
}

#[tokio::test]
async fn deleting_a_missing_identity_is_a_distinct_not_found() {
    let server = Server::start(vec![acs_error(
        404,
        "IdentityNotFound",
        "No such identity.",
    )])
    .await;
    let client = server.client(options(Arc::default()));

    let error = client.delete_identity(ID).await.unwrap_err();
    assert!(matches!(error, Error::NotFound(_)), "{error:?}");
    assert_eq!(error.metric_label(), "not_found");
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn an_unexpected_success_code_is_not_quoted_or_retried() {
    // A 200 carrying a token where 204 was expected: reported without echoing the body.
    let server = Server::start(vec![reply(200, token_body())]).await;
    let client = server.client(options(Arc::default()));

    let error = client.delete_identity(ID).await.unwrap_err();
    assert_eq!(error.metric_label(), "unexpected_response");
    assert!(error.to_string().contains("expected HTTP 204"), "{error}");
    assert_no_secrets(&error);
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn a_body_of_the_wrong_shape_is_reported_without_quoting_it() {
    let server = Server::start(vec![reply(
        201,
        serde_json::json!({"identity": TOKEN}).to_string(),
    )])
    .await;
    let client = server.client(options(Arc::default()));

    let error = client
        .create_identity_with_token("ns/name", &scopes(), 60)
        .await
        .unwrap_err();
    assert_eq!(error.metric_label(), "unexpected_response");
    assert_no_secrets(&error);
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried() {
    let mut slow = reply(200, token_body());
    slow.delay = Duration::from_secs(1);
    let server = Server::start(vec![slow, reply(200, token_body())]).await;
    let recorder = Arc::new(Recorder::default());
    let client = server.client(ClientOptions {
        request_timeout: Duration::from_millis(200),
        ..options(recorder.clone())
    });

    client.issue_token(ID, &scopes(), 60).await.unwrap();
    assert_eq!(
        *recorder.requests.lock().unwrap(),
        [
            (Operation::IssueToken, RequestOutcome::Timeout),
            (Operation::IssueToken, RequestOutcome::Status(200)),
        ]
    );
}

#[tokio::test]
async fn a_timeout_without_retries_is_reported() {
    let mut slow = reply(200, token_body());
    slow.delay = Duration::from_secs(1);
    let server = Server::start(vec![slow]).await;
    let client = server.client(ClientOptions {
        request_timeout: Duration::from_millis(200),
        retry: RetryPolicy::NEVER,
        ..loopback()
    });

    let start = Instant::now();
    let error = client.get_identity(ID).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(900));
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(error.is_transient());
}

#[tokio::test]
async fn the_deadline_bounds_the_whole_call() {
    let mut slow = reply(200, token_body());
    slow.delay = Duration::from_secs(1);
    let server = Server::start(vec![slow]).await;
    let client = server.client(ClientOptions {
        retry: RetryPolicy {
            deadline: Some(Duration::from_millis(300)),
            ..quick_retries()
        },
        ..loopback()
    });

    let start = Instant::now();
    let error = client.issue_token(ID, &scopes(), 60).await.unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(start.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_connection_error() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let client = AcsClient::new(
        connection_to(address),
        ClientOptions {
            retry: RetryPolicy::NEVER,
            ..loopback()
        },
    )
    .unwrap();

    let error = client.delete_identity(ID).await.unwrap_err();
    assert_eq!(error.metric_label(), "connection");
    assert!(error.to_string().contains(&address.to_string()), "{error}");
    assert_no_secrets(&error);
}

/// An ACS error body of exactly `length` bytes.
fn error_body_of(length: usize) -> String {
    let empty = acs_error(400, "ValidationError", "").body;
    acs_error(400, "ValidationError", &"x".repeat(length - empty.len())).body
}

#[tokio::test]
async fn answers_are_read_up_to_64_kib() {
    let at_the_cap = error_body_of(MAX_ANSWER_BYTES);
    assert_eq!(at_the_cap.len(), 64 * 1024);
    let server = Server::start(vec![
        reply(400, at_the_cap),
        reply(400, error_body_of(MAX_ANSWER_BYTES + 1)),
    ])
    .await;
    let client = server.client(ClientOptions {
        retry: RetryPolicy::NEVER,
        ..loopback()
    });

    let error = client.issue_token(ID, &scopes(), 60).await.unwrap_err();
    assert!(matches!(error, Error::BadRequest(_)), "{error:?}");
    let error = client.issue_token(ID, &scopes(), 60).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::AnswerTooLarge {
                operation: Operation::IssueToken,
                status: 400
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("exceeded 64 KiB"), "{error}");
    assert!(error.is_transient());
}

#[tokio::test]
async fn an_oversized_answer_is_retried_like_a_server_error() {
    let server = Server::start(vec![
        reply(200, "x".repeat(1024 * 1024)),
        reply(200, token_body()),
    ])
    .await;
    let client = server.client(options(Arc::default()));

    client.issue_token(ID, &scopes(), 60).await.unwrap();
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn an_endless_body_is_cut_off_at_the_cap() {
    // Chunked, so no Content-Length warns the client: it must stop reading by itself.
    let connection = raw_server(|mut socket| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        if socket.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
        while socket.write_all(chunk.as_bytes()).await.is_ok() {}
    })
    .await;
    let client = AcsClient::new(
        connection,
        ClientOptions {
            retry: RetryPolicy::NEVER,
            ..loopback()
        },
    )
    .unwrap();

    let error = client.get_identity(ID).await.unwrap_err();
    assert!(matches!(error, Error::AnswerTooLarge { .. }), "{error:?}");
}

#[tokio::test]
async fn the_attempt_timeout_covers_a_stalled_body() {
    let connection = raw_server(|mut socket| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":";
        if socket.write_all(head.as_bytes()).await.is_ok() {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
    .await;
    let client = AcsClient::new(
        connection,
        ClientOptions {
            request_timeout: Duration::from_millis(300),
            retry: RetryPolicy::NEVER,
            ..loopback()
        },
    )
    .unwrap();

    let start = Instant::now();
    let error = client.get_identity(ID).await.unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let trap = Server::start(vec![reply(200, token_body())]).await;
    let trap_url = format!(
        "http://{}/identities/stolen?token=secret-looking-path",
        trap.connection.host()
    );
    let mut redirect = reply(307, "");
    redirect.headers.push(("location", trap_url));
    let server = Server::start(vec![redirect]).await;
    let client = server.client(options(Arc::default()));

    let error = client.issue_token(ID, &scopes(), 60).await.unwrap_err();
    assert_eq!(trap.seen().len(), 0, "the trap was reached");
    assert_eq!(server.seen().len(), 1, "a redirect is not retried");
    assert!(
        matches!(error, Error::UnexpectedResponse { status: 307, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("HTTP 307") && text.contains("redirect"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "to http://{}",
            trap.connection.host().split(':').next().unwrap()
        )),
        "{text}"
    );
    assert!(!text.contains("secret-looking-path"), "{text}");
}

#[tokio::test]
async fn plain_http_is_refused_unless_allowed() {
    let server = Server::start(vec![reply(200, token_body())]).await;
    let client = server.client(ClientOptions {
        allow_http: false,
        retry: RetryPolicy::NEVER,
        ..loopback()
    });

    let error = client.issue_token(ID, &scopes(), 60).await.unwrap_err();
    assert_eq!(error.metric_label(), "connection", "{error:?}");
    assert_eq!(server.seen().len(), 0);
}

#[tokio::test]
async fn only_endpoints_the_policy_admits_get_a_client() {
    let server = Server::start(Vec::new()).await;
    // Loopback is not an Azure host: the default refuses it, whatever else is allowed.
    let refused = AcsClient::new(
        server.connection.clone(),
        ClientOptions {
            allow_http: true,
            ..ClientOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&refused, BuildError::EndpointNotAllowed { host } if host == "127.0.0.1"),
        "{refused:?}"
    );
    let text = refused.to_string();
    assert!(
        text.contains("`127.0.0.1`") && text.contains("--acs-endpoint-suffixes"),
        "{text}"
    );
    assert!(!text.contains(KEY), "{text}");

    let build = |endpoint: &str, policy: &str| {
        let connection =
            ConnectionString::parse(&format!("endpoint={endpoint};accesskey={KEY}"), false)
                .unwrap();
        AcsClient::new(
            connection,
            ClientOptions {
                endpoint_policy: EndpointPolicy::from_list(policy).unwrap(),
                ..ClientOptions::default()
            },
        )
    };
    let azure = "communication.azure.com,communication.azure.us,communication.azure.cn";
    assert!(build("https://r.communication.azure.us", azure).is_ok());
    assert!(build("https://R.Communication.Azure.Com:443/", azure).is_ok());
    for refused in [
        "https://evilcommunication.azure.com",
        "https://communication.azure.com.evil.net",
        "https://10.0.0.1",
        "https://kubernetes.default.svc",
    ] {
        assert!(
            matches!(
                build(refused, azure),
                Err(BuildError::EndpointNotAllowed { .. })
            ),
            "{refused}"
        );
    }
    assert!(build("https://acs.corp.example:8443", "corp.example").is_ok());
    assert!(build("https://localhost:8443", "localhost").is_ok());
}

#[test]
fn clients_of_one_endpoint_share_rate_limits() {
    let connection = ConnectionString::parse(
        &format!("endpoint=https://shared.communication.azure.com/;accesskey={KEY}"),
        false,
    )
    .unwrap();
    let a = AcsClient::new(connection.clone(), ClientOptions::default()).unwrap();
    let b = AcsClient::new(connection, ClientOptions::default()).unwrap();
    assert!(Arc::ptr_eq(a.rate_limits(), b.rate_limits()));
    let fewer = a.with_retry_policy(RetryPolicy::NEVER);
    assert!(Arc::ptr_eq(a.rate_limits(), fewer.rate_limits()));
    assert_eq!(fewer.retry_policy(), RetryPolicy::NEVER);
    assert!(!format!("{a:?}").contains(KEY));
}

#[test]
fn extra_ca_certificates_are_checked() {
    let connection = ConnectionString::parse(
        &format!("endpoint=https://r.communication.azure.com/;accesskey={KEY}"),
        false,
    )
    .unwrap();
    let with_ca = |pem: &str| {
        AcsClient::new(
            connection.clone(),
            ClientOptions {
                extra_ca_pem: Some(pem.as_bytes().to_vec()),
                ..ClientOptions::default()
            },
        )
    };
    assert!(with_ca(TEST_CA).is_ok());
    assert!(matches!(with_ca(""), Err(BuildError::EmptyCaPem)));
    assert!(matches!(
        with_ca("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"),
        Err(BuildError::InvalidCaPem { .. })
    ));
}

/// A self-signed P-256 CA, only parsed here.
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBgzCCASmgAwIBAgIUZVd+Fi9SDzxYCAFQdGhigKQRZOIwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLYWNzIHRlc3QgQ0EwIBcNMjYxMTI1MDQ0MzM5WhgPMjEyNjEx
MDEwNDQzMzlaMBYxFDASBgNVBAMMC2FjcyB0ZXN0IENBMFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAEJRzjJGZNxSRUSvO/xI3i4VQmozLTbp2627TLAY7g2r5Tk/wk
SeIm+EXagG/mkFBBMm9DwNVKmkUWwtITIGloGqNTMFEwHQYDVR0OBBYEFGvsThjc
tINOQwDdMHrHQykIVCKdMB8GA1UdIwQYMBaAFGvsThjctINOQwDdMHrHQykIVCKd
MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgW7KjqZD9HPUX+ebf
+zy4Sgj5cJMQhLl4YgoGvWli83sCIQC7oaaRDPd9aX94Ad84S1xU3zJoVuyNr9QW
kTClNU6DLA==
-----END CERTIFICATE-----
";
