//! The Microsoft Entra ID authority the emulator also is, for workload identity: an
//! application (tenant id, client id) proves itself with a client assertion, a JWT signed by
//! an issuer it federates with (a Kubernetes ServiceAccount issuer), and gets an access token
//! for ACS, which the identity API then accepts as a bearer token instead of an HMAC signature.
//!
//! The authority is the emulator's own endpoint (`https://127.0.0.1:PORT`): the tenant is the
//! first path segment, as under `https://login.microsoftonline.com`, so every SDK's way of
//! joining an authority host and a tenant reaches it.
//!
//! - `GET /{tenant}/v2.0/.well-known/openid-configuration`: OIDC discovery.
//! - `GET /{tenant}/discovery/v2.0/keys`: the keys access tokens are signed with.
//! - `POST /{tenant}/oauth2/v2.0/token`: the client credentials grant with a JWT client
//!   assertion (`client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`).
//!
//! Refusals are Entra's: `{"error", "error_description": "AADSTS…: …", "error_codes", …}`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::jwks::IssuerKeys;
use crate::jwt::{self, JwtError};
use crate::reply::{Reply, json_reply, read_body};

/// The audience Entra requires of a federated assertion unless a credential says otherwise.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The resource whose tokens the identity API accepts. The SDKs ask for the scope
/// `https://communication.azure.com//.default`: the resource with a trailing `/`, which the
/// token's `aud` then carries; both forms are accepted.
pub const ACS_RESOURCE: &str = "https://communication.azure.com";
const ACS_AUDIENCES: &[&str] = &[ACS_RESOURCE, "https://communication.azure.com/"];
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Entra's usual access-token lifetime.
pub const DEFAULT_TOKEN_LIFETIME_SECONDS: u64 = 3600;
/// Entra issues no access token valid for longer than a day.
pub const MAX_TOKEN_LIFETIME_SECONDS: u64 = 24 * 60 * 60;

/// The applications that may sign in, and how their assertions' issuers are trusted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntraConfig {
    /// A tenant is known when a credential names it; an application (tenant, client id) is
    /// known when a credential names both.
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredential>,
    /// Where an issuer's keys come from; an issuer not listed is fetched through discovery.
    #[serde(default)]
    pub issuers: BTreeMap<String, IssuerKeys>,
    /// A PEM bundle trusted, besides the public roots, when fetching an issuer's keys (the
    /// kube-apiserver's CA).
    #[serde(default)]
    pub issuer_ca_file: Option<PathBuf>,
    #[serde(default = "default_lifetime")]
    pub token_lifetime_seconds: u64,
}

fn default_lifetime() -> u64 {
    DEFAULT_TOKEN_LIFETIME_SECONDS
}

impl Default for EntraConfig {
    fn default() -> Self {
        Self {
            federated_credentials: Vec::new(),
            issuers: BTreeMap::new(),
            issuer_ca_file: None,
            token_lifetime_seconds: DEFAULT_TOKEN_LIFETIME_SECONDS,
        }
    }
}

impl EntraConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_TOKEN_LIFETIME_SECONDS).contains(&self.token_lifetime_seconds) {
            return Err(format!(
                "tokenLifetimeSeconds must be between 1 and {MAX_TOKEN_LIFETIME_SECONDS}"
            ));
        }
        for credential in &self.federated_credentials {
            let fields = [
                ("tenantId", &credential.tenant_id),
                ("clientId", &credential.client_id),
                ("issuer", &credential.issuer),
                ("subject", &credential.subject),
                ("audience", &credential.audience),
            ];
            if let Some((name, _)) = fields.iter().find(|(_, value)| value.is_empty()) {
                return Err(format!("a federated credential's {name} must not be empty"));
            }
        }
        Ok(())
    }

    fn issuer_keys(&self, issuer: &str) -> IssuerKeys {
        self.issuers
            .get(issuer)
            .cloned()
            .unwrap_or(IssuerKeys::Discovery)
    }
}

/// Entra's federated identity credential on an application: assertions from `issuer` about
/// `subject` for `audience` sign in as `client_id` of `tenant_id`. Matched exactly (Entra
/// matches case-sensitively).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FederatedCredential {
    pub tenant_id: String,
    pub client_id: String,
    pub issuer: String,
    /// For a ServiceAccount: `system:serviceaccount:NAMESPACE:NAME`.
    pub subject: String,
    #[serde(default = "default_audience")]
    pub audience: String,
}

