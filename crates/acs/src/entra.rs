//! Microsoft Entra ID bearer tokens for ACS (workload identity): a federated token (a
//! Kubernetes ServiceAccount token) is exchanged at `{authority}/{tenant}/oauth2/v2.0/token`
//! for an access token of scope [`ACS_SCOPE`], which then authenticates every ACS request
//! instead of the HMAC signature.
//!
//! The exchange and its cache (renewed five minutes before expiry) are Microsoft's
//! `azure_identity::ClientAssertionCredential`. Its HTTP goes through [`BoundedTransport`], not
//! azure_core's default reqwest client: an authority host may be named by a tenant, so its
//! answers get the same bounds as an ACS endpoint's (no redirects, a timeout, a body cap, the
//! private CA only for hosts outside Azure), and azure_core's own retries are off (the
//! operator's backoff paces them).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::headers::{HeaderName, HeaderValue as AzureHeaderValue, Headers};
use azure_core::http::{
    AsyncRawResponse, Body, ClientMethodOptions, ClientOptions, HttpClient, Method, Request,
    RetryOptions, Transport,
};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
};
use reqwest::Url;
use reqwest::header::HeaderValue;

use crate::body::read_capped;
use crate::error::{Error, MAX_ENDPOINT_BYTES, MAX_MESSAGE_BYTES, bounded_echo, root_cause};

/// The scope of a token for the ACS data plane, as Microsoft's SDKs ask for it (the resource
/// `https://communication.azure.com/` and `/.default`).
pub const ACS_SCOPE: &str = "https://communication.azure.com//.default";
/// Entra's public-cloud authority, the default.
pub const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The audience Entra expects of a federated token unless the federated credential says
/// otherwise.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Entra's authorities in Azure's clouds: admitted whatever `--acs-endpoint-suffixes` says.
const ENTRA_AUTHORITY_HOSTS: &[&str] = &[
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
];

/// Supplies the federated token presented to Entra (the client assertion): read from a
/// projected token file, or requested from the API server for a ServiceAccount.
#[async_trait::async_trait]
pub trait FederatedToken: Send + Sync {
    /// A current token, or what kept it (a bounded phrase without the token).
    async fn token(&self) -> Result<String, String>;
}

/// An Entra application (tenant and client id) that trusts a federated token.
#[derive(Clone)]
pub struct WorkloadIdentity {
    pub tenant_id: String,
    pub client_id: String,
    /// `https://host[:port]`, no path: the tenant is the first path segment under it.
    pub authority_host: String,
    pub federated_token: Arc<dyn FederatedToken>,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("authority_host", &self.authority_host)
            .finish_non_exhaustive()
    }
}

/// Whether `host` is one of Entra's own authorities.
pub fn is_entra_authority(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    ENTRA_AUTHORITY_HOSTS.contains(&host.as_str())
}

/// The credential an [`crate::AcsClient`] authenticates with under workload identity.
pub(crate) struct EntraCredential {
    credential: Arc<ClientAssertionCredential<Assertion>>,
    /// The authority as messages name it.
    authority: String,
}

impl EntraCredential {
    /// `http` is the bounded client for the authority (no redirects, the private CA only
    /// outside Azure).
    pub(crate) fn new(
        identity: WorkloadIdentity,
        authority: &Url,
        http: reqwest::Client,
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = cloud_authority(authority).to_owned();
        let client_options = ClientOptions {
            transport: Some(Transport::new(Arc::new(BoundedTransport { http, timeout }))),
            retry: RetryOptions::none(),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..ClientOptions::default()
        };
        let credential = ClientAssertionCredential::new(
            identity.tenant_id,
            identity.client_id,
            Assertion(identity.federated_token),
            Some(ClientAssertionCredentialOptions { client_options }),
        )
        .map_err(|error| bounded_echo(&error.to_string(), MAX_MESSAGE_BYTES))?;
        Ok(Self {
            credential,
            authority: bounded_echo(cloud_authority(authority), MAX_ENDPOINT_BYTES),
        })
    }

