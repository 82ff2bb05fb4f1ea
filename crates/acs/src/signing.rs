//! HMAC-SHA256 request signing, one implementation shared by the client and the emulator.
//!
//! string-to-sign = `VERB \n pathAndQuery \n x-ms-date;host;contentHash`, signed with the
//! base64-decoded access key. See `shared/design/acs-identity-api.md` for the test vectors.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::AccessKey;

/// The value of the `Authorization` header's `SignedHeaders` part, fixed by the service.
pub const SIGNED_HEADERS: &str = "x-ms-date;host;x-ms-content-sha256";
/// Prefix of the `Authorization` header.
pub const SCHEME: &str = "HMAC-SHA256";

/// base64(SHA-256(body)): the `x-ms-content-sha256` header.
pub fn content_hash(body: &[u8]) -> String {
    STANDARD.encode(Sha256::digest(body))
}

/// The exact text that is signed. `path_and_query` is the request-target exactly as sent;
/// `host` is the endpoint's authority including a non-default port.
pub fn string_to_sign(
    method: &str,
    path_and_query: &str,
    date: &str,
    host: &str,
    content_hash: &str,
) -> String {
    format!(
        "{}\n{}\n{};{};{}",
        method.to_ascii_uppercase(),
        path_and_query,
        date,
        host,
        content_hash
    )
}

/// base64(HMAC-SHA256(key, string_to_sign)).
pub fn signature(key: &AccessKey, string_to_sign: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.bytes()).expect("HMAC takes any key length");
    mac.update(string_to_sign.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// The `Authorization` header value for a signature.
pub fn authorization(signature: &str) -> String {
    format!("{SCHEME} SignedHeaders={SIGNED_HEADERS}&Signature={signature}")
}

/// The signature carried by an `Authorization` header, if it has the service's shape.
pub fn parse_authorization(header: &str) -> Option<&str> {
    let rest = header.strip_prefix(SCHEME)?.trim_start();
    let rest = rest.strip_prefix("SignedHeaders=")?;
    let (signed_headers, signature) = rest.split_once("&Signature=")?;
    signed_headers
        .eq_ignore_ascii_case(SIGNED_HEADERS)
        .then_some(signature)
}

/// Everything a signed request carries, computed at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub date: String,
    pub content_hash: String,
    pub authorization: String,
}

/// Signs one request. `date` is an RFC 1123 date such as `Mon, 23 Nov 2026 10:00:00 GMT`.
pub fn sign_request(
    key: &AccessKey,
    method: &str,
    path_and_query: &str,
    host: &str,
    date: &str,
    body: &[u8],
) -> SignedHeaders {
    let content_hash = content_hash(body);
    let to_sign = string_to_sign(method, path_and_query, date, host, &content_hash);
    SignedHeaders {
        date: date.to_owned(),
        authorization: authorization(&signature(key, &to_sign)),
        content_hash,
    }
}

/// Formats a time as the RFC 1123 date the `x-ms-date` header carries.
pub fn http_date(time: jiff::Timestamp) -> String {
    time.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// Parses an `x-ms-date` header value.
pub fn parse_http_date(value: &str) -> Option<jiff::Timestamp> {
    jiff::fmt::rfc2822::parse(value)
        .ok()
        .map(|zoned| zoned.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=";
    const DATE: &str = "Mon, 23 Nov 2026 10:00:00 GMT";

    fn key() -> AccessKey {
        AccessKey::from_base64(KEY).unwrap()
    }

    #[test]
    fn content_hash_matches_the_sdk_vectors() {
        assert_eq!(
            content_hash(b"banana"),
            "tJPUg2Sv5E0RwBZc9HCkFk0eJgmRHvmYvoaNRq3j3k4="
        );
        assert_eq!(
            content_hash(b""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn create_with_token_matches_vector() {
        let body = br#"{"createTokenWithScopes":["chat","voip"],"expiresInMinutes":60}"#;
        let signed = sign_request(
            &key(),
            "POST",
            "/identities?api-version=2023-10-01",
            "my-resource.communication.azure.com",
            DATE,
            body,
        );
        assert_eq!(
            signed.content_hash,
            "jENEeifYNCidF9FcfXJ54WzhK3ED/2UrQyA4+oWOZKc="
        );
        assert_eq!(
            signed.authorization,
            "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=i0t0N8vOYdvFkx0CPEVUTgsVjH1jBL3CFQBLjGNYjQY="
        );
    }

    #[test]
    fn delete_signs_the_target_exactly_as_sent() {
        let encoded = sign_request(
            &key(),
            "DELETE",
            "/identities/8%3Aacs%3Aabc_123?api-version=2023-10-01",
            "127.0.0.1:8443",
            DATE,
            b"",
        );
        assert_eq!(
            parse_authorization(&encoded.authorization),
            Some("j55TRyELGZOfIFaIj4lDiiYiIRuvu203h+rsrwG3xkY=")
        );
        let raw = sign_request(
            &key(),
            "delete",
            "/identities/8:acs:abc_123?api-version=2023-10-01",
            "127.0.0.1:8443",
            DATE,
            b"",
        );
        assert_eq!(
            parse_authorization(&raw.authorization),
            Some("cnjdbyIl1eunaYm47nu4Bd2Bgcdfr1aqvnMnbHra6tA=")
        );
    }

    #[test]
    fn http_dates_round_trip() {
        let time = parse_http_date(DATE).unwrap();
        assert_eq!(http_date(time), DATE);
    }

    #[test]
    fn malformed_authorization_is_rejected() {
        assert_eq!(parse_authorization("Bearer abc"), None);
        assert_eq!(
            parse_authorization("HMAC-SHA256 SignedHeaders=host&Signature=abc"),
            None
        );
    }
}
