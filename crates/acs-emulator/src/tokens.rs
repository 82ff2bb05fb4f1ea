//! ACS access tokens: RS256 JWTs with the real service's header and claims. The same key
//! signs the Entra access tokens the emulator's authority issues (see `entra`), and its public
//! half is served as that authority's JWKS.
//!
//! The key is generated once (by the `rsa` crate, since ring cannot generate RSA keys) and
//! signing and verification use ring, which is several times faster than `rsa` at signing.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, RsaKeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The real tokens' `scp` claim.
const SCP: u32 = 1792;

/// The claims of an ACS token, in the order the service writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The identity id without its leading `8:`.
    pub skypeid: String,
    pub scp: u32,
    /// The issue time as a string.
    pub csi: String,
    pub exp: i64,
    pub rgn: String,
    /// The granted scopes, comma-separated.
    #[serde(rename = "acsScope")]
    pub acs_scope: String,
    #[serde(rename = "resourceId")]
    pub resource_id: String,
    #[serde(rename = "resourceLocation")]
    pub resource_location: String,
    pub iat: i64,
}

impl Claims {
    pub fn new(
        identity_id: &str,
        resource_id: &str,
        scopes: &[String],
        iat: i64,
        exp: i64,
    ) -> Self {
        Self {
            skypeid: identity_id
                .strip_prefix("8:")
                .unwrap_or(identity_id)
                .to_owned(),
            scp: SCP,
            csi: iat.to_string(),
            exp,
            rgn: "amer".to_owned(),
            acs_scope: scopes.join(","),
            resource_id: resource_id.to_owned(),
            resource_location: "unitedstates".to_owned(),
            iat,
        }
    }

    /// The identity id the token was issued for (`8:` + `skypeid`).
    pub fn identity_id(&self) -> String {
        format!("8:{}", self.skypeid)
    }
}

/// Why a token does not parse or verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
}

/// The RSA key tokens are signed with. Cheap to clone.
#[derive(Clone)]
pub struct SigningKey(Arc<Inner>);

struct Inner {
    pair: RsaKeyPair,
    pkcs8: Vec<u8>,
    kid: String,
    /// The base64url JWT header, the same for every token.
    header: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.0.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh 2048-bit key, the size the real service's tokens carry. Takes a fraction of a
    /// second to a few seconds.
    pub fn generate() -> anyhow::Result<Self> {
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
            .context("generating the token-signing RSA key")?;
        let der = key
            .to_pkcs8_der()
            .context("encoding the token-signing key")?;
        Self::from_pkcs8(der.as_bytes())
    }

    /// Loads a key kept from an earlier run (see `--state`).
    pub fn from_pkcs8(der: &[u8]) -> anyhow::Result<Self> {
        let pair = RsaKeyPair::from_pkcs8(der)
            .map_err(|e| anyhow::anyhow!("the token-signing key is not a usable RSA key: {e}"))?;
        let thumbprint = thumbprint(pair.public().as_ref());
        let kid = thumbprint.as_ref().iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02X}");
            s
        });
        let header = serde_json::json!({
            "alg": "RS256",
            "kid": kid,
            "x5t": URL_SAFE_NO_PAD.encode(thumbprint.as_ref()),
            "typ": "JWT",
        });
        Ok(Self(Arc::new(Inner {
            header: URL_SAFE_NO_PAD.encode(header.to_string()),
            pair,
            pkcs8: der.to_vec(),
            kid,
            rng: SystemRandom::new(),
        })))
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0.pkcs8
    }

    pub fn kid(&self) -> &str {
        &self.0.kid
    }

    /// The public half as a JWK (`kid` as in the tokens' header): what the Entra discovery
    /// serves at its `jwks_uri`, and what the identity API checks bearer tokens against.
    pub fn public_jwk(&self) -> jsonwebtoken::jwk::Jwk {
        let components = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(self.0.pair.public());
        serde_json::from_value(serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.0.kid,
            "x5t": URL_SAFE_NO_PAD.encode(self.thumbprint()),
            "n": URL_SAFE_NO_PAD.encode(components.n),
            "e": URL_SAFE_NO_PAD.encode(components.e),
        }))
        .expect("an RSA JWK deserialises")
    }

    fn thumbprint(&self) -> ring::digest::Digest {
        thumbprint(self.0.pair.public().as_ref())
    }

    /// Mints `header.payload.signature` over any claims (ACS's [`Claims`], or an Entra
    /// token's).
    pub fn mint(&self, claims: &impl Serialize) -> String {
        let json = serde_json::to_string(claims).expect("claims serialise");
        let mut token = format!("{}.{}", self.0.header, sdk_safe_payload(&json));
        let mut sig = vec![0; self.0.pair.public().modulus_len()];
        self.0
            .pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &self.0.rng,
                token.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing with a valid key does not fail");
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig));
        token
    }

    /// Checks the signature and returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let (signed, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (_, payload) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        UnparsedPublicKey::new(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            self.0.pair.public().as_ref(),
        )
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
    }
}

/// The real `kid` is the signing certificate's SHA-1 thumbprint; without a certificate, the
/// thumbprint of the public key is as stable and as unique.
fn thumbprint(public_key_der: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, public_key_der)
}

