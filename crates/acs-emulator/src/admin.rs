//! The admin endpoints under `/_emulator/` (only with `--admin`), for tests and benchmarks.
//! They need no signature: they are not part of the emulated API.
//!
//! - `GET /_emulator/stats`: counts (see [`StatsBody`]).
//! - `POST /_emulator/validate` `{"token":"…"}`: whether a token is still good.
//! - `GET /_emulator/config`: limits, faults, time scale and the current outage.
//! - `PATCH /_emulator/config`: a partial object merged into the same (not the outage).
//! - `POST /_emulator/outage` `{"mode":"unavailable"|"refuse","seconds":N}`; `DELETE` ends it.
//! - `GET /_emulator/api-versions`: `{"served":[…],"retired":[…]}`; `PUT` `{"retired":[…]}`
//!   sets which versions are refused as retired.
//! - `GET /_emulator/entra`: the Entra authority's configuration; `PUT` replaces it.
//! - `POST /_emulator/entra/outage` `{"seconds":N}`: the token endpoint answers 503 for N
//!   seconds; `DELETE` ends it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};

use crate::reply::{ApiError, Reply, json_reply, read_body};
use crate::store::TokenStatus;
use crate::tokens::TokenError;
use crate::{EntraConfig, MAX_DURATION_SECONDS, Outage, OutageMode, Settings, Shared};

