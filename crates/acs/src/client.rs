//! The async ACS identity client: signs every request, retries transient failures and waits
//! for the shared per-resource rate limits before sending.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::api_version::{ApiVersionPolicy, ApiVersionState, serves};
use crate::body::read_capped;
use crate::circuit::Answer;
use crate::endpoint::{EndpointPolicy, is_azure_host};
use crate::entra::{EntraCredential, WorkloadIdentity, is_entra_authority};
use crate::error::{
    Error, MAX_CODE_BYTES, MAX_ENDPOINT_BYTES, MAX_MESSAGE_BYTES, ServiceError, bounded_echo,
    root_cause,
};
use crate::ratelimit::{Operation, Quota, RateLimits, Turn};
use crate::retry::{self, RetryPolicy};
use crate::schedule::{Class, Ticket};
use crate::wire::{
    AccessToken, CreateIdentityRequest, CreateIdentityResponse, ErrorResponse, IdentityDetails,
    IssueTokenRequest, has_custom_id,
};
use crate::{AccessKey, ConnectionString, signing};

/// Receives what the client does, for metrics. Every method defaults to doing nothing.
pub trait Observer: Send + Sync {
    /// One HTTP exchange finished (each retry is one more).
    fn on_request(&self, _operation: Operation, _outcome: RequestOutcome, _duration: Duration) {}
    /// The service answered 429.
    fn on_throttled(&self, _operation: Operation) {}
    /// Time spent waiting for the client-side rate limiter before one attempt (often zero).
    fn on_rate_limit_wait(&self, _operation: Operation, _waited: Duration) {}
    /// A caller called back claimed the slot reserved for it this long after it was reserved.
    fn on_called_back(&self, _operation: Operation, _came_back_after: Duration) {}
    /// The service refused api-version `from`; requests go out with `to` from now on.
    fn on_api_version_fallback(&self, _from: &'static str, _to: &'static str) {}
    /// A create without `customId` got no answer: it may have made an identity nobody knows.
    fn on_possible_orphan(&self) {}
}

struct NoObserver;

impl Observer for NoObserver {}

/// How one HTTP exchange ended. `Display` gives a bounded label: the status code, `timeout`
/// or `connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Status(u16),
    Timeout,
    Connection,
}

impl fmt::Display for RequestOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestOutcome::Status(status) => write!(f, "{status}"),
            RequestOutcome::Timeout => f.write_str("timeout"),
            RequestOutcome::Connection => f.write_str("connection"),
        }
    }
}

/// How to build an [`AcsClient`].
#[derive(Clone)]
pub struct ClientOptions {
    /// PEM certificates trusted in addition to the public web roots (`--acs-ca-file`, e.g. the
    /// emulator's private CA), for endpoints outside Azure's own domains only: Azure serves its
    /// endpoints with public certificates, and a private CA must not be able to vouch for them.
    /// The PEM is checked whatever the endpoint, so a broken file shows at once.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Accept `http://` endpoints (`--allow-insecure-http`, local development against the
    /// emulator only). Off, the client refuses every plain-http URL, whatever the connection
    /// string says.
    pub allow_http: bool,
    /// The hosts the endpoint may name (`--acs-endpoint-suffixes`). The default admits Azure's
    /// ACS domains only: a local emulator or a private endpoint must be listed.
    pub endpoint_policy: EndpointPolicy,
    /// Timeout of one HTTP exchange, body included.
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    /// The limiters to wait on; `None` shares the process-wide ones of the endpoint
    /// ([`RateLimits::for_endpoint`]), created with `quota`.
    pub rate_limits: Option<Arc<RateLimits>>,
    pub quota: Quota,
    pub observer: Arc<dyn Observer>,
    pub api_version: ApiVersionPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            extra_ca_pem: None,
            allow_http: false,
            endpoint_policy: EndpointPolicy::azure_default(),
            request_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            rate_limits: None,
            quota: Quota::default(),
            observer: Arc::new(NoObserver),
            api_version: ApiVersionPolicy::default(),
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("extra_ca_pem", &self.extra_ca_pem.as_ref().map(Vec::len))
            .field("allow_http", &self.allow_http)
            .field("endpoint_policy", &self.endpoint_policy)
            .field("request_timeout", &self.request_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "the extra CA certificates are not valid PEM: {cause}; pass the PEM file of the CA that signed the ACS endpoint's certificate"
    )]
    InvalidCaPem {
        cause: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "the extra CA file holds no PEM certificate; pass the PEM file of the CA that signed the ACS endpoint's certificate"
    )]
    EmptyCaPem,
    #[error("the connection string's endpoint `{0}` is not a valid URL")]
    InvalidEndpoint(String),
    #[error(
        "the connection string's endpoint host `{host}` is not an allowed ACS endpoint; if it is one, add it (or a domain it is under) to --acs-endpoint-suffixes (Helm value acsEndpointSuffixes)"
    )]
    EndpointNotAllowed { host: String },
    #[error(
        "the workload identity's authority host `{0}` is not an https URL without a path; use Entra's (https://login.microsoftonline.com) or your cloud's"
    )]
    InvalidAuthority(String),
    #[error(
        "the workload identity's authority host `{host}` is neither Entra ID's nor under --acs-endpoint-suffixes (Helm value acsEndpointSuffixes); use Entra's, or ask the cluster admin to add it"
    )]
    AuthorityNotAllowed { host: String },
    #[error("the workload identity is not usable: {0}")]
    InvalidWorkloadIdentity(String),
    #[error("could not set up the HTTPS client: {cause}")]
    HttpClient {
        cause: String,
        #[source]
        source: reqwest::Error,
    },
}