fn default_audience() -> String {
    TOKEN_EXCHANGE_AUDIENCE.to_owned()
}

/// An Entra endpoint, decided from the method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Discovery(String),
    Keys(String),
    Token(String),
}

impl Route {
    /// The name requests are counted under in the stats.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Route::Discovery(_) => "entraDiscovery",
            Route::Keys(_) => "entraKeys",
            Route::Token(_) => "entraToken",
        }
    }
}

pub(crate) fn route(method: &Method, path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let route = match (method, segments.as_slice()) {
        (&Method::GET, [tenant, "v2.0", ".well-known", "openid-configuration"]) => {
            Route::Discovery(tenant.to_string())
        }
        (&Method::GET, [tenant, "discovery", "v2.0", "keys"]) => Route::Keys(tenant.to_string()),
        (&Method::POST, [tenant, "oauth2", "v2.0", "token"]) => Route::Token(tenant.to_string()),
        _ => return None,
    };
    Some(route)
}

/// A refusal in Entra's shape.
#[derive(Debug)]
struct EntraError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    description: String,
}

impl EntraError {
    fn new(status: StatusCode, error: &'static str, code: u32, description: String) -> Self {
        Self {
            status,
            error,
            code,
            description,
        }
    }

    /// RFC 6749 §5.2: a client that failed to authenticate is a 401.
    fn invalid_client(code: u32, description: String) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            description,
        )
    }

    fn invalid_request(code: u32, description: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            code,
            description,
        )
    }

    fn missing(parameter: &str) -> Self {
        Self::invalid_request(
            900144,
            format!("The request body must contain the following parameter: '{parameter}'."),
        )
    }

    fn reply(self, shared: &Shared) -> Reply {
        let timestamp = shared
            .clock
            .now()
            .strftime("%Y-%m-%d %H:%M:%SZ")
            .to_string();
        let trace_id = crate::random_guid();
        let correlation_id = crate::random_guid();
        json_reply(
            self.status,
            &serde_json::json!({
                "error": self.error,
                "error_description": format!(
                    "AADSTS{}: {} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}",
                    self.code, self.description
                ),
                "error_codes": [self.code],
                "timestamp": timestamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
            }),
        )
    }
}

pub(crate) async fn handle(shared: &Shared, route: Route, req: Request<Incoming>) -> Reply {
    let name = route.name();
    let config = shared.entra();
    let tenant = match &route {
        Route::Discovery(t) | Route::Keys(t) | Route::Token(t) => t.clone(),
    };
    let known_tenant = config
        .federated_credentials
        .iter()
        .any(|c| c.tenant_id == tenant);
    let result = if shared.entra_outage_now() && matches!(route, Route::Token(_)) {
        Err(EntraError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again (emulated outage).".into(),
        ))
    } else if !known_tenant {
        Err(EntraError::new(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        ))
    } else {
        match route {
            Route::Discovery(_) => Ok(json_reply(
                StatusCode::OK,
                &discovery(&authority(shared, &req), &tenant),
            )),
            Route::Keys(_) => Ok(json_reply(StatusCode::OK, &shared.entra_keys)),
            Route::Token(_) => token(shared, &config, &tenant, req).await,
        }
    };
    let reply = result.unwrap_or_else(|e| e.reply(shared));
    shared.count(name, reply.status());
    reply
}

/// `https://HOST:PORT`, as the client reached the emulator.
fn authority(shared: &Shared, req: &Request<Incoming>) -> String {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    format!("{}://{host}", shared.scheme)
}