pub(crate) const PREFIX: &str = "/_emulator/";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatsBody {
    identities_alive: usize,
    identities_deleted: usize,
    tokens_issued: u64,
    /// 429s sent.
    throttled: u64,
    /// operation → HTTP status → count.
    requests: BTreeMap<&'static str, BTreeMap<u16, u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateRequest {
    token: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum Verdict {
    Valid,
    Expired,
    Revoked,
    Deleted,
    UnknownIdentity,
    BadSignature,
    Malformed,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ValidateBody {
    valid: bool,
    status: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutageBody {
    mode: OutageMode,
    remaining_seconds: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigBody {
    #[serde(flatten)]
    settings: Settings,
    outage: Option<OutageBody>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiVersionsBody {
    /// Read-only: what is answered now.
    #[serde(default, skip_deserializing)]
    served: Vec<&'static str>,
    retired: BTreeSet<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntraOutageRequest {
    seconds: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageRequest {
    mode: OutageMode,
    seconds: f64,
}

fn bad_request(message: impl Into<String>) -> Reply {
    json_reply(
        StatusCode::BAD_REQUEST,
        &acs::wire::ErrorResponse::new("BadRequest", message),
    )
}

async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let bytes = read_body(req.into_body()).await.map_err(ApiError::reply)?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("invalid body: {e}")))
}

pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Reply {
    let path = &req.uri().path()[PREFIX.len()..];
    match (req.method().clone(), path) {
        (Method::GET, "stats") => json_reply(StatusCode::OK, &stats(shared)),
        (Method::POST, "validate") => match json_body::<ValidateRequest>(req).await {
            Ok(body) => json_reply(StatusCode::OK, &validate(shared, &body.token)),
            Err(reply) => reply,
        },
        (Method::GET, "config") => json_reply(StatusCode::OK, &config(shared)),
        (Method::PATCH, "config") => match json_body::<serde_json::Value>(req).await {
            Ok(patch) => patch_config(shared, &patch),
            Err(reply) => reply,
        },
        (Method::POST, "outage") => match json_body::<OutageRequest>(req).await {
            Ok(body) => match outage_end(body.seconds) {
                Some(until) => {
                    shared.outage.send_replace(Some(Outage {
                        mode: body.mode,
                        until,
                    }));
                    json_reply(StatusCode::OK, &config(shared))
                }
                None => bad_request(format!(
                    "seconds must be a positive number of at most {MAX_DURATION_SECONDS} (ten years)"
                )),
            },
            Err(reply) => reply,
        },
        (Method::DELETE, "outage") => {
            shared.outage.send_replace(None);
            json_reply(StatusCode::OK, &config(shared))
        }
        (Method::GET, "api-versions") => json_reply(StatusCode::OK, &api_versions(shared)),
        (Method::PUT, "api-versions") => match json_body::<ApiVersionsBody>(req).await {
            Ok(body) => match crate::validate_retired_api_versions(&body.retired) {
                Ok(()) => {
                    *shared
                        .retired_api_versions
                        .write()
                        .expect("api versions lock") = body.retired;
                    json_reply(StatusCode::OK, &api_versions(shared))
                }
                Err(e) => bad_request(e),
            },
            Err(reply) => reply,
        },
        (Method::GET, "entra") => json_reply(StatusCode::OK, &shared.entra()),
        (Method::PUT, "entra") => match json_body::<EntraConfig>(req).await {
            Ok(config) => match config.validate() {
                Ok(()) => {
                    *shared.entra.write().expect("entra lock") = config;
                    shared.issuer_keys.clear();
                    json_reply(StatusCode::OK, &shared.entra())
                }
                Err(e) => bad_request(e),
            },
            Err(reply) => reply,
        },
        (Method::POST, "entra/outage") => match json_body::<EntraOutageRequest>(req).await {
            Ok(body) => match outage_end(body.seconds) {
                Some(until) => {
                    *shared.entra_outage.lock().expect("entra outage lock") = Some(until);
                    json_reply(
                        StatusCode::OK,
                        &serde_json::json!({"seconds": body.seconds}),
                    )
                }
                None => bad_request(format!(
                    "seconds must be a positive number of at most {MAX_DURATION_SECONDS} (ten years)"
                )),
            },
            Err(reply) => reply,
        },
        (Method::DELETE, "entra/outage") => {
            *shared.entra_outage.lock().expect("entra outage lock") = None;
            json_reply(StatusCode::OK, &serde_json::json!({"seconds": 0}))
        }
        _ => json_reply(
            StatusCode::NOT_FOUND,
            &acs::wire::ErrorResponse::new("NotFound", "No such admin endpoint."),
        ),
    }
}

/// When an outage of `seconds` starting now ends; `None` unless 0 < `seconds` ≤ ten years.
fn outage_end(seconds: f64) -> Option<Instant> {
    if !(seconds > 0.0 && seconds <= MAX_DURATION_SECONDS as f64) {
        return None;
    }
    Instant::now().checked_add(Duration::try_from_secs_f64(seconds).ok()?)
}

fn api_versions(shared: &Shared) -> ApiVersionsBody {
    let retired = shared
        .retired_api_versions
        .read()
        .expect("api versions lock")
        .clone();
    ApiVersionsBody {
        served: acs::wire::API_VERSIONS
            .iter()
            .copied()
            .filter(|v| !retired.contains(*v))
            .collect(),
        retired,
    }
}

fn stats(shared: &Shared) -> StatsBody {
    let (alive, deleted) = shared.store.lock().expect("store lock").counts();
    let mut requests: BTreeMap<&'static str, BTreeMap<u16, u64>> = BTreeMap::new();
    for (&(op, status), &count) in shared.stats.requests.lock().expect("stats lock").iter() {
        requests.entry(op).or_default().insert(status, count);
    }
    StatsBody {
        identities_alive: alive,
        identities_deleted: deleted,
        tokens_issued: shared.stats.tokens_issued.load(Ordering::Relaxed),
        throttled: shared.stats.throttled.load(Ordering::Relaxed),
        requests,
    }
}

fn validate(shared: &Shared, token: &str) -> ValidateBody {
    let claims = match shared.signing.verify(token) {
        Ok(claims) => claims,
        Err(e) => {
            return ValidateBody {
                valid: false,
                status: match e {
                    TokenError::Malformed => Verdict::Malformed,
                    TokenError::BadSignature => Verdict::BadSignature,
                },
                identity: None,
                scopes: None,
                exp: None,
            };
        }
    };
    let id = claims.identity_id();
    let status = shared.store.lock().expect("store lock").token_status(
        &id,
        claims.iat,
        claims.exp,
        token,
        shared.clock.now(),
    );
    ValidateBody {
        valid: status == TokenStatus::Valid,
        status: match status {
            TokenStatus::Valid => Verdict::Valid,
            TokenStatus::Expired => Verdict::Expired,
            TokenStatus::Revoked => Verdict::Revoked,
            TokenStatus::Deleted => Verdict::Deleted,
            TokenStatus::UnknownIdentity => Verdict::UnknownIdentity,
        },
        identity: Some(id),
        scopes: Some(claims.acs_scope),
        exp: Some(claims.exp),
    }
}

fn config(shared: &Shared) -> ConfigBody {
    let outage = *shared.outage.borrow();
    ConfigBody {
        settings: shared.settings(),
        outage: outage.and_then(|o| {
            let remaining = o.until.checked_duration_since(Instant::now())?;
            Some(OutageBody {
                mode: o.mode,
                remaining_seconds: remaining.as_secs_f64(),
            })
        }),
    }
}

/// Merges a patch into the settings (objects merge key by key, anything else replaces). Changing the limits starts fresh windows,
/// so a test that lowers a limit gets exactly the new budget.
fn patch_config(shared: &Shared, patch: &serde_json::Value) -> Reply {
    let current = shared.settings();
    let mut merged = serde_json::to_value(current).expect("settings serialise");
    merge(&mut merged, patch);
    let updated: Settings = match serde_json::from_value(merged) {
        Ok(settings) => settings,
        Err(e) => return bad_request(format!("invalid config: {e}")),
    };
    if let Err(e) = updated.validate() {
        return bad_request(e);
    }
    *shared.settings.write().expect("settings lock") = updated;
    if updated.limits != current.limits {
        shared.windows.lock().expect("windows lock").clear();
    }
    json_reply(StatusCode::OK, &config(shared))
}

fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_changes_only_what_is_given() {
        let mut settings = serde_json::to_value(Settings::default()).unwrap();
        merge(
            &mut settings,
            &serde_json::json!({"limits": {"issueAccessToken": 2}, "timeScale": 60}),
        );
        let settings: Settings = serde_json::from_value(settings).unwrap();
        assert_eq!(settings.limits.issue_access_token, 2);
        assert_eq!(settings.limits.create_identity, 1000);
        assert_eq!(settings.time_scale, 60.0);
        let mut typo = serde_json::to_value(Settings::default()).unwrap();
        merge(
            &mut typo,
            &serde_json::json!({"limits": {"issueTokens": 2}}),
        );
        assert!(serde_json::from_value::<Settings>(typo).is_err());
    }
}
