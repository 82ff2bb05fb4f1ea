//! The identity API: routing, authentication (an HMAC signature, or a bearer token from the
//! emulator's Entra authority), api-versions, limits and the operations.

use std::sync::atomic::Ordering;
use std::time::Duration;

use acs::wire::{self, AccessToken, CreateIdentityRequest, IssueTokenRequest};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use jiff::{SignedDuration, Timestamp};
use percent_encoding::percent_decode_str;

use crate::limits::{LimitedOperation, retry_after_seconds};
use crate::reply::{ApiError, Reply, empty_reply, json_reply, read_body};
use crate::store::StoreError;
use crate::tokens::Claims;
use crate::{OutageMode, Shared};

/// The service refuses an `x-ms-date` further than this from its clock.
const MAX_SKEW: SignedDuration = SignedDuration::from_mins(15);
const HASH_MISMATCH: &str = "Request 'x-ms-content-sha256' differs from generated content hash.";

/// Returned by the service to make hyper drop the connection without answering (a
/// connection-refusing outage reached through an already open connection).
#[derive(Debug)]
pub(crate) struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("outage: connection dropped")
    }
}

impl std::error::Error for DropConnection {}

/// What a request asks for, decided from the method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Create,
    Issue(String),
    Revoke(String),
    Delete(String),
    Get(String),
    Unknown,
}

impl Route {
    /// The name requests are counted under in the stats.
    fn name(&self) -> &'static str {
        match self {
            Route::Create => "createIdentity",
            Route::Issue(_) => "issueAccessToken",
            Route::Revoke(_) => "revokeAccessTokens",
            Route::Delete(_) => "deleteIdentity",
            Route::Get(_) => "getIdentity",
            Route::Unknown => "unknown",
        }
    }
}

fn route(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Ids arrive percent-encoded (sync SDK) or raw (async SDK); the action segment too may be
    // encoded. Decoding is for routing only: the signature covers the target as received.
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    match (method, segments.as_slice()) {
        (&Method::POST, ["identities"]) => Route::Create,
        (&Method::DELETE, ["identities", id]) => decode(id).map_or(Route::Unknown, Route::Delete),
        (&Method::GET, ["identities", id]) => decode(id).map_or(Route::Unknown, Route::Get),
        (&Method::POST, ["identities", id, action]) => {
            match (decode(id), decode(action).as_deref()) {
                (Some(id), Some(":issueAccessToken")) => Route::Issue(id),
                (Some(id), Some(":revokeAccessTokens")) => Route::Revoke(id),
                _ => Route::Unknown,
            }
        }
        _ => Route::Unknown,
    }
}

/// Every request to the identity API.
pub(crate) async fn handle(
    shared: std::sync::Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Reply, DropConnection> {
    let route = route(req.method(), req.uri().path());
    let request_id = req.headers().get("x-ms-client-request-id").cloned();
    let (name, mut reply) = match shared.outage_now() {
        Some(OutageMode::Refuse) => return Err(DropConnection),
        Some(OutageMode::Unavailable) => (
            route.name(),
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "The service is unavailable (emulated outage).",
            )
            .reply(),
        ),
        None => serve(&shared, route, req).await,
    };
    let faults = shared.settings().faults;
    if faults.lose_answers > 0.0 && rand::random::<f64>() < faults.lose_answers {
        // Carried out, never answered: the client's own timeout ends the exchange (and drops
        // this future with the connection).
        std::future::pending::<()>().await;
    }
    if let Some(id) = request_id {
        reply.headers_mut().insert("x-ms-client-request-id", id);
    }
    shared.count(name, reply.status());
    if reply.status() == StatusCode::TOO_MANY_REQUESTS {
        shared.stats.throttled.fetch_add(1, Ordering::Relaxed);
    }
    Ok(reply)
}