    /// `Bearer {token}`, marked sensitive, from the cache or a fresh exchange.
    pub(crate) async fn authorization(&self) -> Result<HeaderValue, Error> {
        let token = self
            .credential
            .get_token(&[ACS_SCOPE], None)
            .await
            .map_err(|error| self.classify(&error))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.token.secret()))
            .map_err(|_| Error::EntraRefused {
                status: 200,
                codes: String::new(),
                description: "the access token is not a valid header value".to_owned(),
            })?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// What a failed exchange means. `azure_identity` wraps the exchange's error in one of its
    /// own; the inner one says whether Entra answered, the transport failed or the federated
    /// token could not be had.
    fn classify(&self, error: &azure_core::Error) -> Error {
        let inner = (error.get_ref())
            .and_then(|inner| inner.downcast_ref::<azure_core::Error>())
            .unwrap_or(error);
        if let Some(FederatedTokenMissing(cause)) = inner
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<FederatedTokenMissing>())
        {
            return Error::FederatedTokenUnavailable {
                cause: cause.clone(),
            };
        }
        match inner.kind() {
            ErrorKind::HttpResponse {
                status, error_code, ..
            } if u16::from(*status) < 500 => Error::EntraRefused {
                status: u16::from(*status),
                codes: (error_code.as_deref())
                    .map(|codes| codes.split(',').map(|code| format!("AADSTS{code}")))
                    .map(|codes| codes.collect::<Vec<_>>().join(","))
                    .map(|codes| bounded_echo(&codes, MAX_ENDPOINT_BYTES))
                    .unwrap_or_default(),
                description: without_tokens(&bounded_echo(&inner.to_string(), MAX_MESSAGE_BYTES)),
            },
            ErrorKind::HttpResponse { status, .. } => Error::EntraUnavailable {
                authority: self.authority.clone(),
                cause: format!("HTTP {}", u16::from(*status)),
            },
            _ => Error::EntraUnavailable {
                authority: self.authority.clone(),
                cause: without_tokens(&bounded_echo(&root_message(inner), MAX_MESSAGE_BYTES)),
            },
        }
    }
}

fn cloud_authority(url: &Url) -> &str {
    url.as_str().trim_end_matches('/')
}

/// The innermost message of an azure_core error (the transport's own words).
fn root_message(error: &azure_core::Error) -> String {
    match error.get_ref() {
        Some(inner) => root_cause(inner),
        None => error.to_string(),
    }
}

/// `text` with every JWT-shaped word (three base64url parts joined by dots) replaced: an
/// authority's error text may quote the assertion it was given, which must not reach a status.
pub(crate) fn without_tokens(text: &str) -> String {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest.find(is_token_char).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(|c| !is_token_char(c)).unwrap_or(rest.len());
        let word = &rest[..end];
        let parts: Vec<&str> = word.split('.').collect();
        let jwt_shaped = parts.len() == 3 && parts[0].len() >= 8 && parts[1].len() >= 8;
        out.push_str(if jwt_shaped { "<redacted>" } else { word });
        rest = &rest[end..];
    }
    out
}

/// The federated token as `azure_identity` asks for it.
struct Assertion(Arc<dyn FederatedToken>);

impl fmt::Debug for Assertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Assertion(<federated token>)")
    }
}

/// Why the federated token could not be had, carried through azure_core's error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FederatedTokenMissing(String);

#[async_trait::async_trait]
impl ClientAssertion for Assertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        self.0.token().await.map_err(|cause| {
            azure_core::Error::new(ErrorKind::Credential, FederatedTokenMissing(cause))
        })
    }
}

/// azure_core's HTTP through the operator's bounded reqwest client.
#[derive(Debug)]
struct BoundedTransport {
    http: reqwest::Client,
    timeout: Duration,
}

/// A transport failure, in words that never quote a body.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportFailure(String);

#[async_trait::async_trait]
impl HttpClient for BoundedTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let method = match request.method() {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            other => {
                let failure = TransportFailure(format!("unexpected method {other:?}"));
                return Err(azure_core::Error::new(ErrorKind::Other, failure));
            }
        };
        let mut outgoing = (self.http)
            .request(method, request.url().as_str())
            .timeout(self.timeout);
        for (name, value) in request.headers().iter() {
            outgoing = outgoing.header(name.as_str(), value.as_str());
        }
        if let Body::Bytes(bytes) = request.body() {
            outgoing = outgoing.body(bytes.to_vec());
        }
        let failed =
            |cause: String| azure_core::Error::new(ErrorKind::Connection, TransportFailure(cause));
        let mut response = outgoing
            .send()
            .await
            .map_err(|error| failed(transport_cause(&error, self.timeout)))?;
        let status = response.status().as_u16();
        let headers = response_headers(response.headers());
        let body = read_capped(&mut response)
            .await
            .map_err(|error| failed(transport_cause(&error, self.timeout)))?
            .ok_or_else(|| {
                failed(format!(
                    "its answer (HTTP {status}) exceeded {} KiB, far more than any token answer",
                    crate::MAX_ANSWER_BYTES / 1024
                ))
            })?;
        if (300..400).contains(&status) {
            return Err(failed(format!(
                "it answered with a redirect (HTTP {status}), which is not followed"
            )));
        }
        if (200..300).contains(&status) && !expires_in_plausible(&body) {
            return Err(failed(format!(
                "its token answer's expires_in is not a number of seconds from 0 to {MAX_EXPIRES_IN_SECONDS}"
            )));
        }
        Ok(AsyncRawResponse::from_bytes(status.into(), headers, body))
    }
}

