//! Where an assertion issuer's public keys come from: a JWKS given inline, a JWKS file (read
//! anew each time, so a test can rotate keys), a JWKS URL, or the issuer itself through OIDC
//! discovery (`{issuer}/.well-known/openid-configuration` → `jwks_uri`), as Entra fetches a
//! Kubernetes ServiceAccount issuer's keys. A URL serves where the issuer's name is not an
//! address this machine reaches (a local kube-apiserver names itself
//! `https://kubernetes.default.svc.cluster.local` and serves `/openid/v1/jwks`). Fetched sets are
//! cached for a minute and fetched again at once when a token names a key the cached set lacks
//! (a rotated key).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Serialize};

/// How long a fetched key set is used before it is fetched again.
const CACHE_FOR: Duration = Duration::from_secs(60);
/// A set is not fetched again sooner than this, whatever the tokens name: a stream of
/// assertions with made-up `kid`s must not turn into a stream of fetches.
const REFETCH_AFTER: Duration = Duration::from_secs(5);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The keys of one issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum IssuerKeys {
    /// Fetched from the issuer's own discovery document and `jwks_uri`.
    Discovery,
    /// Fetched from this URL (HTTPS; the issuer CA is trusted).
    JwksUrl(String),
    /// A JWKS file (`{"keys":[…]}`), read on every use.
    JwksFile(PathBuf),
    /// A JWKS given as it is.
    Jwks(JwkSet),
}

/// Fetched key sets, per issuer.
#[derive(Default)]
pub(crate) struct KeyCache {
    fetched: Mutex<HashMap<String, (Instant, Arc<JwkSet>)>>,
}

impl KeyCache {
    /// The keys of `issuer`; `want_kid` is the key the token names, fetched again if the cached
    /// set lacks it. `ca_file` is a PEM bundle trusted, besides the public roots, for discovery.
    /// Errors are one line for the Entra error description; they never contain a token.
    pub(crate) async fn keys(
        &self,
        issuer: &str,
        source: &IssuerKeys,
        ca_file: Option<&Path>,
        want_kid: Option<&str>,
    ) -> Result<Arc<JwkSet>, String> {
        match source {
            IssuerKeys::Jwks(set) => Ok(Arc::new(set.clone())),
            IssuerKeys::JwksFile(path) => read_jwks_file(path).map(Arc::new),
            IssuerKeys::Discovery | IssuerKeys::JwksUrl(_) => {
                let cached = self
                    .fetched
                    .lock()
                    .expect("key cache lock")
                    .get(issuer)
                    .cloned();
                if let Some((at, set)) = cached {
                    let lacks_kid = want_kid.is_some_and(|kid| set.find(kid).is_none());
                    let fresh = at.elapsed() < CACHE_FOR;
                    if (fresh && !lacks_kid) || at.elapsed() < REFETCH_AFTER {
                        return Ok(set);
                    }
                }
                let client = https_client(ca_file)?;
                let set = Arc::new(match source {
                    IssuerKeys::JwksUrl(url) => get_json(&client, url).await?,
                    _ => discover(&client, issuer).await?,
                });
                self.fetched
                    .lock()
                    .expect("key cache lock")
                    .insert(issuer.to_owned(), (Instant::now(), set.clone()));
                Ok(set)
            }
        }
    }

    /// Forgets every fetched set (the configuration changed).
    pub(crate) fn clear(&self) {
        self.fetched.lock().expect("key cache lock").clear();
    }
}

pub(crate) fn read_jwks_file(path: &Path) -> Result<JwkSet, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the JWKS file {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("the JWKS file {} is not a JWK set: {e}", path.display()))
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// A client trusting the public roots and `ca_file`.
fn https_client(ca_file: Option<&Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().timeout(FETCH_TIMEOUT);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("reading the issuer CA {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("the issuer CA {} is not PEM: {e}", path.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| format!("building an HTTPS client: {e}"))
}

/// OIDC discovery, then the key set it points to.
async fn discover(client: &reqwest::Client, issuer: &str) -> Result<JwkSet, String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let discovery: Discovery = get_json(client, &url).await?;
    // As OIDC discovery requires: a document for another issuer is not this issuer's.
    if discovery.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!(
            "{url} names the issuer '{}', not '{issuer}'",
            discovery.issuer
        ));
    }
    get_json(client, &discovery.jwks_uri).await
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {url}: HTTP {status}"));
    }
    response
        .json()
        .await
        .map_err(|e| format!("GET {url}: not the expected JSON: {e}"))
}