/// Faults, authentication, then the operation. Returns the name to count the request under.
async fn serve(shared: &Shared, route: Route, req: Request<Incoming>) -> (&'static str, Reply) {
    let settings = shared.settings();
    let faults = settings.faults;
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if faults.fail500 > 0.0 || faults.fail503 > 0.0 {
        let roll = rand::random::<f64>();
        let injected = if roll < faults.fail500 {
            Some((StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"))
        } else if roll < faults.fail500 + faults.fail503 {
            Some((StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"))
        } else {
            None
        };
        if let Some((status, code)) = injected {
            return (
                route.name(),
                ApiError::new(status, code, "Injected fault.").reply(),
            );
        }
    }
    let mut name = route.name();
    let result = async {
        if route == Route::Unknown {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                "No such operation.",
            ));
        }
        let (parts, body) = req.into_parts();
        let body = read_body(body).await?;
        authenticate(shared, &parts, &body)?;
        let version = api_version(shared, &parts.uri)?;
        match route {
            Route::Create => {
                let request = parse_create(&body)?;
                if request.create_token_with_scopes.is_some() {
                    name = "createIdentityWithToken";
                }
                create(shared, &settings, version, request)
            }
            Route::Issue(id) => issue_token(shared, &settings, &id, &body),
            Route::Revoke(id) => {
                admit(shared, &settings, LimitedOperation::RevokeAccessTokens)?;
                shared
                    .store
                    .lock()
                    .expect("store lock")
                    .revoke(&id, shared.clock.now())
                    .map_err(|e| not_found_for(e, &id))?;
                Ok(empty_reply(StatusCode::NO_CONTENT))
            }
            Route::Delete(id) => {
                admit(shared, &settings, LimitedOperation::DeleteIdentity)?;
                shared
                    .store
                    .lock()
                    .expect("store lock")
                    .delete(&id, shared.clock.now())
                    .map_err(|e| not_found_for(e, &id))?;
                Ok(empty_reply(StatusCode::NO_CONTENT))
            }
            Route::Get(id) => get_identity(shared, version, &id),
            Route::Unknown => unreachable!("answered above"),
        }
    }
    .await;
    (name, result.unwrap_or_else(ApiError::reply))
}

fn not_found_for(e: StoreError, id: &str) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found(id),
        other => other.into(),
    }
}

/// The service's one answer to credentials it does not accept, HMAC or bearer alike (ACS
/// answers an Entra token it refuses with the same 401 `Denied`).
const DENIED: &str = "Denied by the resource provider.";

/// A bearer token from the emulator's Entra authority, or else an HMAC signature.
fn authenticate(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    body: &[u8],
) -> Result<(), ApiError> {
    let authorization = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let bearer = authorization
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match bearer {
        Some(token) => crate::entra::accepts_bearer(shared, token.trim()).map_err(|e| {
            // The reason, never the token.
            tracing::debug!("bearer token refused: {e:?}");
            ApiError::denied(DENIED)
        }),
        None => authenticate_hmac(shared, parts, body),
    }
}

/// HMAC-SHA256 verification exactly as the service does it: over the request-target as
/// received, the `Host` as received, and the signed `x-ms-date` and content hash.
fn authenticate_hmac(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    body: &[u8],
) -> Result<(), ApiError> {
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let signature = header("authorization")
        .and_then(acs::signing::parse_authorization)
        .ok_or_else(|| ApiError::denied(DENIED))?;
    let date_text =
        header("x-ms-date").ok_or_else(|| ApiError::denied("The x-ms-date header is required."))?;
    let claimed_hash = header("x-ms-content-sha256")
        .ok_or_else(|| ApiError::denied("The x-ms-content-sha256 header is required."))?;
    // HTTP/1.1 carries the authority in Host; HTTP/2 in :authority (the URI).
    let host = header("host")
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let to_sign =
        acs::signing::string_to_sign(parts.method.as_str(), target, date_text, host, claimed_hash);
    let expected = acs::signing::signature(&shared.key, &to_sign);
    if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(ApiError::denied(DENIED));
    }
    let date = acs::signing::parse_http_date(date_text)
        .ok_or_else(|| ApiError::denied("The x-ms-date header is not an RFC 1123 date."))?;
    if shared.clock.now().duration_since(date).abs() > MAX_SKEW {
        return Err(ApiError::denied(
            "The x-ms-date header is more than 15 minutes away from the server's time.",
        ));
    }
    if acs::signing::content_hash(body) != claimed_hash {
        return Err(ApiError::denied(HASH_MISMATCH));
    }
    Ok(())
}