/// An identity `create_identity_with_token` made or found, with a fresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedIdentity {
    pub id: String,
    pub token: AccessToken,
    /// `true` for 201 (new), `false` for 200 (the customId already had this identity).
    pub created: bool,
}

/// A client of one ACS resource. Cheap to clone; clones share connections and rate limits.
#[derive(Clone)]
pub struct AcsClient {
    inner: Arc<Inner>,
    retry: RetryPolicy,
    /// The place its requests take in the endpoint's queues; without one, each request waits
    /// as a new one (class [`Class::New`]) for as long as it takes.
    place: Option<Arc<(Ticket, Turn)>>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    /// The authority as reqwest sends it in `Host` (the URL parser lower-cases it and drops a
    /// default port), which is what the service verifies the signature against.
    host: String,
    auth: Auth,
    api_version: ApiVersionState,
    request_timeout: Duration,
    limits: Arc<RateLimits>,
    observer: Arc<dyn Observer>,
}

/// How an [`AcsClient`] proves itself to ACS.
#[derive(Debug)]
pub enum Credential {
    /// Signs every request with the resource's access key (HMAC-SHA256).
    AccessKey(AccessKey),
    /// Sends a Microsoft Entra ID bearer token, exchanged for a federated token.
    WorkloadIdentity(WorkloadIdentity),
}

enum Auth {
    Key(AccessKey),
    Entra(EntraCredential),
}

/// What one attempt authenticates with: the key signs it (the signature covers its date), a
/// bearer token is got once per attempt before the budget is spent.
enum Presented<'a> {
    Signature(&'a AccessKey),
    Bearer(HeaderValue),
}

impl fmt::Debug for AcsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcsClient")
            .field("endpoint", &self.inner.base.as_str())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// What one operation sends, before an api-version is chosen: the body for versions with
/// `customId` and, for a create, the body without it for the others.
struct Planned {
    operation: Operation,
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    body_without_custom_id: Option<Vec<u8>>,
    success: &'static [StatusCode],
}

/// What one attempt sends, at one api-version.
struct Call {
    operation: Operation,
    method: Method,
    url: Url,
    /// The request-target exactly as sent, which is what is signed.
    target: String,
    body: Option<Vec<u8>>,
    success: &'static [StatusCode],
}

/// Characters kept as they are in a path segment: RFC 3986 unreserved, as the Python SDK's
/// `quote(id, safe='')` does, so `8:acs:x_y` goes out as `8%3Aacs%3Ax_y`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Whether the extra CA may vouch for `host`: not for Azure's own, publicly certified, hosts.
fn trusts_extra_ca(host: &str) -> bool {
    !is_azure_host(host)
}

/// The HTTPS client for one host (an ACS endpoint or an Entra authority): no redirects (one
/// could send a signed request, or a token, to any address the host names; neither ACS nor
/// Entra redirects), the extra CA only for hosts outside Azure.
fn http_client(
    url_host: &str,
    https_only: bool,
    options: &ClientOptions,
) -> Result<reqwest::Client, BuildError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("acs-identity-operator/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(options.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(https_only);
    if let Some(pem) = &options.extra_ca_pem {
        let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|source| {
            BuildError::InvalidCaPem {
                cause: root_cause(&source),
                source,
            }
        })?;
        if certificates.is_empty() {
            return Err(BuildError::EmptyCaPem);
        }
        // Added to, not instead of, the built-in web roots: a private endpoint may just as
        // well have a public certificate.
        if trusts_extra_ca(url_host) && !is_entra_authority(url_host) {
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
    }
    builder.build().map_err(|source| BuildError::HttpClient {
        cause: root_cause(&source),
        source,
    })
}