/// The longest `expires_in` taken from an authority: a week, beyond any Entra token's day.
const MAX_EXPIRES_IN_SECONDS: i64 = 7 * 24 * 60 * 60;

/// Whether a token answer's `expires_in`, if it is an integer, is one `azure_identity` can add
/// to the current time: it adds it unchecked, and a value far out of range (a hostile
/// authority's `9223372036854775807`) would panic there. Anything else that is wrong with the
/// answer is left to its parser, which fails without panicking.
fn expires_in_plausible(body: &[u8]) -> bool {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else {
        return true;
    };
    match answer.get("expires_in").and_then(serde_json::Value::as_i64) {
        Some(seconds) => (0..=MAX_EXPIRES_IN_SECONDS).contains(&seconds),
        None => true,
    }
}

fn transport_cause(error: &reqwest::Error, timeout: Duration) -> String {
    match error.is_timeout() {
        true => format!("no answer within {timeout:?}"),
        false => root_cause(error),
    }
}

/// The headers azure_core looks at; a value that is not text is left out.
fn response_headers(headers: &reqwest::header::HeaderMap) -> Headers {
    let map: HashMap<HeaderName, AzureHeaderValue> = headers
        .iter()
        .filter_map(|(name, value)| {
            let value = value.to_str().ok()?;
            Some((
                HeaderName::from(name.as_str().to_owned()),
                AzureHeaderValue::from(value.to_owned()),
            ))
        })
        .collect();
    Headers::from(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shaped_words_are_redacted_from_echoed_text() {
        let cases = [
            (
                "plain text",
                "AADSTS700016: app not found",
                "AADSTS700016: app not found",
            ),
            (
                "a token",
                "bad assertion eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJodHRwcyJ9.c2lnbmF0dXJl here",
                "bad assertion <redacted> here",
            ),
            (
                "a host name",
                "login.microsoftonline.com",
                "login.microsoftonline.com",
            ),
            ("a version", "v2.0.1 of it", "v2.0.1 of it"),
            (
                "an unsigned token",
                "got eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
                "got <redacted>",
            ),
        ];
        for (name, text, expected) in cases {
            assert_eq!(without_tokens(text), expected, "{name}");
        }
    }

    #[test]
    fn only_an_expiry_that_can_be_added_to_now_passes() {
        let cases = [
            ("an hour", r#"{"expires_in":3599,"access_token":"t"}"#, true),
            ("zero", r#"{"expires_in":0}"#, true),
            (
                "the largest integer",
                r#"{"expires_in":9223372036854775807}"#,
                false,
            ),
            (
                "the smallest",
                r#"{"expires_in":-9223372036854775808}"#,
                false,
            ),
            ("over a week", r#"{"expires_in":604801}"#, false),
            (
                "absent: the parser refuses it",
                r#"{"access_token":"t"}"#,
                true,
            ),
            (
                "a string: the parser refuses it",
                r#"{"expires_in":"3599"}"#,
                true,
            ),
            ("not JSON: the parser refuses it", "<html>", true),
        ];
        for (name, body, expected) in cases {
            assert_eq!(expires_in_plausible(body.as_bytes()), expected, "{name}");
        }
    }

    #[test]
    fn entra_authorities_are_known_by_host() {
        assert!(is_entra_authority("login.microsoftonline.com"));
        assert!(is_entra_authority("LOGIN.microsoftonline.us."));
        assert!(!is_entra_authority(
            "login.microsoftonline.com.evil.example"
        ));
        assert!(!is_entra_authority("127.0.0.1"));
    }
}