/// Compares without revealing, through timing, how long a matching prefix is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The api-version a request asks for; one the service does not know, or has retired, is a
/// 400 `UnsupportedApiVersion`. That is how ACS answered once it had retired
/// `2020-07-20-preview2` (Azure/Communication#159,
/// Azure-Samples/communication-services-web-calling-tutorial#8: 400, code
/// `UnsupportedApiVersion`, "The HTTP resource that matches the request URI '…/identities'
/// does not support the API version '2020-07-20-preview2'.").
fn api_version(shared: &Shared, uri: &hyper::Uri) -> Result<&'static str, ApiError> {
    let asked = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("api-version="))
        .map(|v| percent_decode_str(v).decode_utf8_lossy().into_owned());
    let Some(asked) = asked else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    };
    wire::API_VERSIONS
        .iter()
        .find(|v| **v == asked && !shared.is_retired(v))
        .copied()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "UnsupportedApiVersion",
                format!(
                    "The HTTP resource that matches the request URI '{}' does not support the API version '{asked}'.",
                    uri.path()
                ),
            )
        })
}

fn admit(
    shared: &Shared,
    settings: &crate::Settings,
    op: LimitedOperation,
) -> Result<(), ApiError> {
    let now = shared.clock.now();
    shared
        .windows
        .lock()
        .expect("windows lock")
        .try_admit(op, now, &settings.limits)
        .map_err(|wait| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests for this operation; retry after the number of seconds in the Retry-After header.",
            )
            .with_retry_after(retry_after_seconds(wait))
        })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("The request body is not valid: {e}"),
        )
    })
}

fn parse_create(body: &[u8]) -> Result<CreateIdentityRequest, ApiError> {
    // The SDK's create_user sends `Content-Length: 0` with `Content-Type: application/json`.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CreateIdentityRequest::default());
    }
    parse_json(body)
}

fn validate_token_request(scopes: &[String], minutes: Option<u32>) -> Result<u32, ApiError> {
    if scopes.is_empty() {
        return Err(ApiError::validation("At least one scope is required."));
    }
    if let Some(bad) = scopes.iter().find(|s| !wire::SCOPES.contains(&s.as_str())) {
        return Err(ApiError::validation(format!(
            "Scope '{bad}' is not valid; valid scopes are {}.",
            wire::SCOPES.join(", ")
        )));
    }
    let minutes = minutes.unwrap_or(wire::MAX_TOKEN_MINUTES);
    if !(wire::MIN_TOKEN_MINUTES..=wire::MAX_TOKEN_MINUTES).contains(&minutes) {
        return Err(ApiError::validation(format!(
            "expiresInMinutes must be between {} and {}; it was {minutes}.",
            wire::MIN_TOKEN_MINUTES,
            wire::MAX_TOKEN_MINUTES
        )));
    }
    Ok(minutes)
}

fn create(
    shared: &Shared,
    settings: &crate::Settings,
    version: &str,
    request: CreateIdentityRequest,
) -> Result<Reply, ApiError> {
    let op = if request.create_token_with_scopes.is_some() {
        LimitedOperation::CreateIdentityWithToken
    } else {
        LimitedOperation::CreateIdentity
    };
    admit(shared, settings, op)?;
    let token_request = match &request.create_token_with_scopes {
        Some(scopes) => Some((
            scopes.as_slice(),
            validate_token_request(scopes, request.expires_in_minutes)?,
        )),
        None => None,
    };
    // Older versions do not know customId; like the service, ignore what they do not define.
    let custom_id = request.custom_id.filter(|_| wire::has_custom_id(version));
    if custom_id.as_deref() == Some("") {
        return Err(ApiError::validation("customId must not be empty."));
    }
    let (id, created) = {
        let mut store = shared.store.lock().expect("store lock");
        match custom_id.as_deref().and_then(|c| store.find_custom(c)) {
            Some(existing) => (existing.id.clone(), false),
            None => {
                let id = format!("8:acs:{}_{}", shared.resource_id, crate::random_guid());
                store.create(id.clone(), custom_id, shared.clock.now())?;
                (id, true)
            }
        }
    };
    let access_token = match token_request {
        Some((scopes, minutes)) => Some(mint(shared, settings, &id, scopes, minutes)?),
        None => None,
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_reply(
        status,
        &wire::CreateIdentityResponse {
            identity: wire::Identity { id },
            access_token,
        },
    ))
}