/// The Entra credential of `identity`, its authority checked as an endpoint is: https, no path
/// (the tenant follows the host), Entra's own or admitted by the endpoint policy.
fn entra_credential(
    identity: WorkloadIdentity,
    options: &ClientOptions,
) -> Result<EntraCredential, BuildError> {
    let echo = bounded_echo(&identity.authority_host, MAX_ENDPOINT_BYTES);
    let authority = Url::parse(&identity.authority_host)
        .ok()
        .filter(|url| url.scheme() == "https" && url.path() == "/" && url.query().is_none())
        .ok_or_else(|| BuildError::InvalidAuthority(echo))?;
    let host = authority.host_str().unwrap_or_default();
    if !is_entra_authority(host) && !options.endpoint_policy.admits(host) {
        return Err(BuildError::AuthorityNotAllowed {
            host: bounded_echo(host, MAX_ENDPOINT_BYTES),
        });
    }
    let http = http_client(host, true, options)?;
    EntraCredential::new(identity, &authority, http, options.request_timeout)
        .map_err(BuildError::InvalidWorkloadIdentity)
}

fn plan(
    operation: Operation,
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    success: &'static [StatusCode],
) -> Planned {
    Planned {
        operation,
        method,
        path,
        body,
        body_without_custom_id: None,
        success,
    }
}

/// `/identities/{id}{suffix}` with the id percent-encoded.
fn identity_path(id: &str, suffix: &str) -> String {
    format!("/identities/{}{suffix}", utf8_percent_encode(id, SEGMENT))
}

impl AcsClient {
    pub fn new(connection: ConnectionString, options: ClientOptions) -> Result<Self, BuildError> {
        let credential = Credential::AccessKey(connection.key);
        Self::with_credential(&connection.endpoint, credential, options)
    }