/// Encodes a JSON payload so that its base64url form never contains `-` or `_`.
///
/// The Python SDK decodes the payload with *standard* base64, which silently drops `-` and
/// `_`. In base64 of 7-bit ASCII, a 6-bit group can only be 62 or 63 when it is the low six
/// bits of the third byte of a 3-byte group, i.e. that byte is `>`, `?`, `~` or DEL (the other
/// groups take at most 4 bits from a byte whose top bit is 0 and stay ≤ 61). Escaping those
/// characters and every non-ASCII one as `\uXXXX` inside JSON strings (the only place they can
/// occur in JSON) keeps the claims' meaning and makes the property hold for any content.
fn sdk_safe_payload(json: &str) -> String {
    let needs_escape = |c: char| !c.is_ascii() || matches!(c, '>' | '?' | '~' | '\u{7f}');
    if !json.contains(needs_escape) {
        return URL_SAFE_NO_PAD.encode(json);
    }
    let mut escaped = String::with_capacity(json.len() + 16);
    let mut units = [0u16; 2];
    for c in json.chars() {
        if needs_escape(c) {
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(escaped, "\\u{unit:04x}");
            }
        } else {
            escaped.push(c);
        }
    }
    URL_SAFE_NO_PAD.encode(escaped)
}

/// Decodes a payload exactly as the Python SDK does (`base64.b64decode(part + "==")`, standard
/// alphabet), for tests that prove the SDK reads the same claims.
#[cfg(test)]
pub(crate) fn decode_like_python_sdk(payload: &str) -> Option<Vec<u8>> {
    let unpadded = payload.trim_end_matches('=');
    let padding = (4 - unpadded.len() % 4) % 4;
    base64::engine::general_purpose::STANDARD
        .decode(format!("{unpadded}{}", "=".repeat(padding)))
        .ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::OnceLock;

    pub(crate) fn key() -> SigningKey {
        static KEY: OnceLock<SigningKey> = OnceLock::new();
        KEY.get_or_init(|| SigningKey::generate().unwrap()).clone()
    }

    #[test]
    fn tokens_have_the_real_header_and_claims() {
        let key = key();
        let claims = Claims::new(
            "8:acs:0d3c0f6e-8f0a-4c2e-9a53-1f8b9d1a2b3c_00000001-0002-0003-0004-000000000005",
            "0d3c0f6e-8f0a-4c2e-9a53-1f8b9d1a2b3c",
            &["chat".into(), "voip".into()],
            1_800_000_000,
            1_800_003_600,
        );
        let token = key.mint(&claims);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        let kid = header["kid"].as_str().unwrap();
        assert_eq!(kid.len(), 40);
        assert!(
            kid.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        );
        let x5t = URL_SAFE_NO_PAD
            .decode(header["x5t"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            x5t.iter().map(|b| format!("{b:02X}")).collect::<String>(),
            kid
        );
        let payload: serde_json::Value =
            serde_json::from_slice(&decode_like_python_sdk(parts[1]).unwrap()).unwrap();
        assert_eq!(
            payload,
            serde_json::json!({
                "skypeid": "acs:0d3c0f6e-8f0a-4c2e-9a53-1f8b9d1a2b3c_00000001-0002-0003-0004-000000000005",
                "scp": 1792, "csi": "1800000000", "exp": 1_800_003_600, "rgn": "amer",
                "acsScope": "chat,voip", "resourceId": "0d3c0f6e-8f0a-4c2e-9a53-1f8b9d1a2b3c",
                "resourceLocation": "unitedstates", "iat": 1_800_000_000,
            })
        );
        assert_eq!(key.verify(&token), Ok(claims));
    }

    #[test]
    fn tampered_and_foreign_tokens_are_refused() {
        let key = key();
        let claims = Claims::new("8:acs:r_1", "r", &["voip".into()], 10, 3610);
        let token = key.mint(&claims);
        let forged = token.replacen(".", ".e30", 1);
        assert_eq!(key.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(key.verify("not a token"), Err(TokenError::Malformed));
        let other = SigningKey::from_pkcs8(key.pkcs8_der()).unwrap();
        assert_eq!(other.kid(), key.kid());
        assert_eq!(other.verify(&token), Ok(claims));
    }

    #[test]
    fn payloads_never_contain_url_only_base64_characters() {
        // Every character that could produce `-` or `_`, in every alignment, plus non-ASCII.
        for prefix in ["", "a", "ab"] {
            for nasty in ["???", ">>>", "~~~", "\u{7f}\u{7f}", "é✓𝄞", "a?b>c~d"] {
                let json = serde_json::json!({ "x": format!("{prefix}{nasty}") }).to_string();
                let payload = sdk_safe_payload(&json);
                assert!(!payload.contains(['-', '_']), "{json} -> {payload}");
                let decoded = decode_like_python_sdk(&payload).unwrap();
                let back: serde_json::Value = serde_json::from_slice(&decoded).unwrap();
                assert_eq!(back["x"], format!("{prefix}{nasty}"));
            }
        }
    }
}