fn issue_token(
    shared: &Shared,
    settings: &crate::Settings,
    id: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let request: IssueTokenRequest = parse_json(body)?;
    admit(shared, settings, LimitedOperation::IssueAccessToken)?;
    let minutes = validate_token_request(&request.scopes, request.expires_in_minutes)?;
    shared
        .store
        .lock()
        .expect("store lock")
        .live(id)
        .map_err(|e| not_found_for(e, id))?;
    let token = mint(shared, settings, id, &request.scopes, minutes)?;
    Ok(json_reply(StatusCode::OK, &token))
}

/// Signs a token for `id` (outside the store lock: the signature is the expensive part) and
/// records it. Its real lifetime is the asked one divided by the time scale.
fn mint(
    shared: &Shared,
    settings: &crate::Settings,
    id: &str,
    scopes: &[String],
    minutes: u32,
) -> Result<AccessToken, ApiError> {
    let now = shared.clock.now();
    let lifetime = SignedDuration::from_secs(settings.token_lifetime_seconds(minutes));
    // Out of range only for a clock set near the end of time (a test's ManualClock).
    let expiry: Timestamp = now.checked_add(lifetime).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "The token's expiry is beyond the last representable time.",
        )
    })?;
    // Whole-second lifetimes make exp − iat exactly the lifetime: ⌊now + L⌋ = ⌊now⌋ + L.
    let claims = Claims::new(
        id,
        &shared.resource_id,
        scopes,
        now.as_second(),
        expiry.as_second(),
    );
    let token = shared.signing.mint(&claims);
    shared
        .store
        .lock()
        .expect("store lock")
        .record_issue(id, now, &token)
        .map_err(|e| not_found_for(e, id))?;
    shared.stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
    Ok(AccessToken {
        token,
        expires_on: wire::format_expires_on(expiry),
    })
}

fn get_identity(shared: &Shared, version: &str, id: &str) -> Result<Reply, ApiError> {
    if !wire::has_custom_id(version) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "GET /identities/{{id}} exists from api-version {} on.",
                wire::API_VERSION_WITH_CUSTOM_ID
            ),
        ));
    }
    let store = shared.store.lock().expect("store lock");
    let record = store.live(id).map_err(|e| not_found_for(e, id))?;
    Ok(json_reply(
        StatusCode::OK,
        &wire::IdentityDetails {
            id: record.id.clone(),
            custom_id: record.custom_id.clone(),
            last_token_issued_at: record.last_token_issued_at.map(wire::format_expires_on),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_both_id_encodings() {
        let id = "8:acs:abc_123".to_owned();
        assert_eq!(route(&Method::POST, "/identities"), Route::Create);
        assert_eq!(
            route(
                &Method::POST,
                "/identities/8%3Aacs%3Aabc_123/:issueAccessToken"
            ),
            Route::Issue(id.clone())
        );
        assert_eq!(
            route(
                &Method::POST,
                "/identities/8:acs:abc_123/%3ArevokeAccessTokens"
            ),
            Route::Revoke(id.clone())
        );
        assert_eq!(
            route(&Method::DELETE, "/identities/8:acs:abc_123"),
            Route::Delete(id.clone())
        );
        assert_eq!(
            route(&Method::GET, "/identities/8%3aacs%3aabc_123"),
            Route::Get(id)
        );
        assert_eq!(route(&Method::PUT, "/identities"), Route::Unknown);
        assert_eq!(route(&Method::POST, "/identities/x/:nope"), Route::Unknown);
        assert_eq!(
            route(&Method::POST, "/teamsUser/:exchangeAccessToken"),
            Route::Unknown
        );
    }

    #[test]
    fn token_requests_are_validated_like_the_service() {
        let scopes = vec!["chat".to_owned(), "voip".to_owned()];
        assert_eq!(validate_token_request(&scopes, None).ok(), Some(1440));
        assert_eq!(validate_token_request(&scopes, Some(60)).ok(), Some(60));
        for bad in [Some(59), Some(30), Some(1441), Some(0)] {
            let err = validate_token_request(&scopes, bad).err().unwrap();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.retry_after.is_none());
        }
        assert!(validate_token_request(&[], Some(60)).is_err());
        assert!(validate_token_request(&["admin".into()], Some(60)).is_err());
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