    /// A client of the ACS resource at `endpoint` (`https://…`, no trailing `/`).
    pub fn with_credential(
        endpoint: &str,
        credential: Credential,
        options: ClientOptions,
    ) -> Result<Self, BuildError> {
        let invalid = || BuildError::InvalidEndpoint(bounded_echo(endpoint, MAX_ENDPOINT_BYTES));
        let base = Url::parse(endpoint).map_err(|_| invalid())?;
        let url_host = base.host_str().ok_or_else(invalid)?;
        if !options.endpoint_policy.admits(url_host) {
            return Err(BuildError::EndpointNotAllowed {
                host: bounded_echo(url_host, MAX_ENDPOINT_BYTES),
            });
        }
        let host = match base.port() {
            Some(port) => format!("{url_host}:{port}"),
            None => url_host.to_owned(),
        };
        let http = http_client(url_host, !options.allow_http, &options)?;
        let auth = match credential {
            Credential::AccessKey(key) => Auth::Key(key),
            Credential::WorkloadIdentity(identity) => {
                Auth::Entra(entra_credential(identity, &options)?)
            }
        };
        let limits = options
            .rate_limits
            .unwrap_or_else(|| RateLimits::for_endpoint(endpoint, options.quota));
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                host,
                auth,
                api_version: ApiVersionState::new(options.api_version),
                request_timeout: options.request_timeout,
                limits,
                observer: options.observer,
            }),
            retry: options.retry,
            place: None,
        })
    }

    /// The same client (connections, limits) with another retry policy.
    pub fn with_retry_policy(&self, retry: RetryPolicy) -> Self {
        Self {
            retry,
            ..self.clone()
        }
    }

    /// The same client, its requests queued in `ticket`'s place: each waits at most
    /// [`crate::ratelimit::PATIENCE`] and then fails with [`Error::Queued`], `turn` being called
    /// when the slot is reserved for the key (the caller then sends the request again).
    pub fn with_ticket(&self, ticket: Ticket, turn: Turn) -> Self {
        Self {
            place: Some(Arc::new((ticket, turn))),
            ..self.clone()
        }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// The rate limits this client waits on.
    pub fn rate_limits(&self) -> &Arc<RateLimits> {
        &self.inner.limits
    }

    /// Waits, in this client's place (see [`AcsClient::with_ticket`]), until a request of
    /// `operation` may go out, and keeps that slot reserved for the request that follows: so a
    /// caller writes what must precede the request only once it can be sent. Fails with
    /// [`Error::Queued`] as the request would; without a place there is nothing to hold.
    pub async fn reserve(&self, operation: Operation) -> Result<(), Error> {
        let Some((ticket, turn)) = self.place.as_deref() else {
            return Ok(());
        };
        Ok(self
            .inner
            .limits
            .reserve(operation, ticket, Some(turn))
            .await?)
    }

    /// `POST /identities` with a `customId`: creates the identity (201) or finds the one that
    /// customId already has (200), and issues a token either way.
    pub async fn create_identity_with_token(
        &self,
        custom_id: &str,
        scopes: &[String],
        expires_in_minutes: u32,
    ) -> Result<CreatedIdentity, Error> {
        let mut body = CreateIdentityRequest {
            create_token_with_scopes: Some(scopes.to_vec()),
            expires_in_minutes: Some(expires_in_minutes),
            custom_id: Some(custom_id.to_owned()),
        };
        let with_custom_id = json(&body);
        body.custom_id = None;
        let call = Planned {
            body_without_custom_id: Some(json(&body)),
            ..plan(
                Operation::CreateIdentity,
                Method::POST,
                "/identities".to_owned(),
                Some(with_custom_id),
                &[StatusCode::CREATED, StatusCode::OK],
            )
        };
        let (status, bytes) = self.execute(&call).await?;
        let response: CreateIdentityResponse = decode(call.operation, status, &bytes)?;
        let token = response
            .access_token
            .ok_or_else(|| Error::UnexpectedResponse {
                operation: call.operation,
                status: status.as_u16(),
                detail: "the answer carries no accessToken although scopes were requested".into(),
            })?;
        Ok(CreatedIdentity {
            id: response.identity.id,
            token,
            created: status == StatusCode::CREATED,
        })
    }

    /// `POST /identities/{id}/:issueAccessToken`.
    pub async fn issue_token(
        &self,
        id: &str,
        scopes: &[String],
        expires_in_minutes: u32,
    ) -> Result<AccessToken, Error> {
        let body = IssueTokenRequest {
            scopes: scopes.to_vec(),
            expires_in_minutes: Some(expires_in_minutes),
        };
        let call = plan(
            Operation::IssueToken,
            Method::POST,
            identity_path(id, "/:issueAccessToken"),
            Some(json(&body)),
            &[StatusCode::OK],
        );
        let (status, bytes) = self.execute(&call).await?;
        decode(call.operation, status, &bytes)
    }

    /// `POST /identities/{id}/:revokeAccessTokens`: every token issued so far stops working.
    pub async fn revoke_tokens(&self, id: &str) -> Result<(), Error> {
        // An empty body with Content-Type, as the SDK sends it.
        let call = plan(
            Operation::RevokeTokens,
            Method::POST,
            identity_path(id, "/:revokeAccessTokens"),
            Some(Vec::new()),
            &[StatusCode::NO_CONTENT],
        );
        self.execute(&call).await.map(drop)
    }

    /// `DELETE /identities/{id}`: deletes the identity, its tokens and its data. An identity that
    /// is already gone is [`Error::NotFound`], which a caller cleaning up treats as done.
    pub async fn delete_identity(&self, id: &str) -> Result<(), Error> {
        let call = plan(
            Operation::DeleteIdentity,
            Method::DELETE,
            identity_path(id, ""),
            None,
            &[StatusCode::NO_CONTENT],
        );
        self.execute(&call).await.map(drop)
    }

    /// `GET /identities/{id}` (preview): the identity's customId and last token issue time;
    /// `None` when the api-version in use has no such operation (the GA versions).
    pub async fn get_identity(&self, id: &str) -> Result<Option<IdentityDetails>, Error> {
        if !serves(Operation::GetIdentity, self.api_version()) {
            return Ok(None);
        }
        let call = plan(
            Operation::GetIdentity,
            Method::GET,
            identity_path(id, ""),
            None,
            &[StatusCode::OK],
        );
        match self.execute(&call).await {
            Ok((status, bytes)) => decode(call.operation, status, &bytes).map(Some),
            // The service refused the preview during this call: the GA version it fell back
            // to has no GET to ask.
            Err(_) if !serves(Operation::GetIdentity, self.api_version()) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Proves the credentials with a request that changes nothing: revoking the tokens of an
    /// identity that cannot exist. ACS authenticates before it looks the identity up, so its
    /// 404 says the credentials were accepted (and a retired api-version shows, and is fallen
    /// back from, here as on any call).
    pub async fn verify(&self) -> Result<(), Error> {
        const NO_SUCH_IDENTITY: &str = "8:acs:00000000-0000-0000-0000-000000000000_verification";
        match self.revoke_tokens(NO_SUCH_IDENTITY).await {
            Ok(()) | Err(Error::NotFound(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The api-version requests go out with now.
    pub fn api_version(&self) -> &'static str {
        self.inner.api_version.current()
    }

    /// Whether a create is exactly-once (the api-version in use has `customId`): a create
    /// retried after a lost answer, or after a crash, finds the identity the first one made.
    pub fn creates_exactly_once(&self) -> bool {
        has_custom_id(self.api_version())
    }

    /// `planned` at `version`.
    fn call(&self, planned: &Planned, version: &'static str) -> Call {
        let mut url = self.inner.base.clone();
        url.set_path(&planned.path);
        url.set_query(Some(&format!("api-version={version}")));
        // Sign what the URL serialises to, not the string we built: the parser may normalise it.
        let target = format!("{}?{}", url.path(), url.query().unwrap_or_default());
        let body = match (has_custom_id(version), &planned.body_without_custom_id) {
            (false, Some(without)) => Some(without.clone()),
            _ => planned.body.clone(),
        };
        Call {
            operation: planned.operation,
            method: planned.method.clone(),
            url,
            target,
            body,
            success: planned.success,
        }
    }

    /// Sends `call` until it succeeds or the retry policy gives up, waiting for the rate
    /// limiter before every attempt (retries count against the service's limits too).
    async fn execute(&self, planned: &Planned) -> Result<(StatusCode, Vec<u8>), Error> {
        let operation = planned.operation;
        let mut first_attempt = None;
        let mut last_error = None;
        let mut retry = 0;
        let anonymous;
        let (ticket, turn) = match self.place.as_deref() {
            Some((ticket, turn)) => (ticket, Some(turn)),
            None => {
                anonymous = anonymous_ticket();
                (&anonymous, None)
            }
        };
        loop {
            // Before the budget: a token Entra will not give costs ACS nothing.
            let presented = match &self.inner.auth {
                Auth::Key(key) => Presented::Signature(key),
                Auth::Entra(credential) => Presented::Bearer(credential.authorization().await?),
            };
            let mut permit = self.inner.limits.acquire(operation, ticket, turn).await?;
            let observer = &self.inner.observer;
            observer.on_rate_limit_wait(operation, permit.waited);
            if let Some(came_back_after) = permit.came_back_after {
                observer.on_called_back(operation, came_back_after);
            }
            let started = *first_attempt.get_or_insert_with(Instant::now);
            let Some(timeout) = self
                .retry
                .attempt_timeout(self.inner.request_timeout, started.elapsed())
            else {
                return Err(last_error.unwrap_or(Error::Timeout {
                    after: Duration::ZERO,
                }));
            };
            let version = self.api_version();
            let call = self.call(planned, version);
            let outcome = self.attempt(&call, timeout, presented).await;
            permit.answered(circuit_answer(&outcome));
            // Answered (or given up on): from now on it counts in the window's log.
            drop(permit);
            let error = match outcome {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            if error.is_unsupported_api_version() && self.inner.api_version.fall_back_from(version)
            {
                tracing::warn!(
                    from = version,
                    to = self.api_version(),
                    "ACS refused the api-version; falling back"
                );
                self.inner
                    .observer
                    .on_api_version_fallback(version, self.api_version());
                if serves(operation, self.api_version()) {
                    continue;
                }
                return Err(error);
            }
            if operation == Operation::CreateIdentity
                && !has_custom_id(version)
                && error.is_lost_answer()
            {
                self.inner.observer.on_possible_orphan();
            }
            let Some(delay) =
                self.retry
                    .delay_for(&error, retry, started.elapsed(), rand::random::<f64>())
            else {
                return Err(error);
            };
            tracing::debug!(
                operation = operation.as_str(),
                error = error.metric_label(),
                retry,
                delay_ms = delay.as_millis() as u64,
                "retrying ACS request"
            );
            // With the circuit open, a caller that can be called back waits for the probe in the
            // queue instead: the queue paces its retry.
            if turn.is_none() || !self.inner.limits.circuit_open() {
                tokio::time::sleep(delay).await;
            }
            last_error = Some(error);
            retry += 1;
        }
    }

    /// One HTTP exchange, signed with the key or carrying the bearer token.
    async fn attempt(
        &self,
        call: &Call,
        timeout: Duration,
        presented: Presented<'_>,
    ) -> Result<(StatusCode, Vec<u8>), Error> {
        let inner = &*self.inner;
        let mut request = inner
            .http
            .request(call.method.clone(), call.url.clone())
            .timeout(timeout)
            .header(ACCEPT, "application/json");
        let with_bearer = matches!(presented, Presented::Bearer(_));
        request = match presented {
            Presented::Bearer(bearer) => request.header(AUTHORIZATION, bearer),
            Presented::Signature(key) => {
                let body = call.body.as_deref().unwrap_or_default();
                let signed = signing::sign_request(
                    key,
                    call.method.as_str(),
                    &call.target,
                    &inner.host,
                    &signing::http_date(jiff::Timestamp::now()),
                    body,
                );
                let mut authorization =
                    HeaderValue::from_str(&signed.authorization).expect("base64 and ASCII only");
                authorization.set_sensitive(true);
                request
                    .header("x-ms-date", signed.date)
                    .header("x-ms-content-sha256", signed.content_hash)
                    .header(AUTHORIZATION, authorization)
            }
        };
        if let Some(body) = &call.body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }

        let start = Instant::now();
        let exchange = async {
            let mut response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = read_capped(&mut response).await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        }
        .await;
        let duration = start.elapsed();

        let (status, headers, bytes) = match exchange {
            Ok(answer) => answer,
            Err(source) => {
                let (error, outcome) = if source.is_timeout() {
                    (Error::Timeout { after: timeout }, RequestOutcome::Timeout)
                } else {
                    let error = Error::Connection {
                        endpoint: bounded_echo(
                            inner.base.as_str().trim_end_matches('/'),
                            MAX_ENDPOINT_BYTES,
                        ),
                        cause: root_cause(&source),
                        source,
                    };
                    (error, RequestOutcome::Connection)
                };
                inner.observer.on_request(call.operation, outcome, duration);
                return Err(error);
            }
        };
        inner.observer.on_request(
            call.operation,
            RequestOutcome::Status(status.as_u16()),
            duration,
        );
        let Some(bytes) = bytes else {
            return Err(Error::AnswerTooLarge {
                operation: call.operation,
                status: status.as_u16(),
            });
        };
        if call.success.contains(&status) {
            return Ok((status, bytes));
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            inner.observer.on_throttled(call.operation);
        }
        Err(match classify(call, status, &headers, &bytes) {
            Error::Unauthorized(error) if with_bearer => Error::TokenRejected(error),
            other => other,
        })
    }
}

/// A place for a request that came without one: new, due now, a key of its own.
fn anonymous_ticket() -> Ticket {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = jiff::Timestamp::now();
    Ticket {
        class: Class::New,
        deadline: now,
        tenant: String::new(),
        key: format!("#anonymous-{number}"),
        asked_at: now,
    }
}

/// What an exchange tells the endpoint's circuit: an answer that is no answer (nothing came
/// back, a 5xx, a body far too large) is an outage; any other answer shows the endpoint up.
fn circuit_answer<T>(outcome: &Result<T, Error>) -> Answer {
    match outcome {
        Ok(_) => Answer::Success,
        Err(
            Error::Timeout { .. }
            | Error::Connection { .. }
            | Error::Unavailable(_)
            | Error::AnswerTooLarge { .. },
        ) => Answer::Outage,
        Err(_) => Answer::Refused,
    }
}

fn json<T: serde::Serialize>(body: &T) -> Vec<u8> {
    serde_json::to_vec(body).expect("wire types always serialise")
}

/// Parses a success body. The serde message is left out: it can quote the body, which may
/// hold a token.
fn decode<T: DeserializeOwned>(
    operation: Operation,
    status: StatusCode,
    bytes: &[u8],
) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|error| Error::UnexpectedResponse {
        operation,
        status: status.as_u16(),
        detail: format!(
            "the body is not the expected JSON ({:?} error at line {} column {})",
            error.classify(),
            error.line(),
            error.column()
        ),
    })
}

/// The typed error of a non-success answer.
fn classify(call: &Call, status: StatusCode, headers: &HeaderMap, bytes: &[u8]) -> Error {
    let from_body = service_error_in(status, bytes);
    let service = || {
        from_body.clone().unwrap_or_else(|| ServiceError {
            status: status.as_u16(),
            code: status.canonical_reason().unwrap_or("Unknown").to_owned(),
            message: no_error_body(headers, bytes),
        })
    };
    match status {
        StatusCode::BAD_REQUEST => Error::BadRequest(service()),
        StatusCode::UNAUTHORIZED => Error::Unauthorized(service()),
        StatusCode::NOT_FOUND => Error::NotFound(service()),
        StatusCode::TOO_MANY_REQUESTS => Error::Throttled {
            error: service(),
            retry_after: retry::retry_after(headers, jiff::Timestamp::now()),
        },
        status if status.is_server_error() => Error::Unavailable(service()),
        status if status.is_redirection() => Error::UnexpectedResponse {
            operation: call.operation,
            status: status.as_u16(),
            detail: format!(
                "a redirect{}, which is not followed: put the ACS endpoint itself in the connection string",
                redirect_target(&call.url, headers)
            ),
        },
        _ => {
            let expected: Vec<_> = call.success.iter().map(StatusCode::as_str).collect();
            let got = match &from_body {
                Some(error) => format!("{}: {}", error.code, error.message),
                None => no_error_body(headers, bytes),
            };
            Error::UnexpectedResponse {
                operation: call.operation,
                status: status.as_u16(),
                detail: format!("expected HTTP {}; {got}", expected.join(" or ")),
            }
        }
    }
}

/// The ACS error body in `bytes`, if it is one: the only place the service's words enter an
/// error, so the only place they are bounded.
fn service_error_in(status: StatusCode, bytes: &[u8]) -> Option<ServiceError> {
    let body = serde_json::from_slice::<ErrorResponse>(bytes).ok()?;
    Some(ServiceError {
        status: status.as_u16(),
        code: bounded_echo(&body.error.code, MAX_CODE_BYTES),
        message: bounded_echo(&body.error.message, MAX_MESSAGE_BYTES),
    })
}

/// ` to <scheme>://<host>` of a redirect's Location, bounded; the path and query are left out
/// (they may be long or carry anything).
fn redirect_target(from: &Url, headers: &HeaderMap) -> String {
    let target = headers
        .get(LOCATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|location| from.join(location).ok());
    match target
        .as_ref()
        .and_then(|url| Some((url.scheme(), url.host_str()?)))
    {
        Some((scheme, host)) => format!(
            " to {}",
            bounded_echo(&format!("{scheme}://{host}"), MAX_ENDPOINT_BYTES)
        ),
        None => String::new(),
    }
}

/// Describes a body that is not an ACS error without quoting it (a proxy's HTML page, or a
/// success body that could hold a token).
fn no_error_body(headers: &HeaderMap, bytes: &[u8]) -> String {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map_or_else(
            || "no content type".to_owned(),
            |value| bounded_echo(value, MAX_CONTENT_TYPE_BYTES),
        );
    format!(
        "the answer carries no ACS error body ({content_type}, {} bytes)",
        bytes.len()
    )
}

/// Longest Content-Type echoed: real ones are like `application/json; charset=utf-8`.
const MAX_CONTENT_TYPE_BYTES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_percent_encoded_in_paths() {
        let cases = [
            ("8:acs:x_y", "", "/identities/8%3Aacs%3Ax_y"),
            (
                "8:acs:0e3c-4f_00000021",
                "/:issueAccessToken",
                "/identities/8%3Aacs%3A0e3c-4f_00000021/:issueAccessToken",
            ),
            ("a/b?c#d e", "", "/identities/a%2Fb%3Fc%23d%20e"),
            ("x.y~z", "", "/identities/x.y~z"),
        ];
        for (id, suffix, expected) in cases {
            assert_eq!(identity_path(id, suffix), expected, "{id}");
        }
    }

    #[test]
    fn the_signed_target_is_the_one_sent() {
        let connection = ConnectionString::parse(
            "endpoint=https://R.communication.azure.com:443/;accesskey=a2V5",
            false,
        )
        .unwrap();
        let client = AcsClient::new(connection, ClientOptions::default()).unwrap();
        assert_eq!(client.inner.host, "r.communication.azure.com");
        let planned = plan(
            Operation::IssueToken,
            Method::POST,
            identity_path("8:acs:x_y", "/:issueAccessToken"),
            None,
            &[StatusCode::OK],
        );
        let call = client.call(&planned, client.api_version());
        assert_eq!(
            call.target,
            "/identities/8%3Aacs%3Ax_y/:issueAccessToken?api-version=2025-03-02-preview"
        );
        assert_eq!(
            call.url.as_str(),
            format!("https://r.communication.azure.com{}", call.target)
        );
    }

    fn call_expecting(success: &'static [StatusCode]) -> Call {
        Call {
            operation: Operation::IssueToken,
            method: Method::POST,
            url: Url::parse("https://r.communication.azure.com/identities").unwrap(),
            target: "/identities".into(),
            body: None,
            success,
        }
    }

    #[test]
    fn service_words_are_bounded_however_long() {
        let megabyte = "m".repeat(1 << 20);
        let body = serde_json::to_vec(&ErrorResponse::new(megabyte.clone(), megabyte)).unwrap();
        let headers = HeaderMap::new();
        for status in [400, 401, 404, 429, 503, 409] {
            let status = StatusCode::from_u16(status).unwrap();
            let error = classify(&call_expecting(&[StatusCode::OK]), status, &headers, &body);
            let text = error.to_string();
            assert!(text.len() < 600, "{status}: {} bytes", text.len());
            assert!(text.contains("mmm…"), "{text}");
        }
        let error = classify(
            &call_expecting(&[StatusCode::OK]),
            StatusCode::BAD_REQUEST,
            &headers,
            &body,
        );
        let service = error.service_error().unwrap();
        assert_eq!(service.code.len(), MAX_CODE_BYTES + '…'.len_utf8());
        assert_eq!(service.message.len(), MAX_MESSAGE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn a_foreign_content_type_is_bounded() {
        let mut headers = HeaderMap::new();
        let long = format!("text/html; {}", "x".repeat(10_000));
        headers.insert(CONTENT_TYPE, HeaderValue::from_str(&long).unwrap());
        let text = no_error_body(&headers, b"<html>");
        assert!(text.len() < 150, "{text}");
        assert!(text.starts_with("the answer carries no ACS error body (text/html; xxx"));
    }

    #[test]
    fn a_redirect_names_only_its_target_origin() {
        let from = Url::parse("https://r.communication.azure.com/identities").unwrap();
        let location = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(LOCATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        let cases = [
            (
                location("https://Trap.example:8443/steal?token=secret"),
                " to https://trap.example",
            ),
            (
                location("/elsewhere?x=1"),
                " to https://r.communication.azure.com",
            ),
            (location("http://[::1]:1/"), " to http://[::1]"),
            (HeaderMap::new(), ""),
        ];
        for (headers, expected) in cases {
            assert_eq!(redirect_target(&from, &headers), expected, "{headers:?}");
        }
        let long = location(&format!("https://{}.example/", "a".repeat(10_000)));
        assert!(redirect_target(&from, &long).len() < MAX_ENDPOINT_BYTES + 10);
    }

    #[test]
    fn the_extra_ca_vouches_only_for_hosts_outside_azure() {
        for host in [
            "r.communication.azure.com",
            "R.COMMUNICATION.AZURE.US",
            "r.communication.azure.cn",
        ] {
            assert!(!trusts_extra_ca(host), "{host}");
        }
        for host in [
            "127.0.0.1",
            "localhost",
            "acs-emulator.acs-system.svc",
            "evilcommunication.azure.com",
        ] {
            assert!(trusts_extra_ca(host), "{host}");
        }
    }
}

/// Whatever an endpoint answers, classifying and decoding it neither panics nor echoes more
/// than a bounded text, and no Retry-After exceeds [`crate::MAX_RETRY_AFTER`].
#[cfg(test)]
mod answer_properties {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, RngSeed};

    use super::*;
    use crate::retry::MAX_RETRY_AFTER;
    use crate::wire::IdentityDetails;

    /// Display texts end up in conditions and Events; a KiB is far more than any needs.
    const MAX_DISPLAY_BYTES: usize = 1024;

    const HEADER_NAMES: [&str; 6] = [
        "retry-after",
        "retry-after-ms",
        "x-ms-retry-after-ms",
        "content-type",
        "location",
        "x-ms-error-code",
    ];

    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "[0-9]{1,40}".prop_map(String::into_bytes),
            "-?[0-9]{0,20}(\\.[0-9]{0,5})?[ a-z]{0,3}".prop_map(String::into_bytes),
            "(Mon|Thu|Fri|Sun), [0-9]{1,2} (Jan|Feb|Dec) [0-9]{1,6} [0-9]{2}:[0-9]{2}:[0-9]{2} (GMT|UTC|\\+0100)"
                .prop_map(String::into_bytes),
            ("\\PC{0,40}", 1..400usize).prop_map(|(piece, times)| piece.repeat(times).into_bytes()),
            vec(any::<u8>(), 0..200),
        ]
    }

    fn headers() -> impl Strategy<Value = HeaderMap> {
        vec((0..HEADER_NAMES.len(), header_value()), 0..6).prop_map(|pairs| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                // What reqwest could have received: values a client accepts.
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    headers.append(HEADER_NAMES[name], value);
                }
            }
            headers
        })
    }

    /// Text up to `MAX_ANSWER_BYTES`-ish: a short arbitrary piece, repeated.
    fn long_text() -> impl Strategy<Value = String> {
        (any::<String>(), 0..3000usize).prop_map(|(piece, times)| {
            let piece: String = piece.chars().take(20).collect();
            piece.repeat(times)
        })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            vec(any::<u8>(), 0..512),
            (long_text(), long_text()).prop_map(|(code, message)| {
                serde_json::json!({"error": {"code": code, "message": message, "details": [{"code": "x", "message": "y"}]}})
                    .to_string()
                    .into_bytes()
            }),
            (long_text(), long_text()).prop_map(|(token, expires_on)| {
                serde_json::json!({"identity": {"id": token}, "accessToken": {"token": token, "expiresOn": expires_on}})
                    .to_string()
                    .into_bytes()
            }),
            Just(b"{\"error\":{\"code\":1,\"message\":null}}".to_vec()),
            Just(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec()),
        ]
    }

    fn deterministic() -> Config {
        Config {
            cases: 96,
            rng_algorithm: RngAlgorithm::ChaCha,
            rng_seed: RngSeed::Fixed(0x0ac5_1de7),
            failure_persistence: None,
            ..Config::default()
        }
    }

    fn assert_bounded(error: &Error) -> Result<(), TestCaseError> {
        let text = error.to_string();
        prop_assert!(
            text.len() < MAX_DISPLAY_BYTES,
            "{} bytes: {text}",
            text.len()
        );
        prop_assert!(!text.chars().any(char::is_control), "{text:?}");
        prop_assert!(
            error
                .retry_after()
                .is_none_or(|after| after <= MAX_RETRY_AFTER)
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(deterministic())]

        #[test]
        fn any_answer_classifies_and_decodes_bounded(
            status in 100u16..=999,
            headers in headers(),
            body in body(),
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let call = Call {
                operation: Operation::CreateIdentity,
                method: Method::POST,
                url: Url::parse("https://r.communication.azure.com/identities").unwrap(),
                target: "/identities".into(),
                body: None,
                success: &[StatusCode::CREATED, StatusCode::OK],
            };
            assert_bounded(&classify(&call, status, &headers, &body))?;
            let after = retry::retry_after(&headers, jiff::Timestamp::now());
            prop_assert!(after.is_none_or(|after| after <= MAX_RETRY_AFTER));
            let operation = call.operation;
            if let Err(error) = decode::<CreateIdentityResponse>(operation, status, &body) {
                assert_bounded(&error)?;
            }
            if let Err(error) = decode::<AccessToken>(operation, status, &body) {
                assert_bounded(&error)?;
            }
            if let Err(error) = decode::<IdentityDetails>(operation, status, &body) {
                assert_bounded(&error)?;
            }
        }
    }
}