fn discovery(authority: &str, tenant: &str) -> serde_json::Value {
    serde_json::json!({
        "issuer": format!("{authority}/{tenant}/v2.0"),
        "token_endpoint": format!("{authority}/{tenant}/oauth2/v2.0/token"),
        "jwks_uri": format!("{authority}/{tenant}/discovery/v2.0/keys"),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "grant_types_supported": ["client_credentials"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["pairwise"],
        "scopes_supported": [format!("{ACS_RESOURCE}//.default")],
        "tenant_region_scope": "NA",
    })
}

/// The client credentials grant with a federated client assertion.
async fn token(
    shared: &Shared,
    config: &EntraConfig,
    tenant: &str,
    req: Request<Incoming>,
) -> Result<Reply, EntraError> {
    let body = read_body(req.into_body()).await.map_err(|_| {
        EntraError::invalid_request(90014, "The request body could not be read.".into())
    })?;
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let grant_type = field("grant_type").ok_or_else(|| EntraError::missing("grant_type"))?;
    if grant_type != "client_credentials" {
        return Err(EntraError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{grant_type}'."),
        ));
    }
    let client_id = field("client_id").ok_or_else(|| EntraError::missing("client_id"))?;
    let scope = field("scope").ok_or_else(|| EntraError::missing("scope"))?;
    let resource = check_scope(scope)?;
    let assertion = match (field("client_assertion_type"), field("client_assertion")) {
        (Some(CLIENT_ASSERTION_TYPE), Some(assertion)) => assertion,
        _ => {
            return Err(EntraError::invalid_client(
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.".into(),
            ));
        }
    };
    let credentials: Vec<&FederatedCredential> = config
        .federated_credentials
        .iter()
        .filter(|c| c.tenant_id == tenant && c.client_id == client_id)
        .collect();
    if credentials.is_empty() {
        return Err(EntraError::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        ));
    }
    let malformed =
        || EntraError::invalid_request(50027, "JWT token is invalid or malformed.".into());
    let claimed = jwt::unverified_claims(assertion).map_err(|_| malformed())?;
    // Matched before any key is fetched: only an issuer an administrator configured is ever
    // contacted, never one an assertion names.
    let credential = credentials
        .into_iter()
        .find(|c| c.issuer == claimed.iss && c.subject == claimed.sub && claimed.aud.contains(&c.audience))
        .ok_or_else(|| {
            EntraError::invalid_request(
                70021,
                format!(
                    "No matching federated identity record found for presented assertion. Assertion Issuer: '{}'. Assertion Subject: '{}'. Assertion Audience: '{}'.",
                    claimed.iss,
                    claimed.sub,
                    claimed.aud.join(",")
                ),
            )
        })?;
    let kid = jwt::key_id(assertion).map_err(|_| malformed())?;
    let keys = shared
        .issuer_keys
        .keys(
            &credential.issuer,
            &config.issuer_keys(&credential.issuer),
            config.issuer_ca_file.as_deref(),
            kid.as_deref(),
        )
        .await
        .map_err(|e| {
            tracing::warn!(
                "fetching the keys of issuer {} failed: {e}",
                credential.issuer
            );
            EntraError::invalid_request(
                50166,
                format!("Request to External OIDC endpoint failed: {e}"),
            )
        })?;
    let now = shared.clock.now().as_second();
    jwt::verify(assertion, &keys, &[credential.audience.as_str()], now).map_err(|e| match e {
        JwtError::Expired | JwtError::NotYetValid => EntraError::invalid_client(
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {}, expiry time of assertion {}.",
                shared.clock.now(),
                jiff::Timestamp::from_second(claimed.exp).map_or_else(|_| claimed.exp.to_string(), |t| t.to_string())
            ),
        ),
        JwtError::Malformed => malformed(),
        JwtError::WrongAudience => EntraError::invalid_request(
            70021,
            "No matching federated identity record found for presented assertion audience.".into(),
        ),
        JwtError::UnsupportedAlgorithm | JwtError::UnknownKey | JwtError::BadSignature => {
            EntraError::invalid_client(700027, "Client assertion failed signature validation.".into())
        }
    })?;
    // At most a day (validated), so it fits.
    let lifetime = config.token_lifetime_seconds as i64;
    let access_token = shared.signing.mint(&AccessTokenClaims::new(
        resource,
        tenant,
        client_id,
        now,
        now + lifetime,
    ));
    let mut reply = json_reply(
        StatusCode::OK,
        &serde_json::json!({
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
        }),
    );
    reply.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store, no-cache"),
    );
    Ok(reply)
}

