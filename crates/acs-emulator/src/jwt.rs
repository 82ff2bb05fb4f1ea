//! Verifying a JWT against a key set (JWKS): the signature, with asymmetric algorithms only;
//! the audience; and the validity window, against the emulator's clock rather than the
//! system's, so tests can move time. Used for the client assertions the Entra authority is
//! given and for the bearer tokens the identity API is given.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

/// Clock skew tolerated on `exp` and `nbf`: Microsoft.IdentityModel's default, which both
/// Entra and the services behind it use.
pub const LEEWAY_SECONDS: i64 = 5 * 60;

/// Only public-key algorithms: an `HS256` token "signed" with a public key as its secret, or
/// `none`, must never verify.
const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts of JSON, or claims of the wrong type.
    Malformed,
    /// A symmetric or unknown algorithm.
    UnsupportedAlgorithm,
    /// No key in the set has the token's `kid`.
    UnknownKey,
    BadSignature,
    WrongAudience,
    Expired,
    NotYetValid,
}

/// The registered claims the checks here and the federated-credential match look at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegisteredClaims {
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    /// One audience or several, as JWT allows.
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    pub exp: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// The claims as written, signature unchecked: only for choosing which keys to check it
/// against.
pub fn unverified_claims(token: &str) -> Result<RegisteredClaims, JwtError> {
    jsonwebtoken::dangerous::insecure_decode::<RegisteredClaims>(token)
        .map(|data| data.claims)
        .map_err(|_| JwtError::Malformed)
}

/// The token's `kid`, if its header parses.
pub fn key_id(token: &str) -> Result<Option<String>, JwtError> {
    jsonwebtoken::decode_header(token)
        .map(|header| header.kid)
        .map_err(|_| JwtError::Malformed)
}

/// Verifies `token` with the key of `keys` its `kid` names (or the only key, when it names
/// none), requires one of `audiences`, and checks `exp`/`nbf` against `now` (Unix seconds).
pub fn verify(
    token: &str,
    keys: &JwkSet,
    audiences: &[&str],
    now: i64,
) -> Result<RegisteredClaims, JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    if !ASYMMETRIC.contains(&header.alg) {
        return Err(JwtError::UnsupportedAlgorithm);
    }
    let jwk = match &header.kid {
        Some(kid) => keys.find(kid),
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
    .ok_or(JwtError::UnknownKey)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| JwtError::UnknownKey)?;
    let mut validation = Validation::new(header.alg);
    // Time is checked below, against the emulator's clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_required_spec_claims(&["exp", "aud"]);
    validation.set_audience(audiences);
    let claims = jsonwebtoken::decode::<RegisteredClaims>(token, &key, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => JwtError::BadSignature,
            ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                JwtError::WrongAudience
            }
            _ => JwtError::Malformed,
        })?
        .claims;
    if now > claims.exp.saturating_add(LEEWAY_SECONDS) {
        return Err(JwtError::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECONDS))
    {
        return Err(JwtError::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::SigningKey;
    use serde_json::json;

    fn key() -> SigningKey {
        crate::tokens::tests::key()
    }

    fn keys(key: &SigningKey) -> JwkSet {
        JwkSet {
            keys: vec![key.public_jwk()],
        }
    }

    #[test]
    fn a_token_of_the_key_for_the_audience_within_its_time_verifies() {
        let key = key();
        let token =
            key.mint(&json!({"iss": "i", "sub": "s", "aud": ["x", "a"], "exp": 1000, "nbf": 10}));
        let claims = verify(&token, &keys(&key), &["a"], 1000 + LEEWAY_SECONDS).unwrap();
        assert_eq!((claims.iss.as_str(), claims.sub.as_str()), ("i", "s"));
        assert_eq!(unverified_claims(&token).unwrap(), claims);
        assert_eq!(key_id(&token).unwrap().as_deref(), Some(key.kid()));
    }

    #[test]
    fn each_failure_is_named() {
        let key = key();
        let set = keys(&key);
        let token = key.mint(&json!({"aud": "a", "exp": 1000, "nbf": 900}));
        assert_eq!(
            verify(&token, &set, &["b"], 950),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            verify(&token, &set, &["a"], 1001 + LEEWAY_SECONDS),
            Err(JwtError::Expired)
        );
        assert_eq!(
            verify(&token, &set, &["a"], 899 - LEEWAY_SECONDS),
            Err(JwtError::NotYetValid)
        );
        let no_aud = key.mint(&json!({"exp": 1000}));
        assert_eq!(
            verify(&no_aud, &set, &["a"], 950),
            Err(JwtError::WrongAudience)
        );
        let (signed, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{signed}.{}", "A".repeat(342));
        assert_eq!(
            verify(&forged, &set, &["a"], 950),
            Err(JwtError::BadSignature)
        );
        assert_eq!(
            verify(&token, &JwkSet { keys: vec![] }, &["a"], 950),
            Err(JwtError::UnknownKey)
        );
        assert_eq!(verify("a.b.c", &set, &["a"], 950), Err(JwtError::Malformed));
    }

    #[test]
    fn symmetric_algorithms_are_refused_whatever_the_key() {
        let hs256 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &json!({"aud": "a", "exp": 1000}),
            &jsonwebtoken::EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(
            verify(&hs256, &keys(&key()), &["a"], 950),
            Err(JwtError::UnsupportedAlgorithm)
        );
    }
}