/// The resource of a `{resource}/.default` scope, if it is ACS.
fn check_scope(scope: &str) -> Result<&str, EntraError> {
    let Some(resource) = scope.strip_suffix("/.default") else {
        return Err(EntraError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            format!(
                "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid. The client credentials flow takes a single '/.default' scope."
            ),
        ));
    };
    if !ACS_AUDIENCES.contains(&resource) {
        return Err(EntraError::new(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            format!(
                "The resource principal named {resource} was not found in the tenant. This emulator issues tokens for {ACS_RESOURCE} only."
            ),
        ));
    }
    Ok(resource)
}

/// A v1.0 access token's claims, as Entra issues them for ACS.
#[derive(Serialize)]
struct AccessTokenClaims {
    aud: String,
    iss: String,
    iat: i64,
    nbf: i64,
    exp: i64,
    appid: String,
    /// 2: the client authenticated with a certificate or assertion.
    appidacr: &'static str,
    idp: String,
    oid: String,
    sub: String,
    tid: String,
    uti: String,
    ver: &'static str,
}

impl AccessTokenClaims {
    fn new(resource: &str, tenant: &str, client_id: &str, iat: i64, exp: i64) -> Self {
        let issuer = format!("https://sts.windows.net/{tenant}/");
        // The application's service principal: one stable object id per application.
        let oid = principal_id(tenant, client_id);
        Self {
            aud: resource.to_owned(),
            iss: issuer.clone(),
            iat,
            nbf: iat,
            exp,
            appid: client_id.to_owned(),
            appidacr: "2",
            idp: issuer,
            oid: oid.clone(),
            sub: oid,
            tid: tenant.to_owned(),
            uti: crate::random_guid(),
            ver: "1.0",
        }
    }
}

fn principal_id(tenant: &str, client_id: &str) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(format!("{tenant}/{client_id}"));
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    crate::hyphenated(&hex)
}

/// Whether the identity API accepts `token` as `Authorization: Bearer`: issued by this
/// authority (signed with its key), for ACS, and not expired.
pub(crate) fn accepts_bearer(shared: &Shared, token: &str) -> Result<(), JwtError> {
    jwt::verify(
        token,
        &shared.entra_keys,
        ACS_AUDIENCES,
        shared.clock.now().as_second(),
    )
    .map(|_| ())
}

/// The authority's key set, served at `jwks_uri`.
pub(crate) fn key_set(signing: &crate::SigningKey) -> JwkSet {
    JwkSet {
        keys: vec![signing.public_jwk()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_take_the_tenant_from_the_first_segment() {
        assert_eq!(
            route(&Method::POST, "/t1/oauth2/v2.0/token"),
            Some(Route::Token("t1".into()))
        );
        assert_eq!(
            route(&Method::GET, "/t1/v2.0/.well-known/openid-configuration"),
            Some(Route::Discovery("t1".into()))
        );
        assert_eq!(
            route(&Method::GET, "/t1/discovery/v2.0/keys"),
            Some(Route::Keys("t1".into()))
        );
        assert_eq!(route(&Method::GET, "/t1/oauth2/v2.0/token"), None);
        assert_eq!(route(&Method::POST, "/identities"), None);
    }

    #[test]
    fn only_the_acs_default_scope_is_granted() {
        assert_eq!(
            check_scope("https://communication.azure.com//.default").unwrap(),
            "https://communication.azure.com/"
        );
        assert_eq!(
            check_scope("https://communication.azure.com/.default").unwrap(),
            ACS_RESOURCE
        );
        assert_eq!(
            check_scope("https://vault.azure.net/.default")
                .unwrap_err()
                .code,
            500011
        );
        assert_eq!(check_scope("openid").unwrap_err().code, 70011);
    }

    #[test]
    fn credentials_need_every_field_and_lifetimes_are_bounded() {
        let mut config = EntraConfig::default();
        config.federated_credentials.push(FederatedCredential {
            tenant_id: "t".into(),
            client_id: "c".into(),
            issuer: "https://issuer".into(),
            subject: String::new(),
            audience: TOKEN_EXCHANGE_AUDIENCE.into(),
        });
        assert!(config.validate().unwrap_err().contains("subject"));
        config.federated_credentials[0].subject = "system:serviceaccount:a:b".into();
        assert!(config.validate().is_ok());
        config.token_lifetime_seconds = MAX_TOKEN_LIFETIME_SECONDS + 1;
        assert!(config.validate().is_err());
    }
}
