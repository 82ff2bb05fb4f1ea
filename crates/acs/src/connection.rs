//! Connection strings (`endpoint=https://…/;accesskey=…`) and the access key they carry.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::error::{MAX_ENDPOINT_BYTES, bounded_echo};

/// The decoded access key. Its `Debug` never shows the bytes, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessKey(Vec<u8>);

impl AccessKey {
    pub fn from_base64(encoded: &str) -> Result<Self, ConnectionStringError> {
        let bytes = STANDARD
            .decode(encoded.trim())
            .map_err(|_| ConnectionStringError::KeyNotBase64)?;
        if bytes.is_empty() {
            return Err(ConnectionStringError::MissingKey);
        }
        Ok(Self(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key in the base64 form a connection string carries.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0)
    }
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessKey(<redacted>)")
    }
}

/// A parsed connection string. `endpoint` has no trailing `/`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConnectionString {
    pub endpoint: String,
    pub key: AccessKey,
}

/// What is wrong with a connection string. Messages never contain the key.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConnectionStringError {
    #[error(
        "the connection string has no endpoint; expected `endpoint=https://<resource>.communication.azure.com/;accesskey=<key>`"
    )]
    MissingEndpoint,
    #[error(
        "the connection string has no access key; expected `endpoint=https://<resource>.communication.azure.com/;accesskey=<key>`"
    )]
    MissingKey,
    #[error(
        "the connection string's access key is not valid base64; copy the key from the Azure portal (Keys blade) unchanged"
    )]
    KeyNotBase64,
    #[error("the connection string's endpoint `{0}` is not an absolute http(s) URL")]
    EndpointNotUrl(String),
    #[error(
        "the connection string's endpoint `{0}` uses plain http; ACS requires https (plain http is accepted only when explicitly allowed for local development)"
    )]
    EndpointNotHttps(String),
    #[error("the connection string has a part without `=`: `{0}`")]
    MalformedPart(String),
}

impl ConnectionString {
    /// Parses `endpoint=…;accesskey=…`: key names are case-insensitive, parts split on `;`,
    /// each part on its first `=` (the key itself ends in `=` padding).
    pub fn parse(text: &str, allow_http: bool) -> Result<Self, ConnectionStringError> {
        let mut endpoint = None;
        let mut key = None;
        for part in text
            .trim()
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((name, value)) = part.split_once('=') else {
                // Never echo a part that might be the key itself.
                let shown = if part.len() > 16 { "<elided>" } else { part };
                return Err(ConnectionStringError::MalformedPart(shown.to_owned()));
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.trim().to_owned()),
                "accesskey" => key = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        let endpoint = endpoint
            .filter(|e| !e.is_empty())
            .ok_or(ConnectionStringError::MissingEndpoint)?;
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or(ConnectionStringError::MissingKey)?;
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        // The endpoint is whatever the Secret holds: echoed bounded.
        let shown = || bounded_echo(&endpoint, MAX_ENDPOINT_BYTES);
        let (scheme, authority) = endpoint
            .split_once("://")
            .ok_or_else(|| ConnectionStringError::EndpointNotUrl(shown()))?;
        if authority.is_empty() || authority.contains('/') {
            return Err(ConnectionStringError::EndpointNotUrl(shown()));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "https" => {}
            "http" if allow_http => {}
            "http" => return Err(ConnectionStringError::EndpointNotHttps(shown())),
            _ => return Err(ConnectionStringError::EndpointNotUrl(shown())),
        }
        Ok(Self {
            endpoint,
            key: AccessKey::from_base64(&key)?,
        })
    }

    /// The host that is signed: the endpoint's authority, port included.
    pub fn host(&self) -> &str {
        self.endpoint
            .split_once("://")
            .map_or(&self.endpoint, |(_, authority)| authority)
    }

    /// The connection string in its canonical text form (contains the key: never log it).
    pub fn to_secret_string(&self) -> String {
        format!(
            "endpoint={}/;accesskey={}",
            self.endpoint,
            self.key.to_base64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "YWNzLW9wZXJhdG9yLXRlc3Qta2V5LTAxMjM0NTY3ODk=";

    #[test]
    fn parses_the_portal_form() {
        let parsed = ConnectionString::parse(
            &format!("endpoint=https://r.communication.azure.com/;accesskey={KEY}"),
            false,
        )
        .unwrap();
        assert_eq!(parsed.endpoint, "https://r.communication.azure.com");
        assert_eq!(parsed.host(), "r.communication.azure.com");
        assert_eq!(parsed.key.to_base64(), KEY);
    }

    #[test]
    fn key_names_are_case_insensitive_and_order_free() {
        let parsed = ConnectionString::parse(
            &format!(" AccessKey={KEY} ; Endpoint=https://127.0.0.1:8443/ "),
            false,
        )
        .unwrap();
        assert_eq!(parsed.host(), "127.0.0.1:8443");
    }

    #[test]
    fn reports_what_is_wrong() {
        use ConnectionStringError::*;
        let cases = [
            (format!("accesskey={KEY}"), MissingEndpoint),
            ("endpoint=https://r/".to_owned(), MissingKey),
            (
                "endpoint=https://r/;accesskey=not base64!".to_owned(),
                KeyNotBase64,
            ),
            (
                format!("endpoint=http://r/;accesskey={KEY}"),
                EndpointNotHttps("http://r".into()),
            ),
            (
                format!("endpoint=r.example;accesskey={KEY}"),
                EndpointNotUrl("r.example".into()),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                ConnectionString::parse(&text, false),
                Err(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn a_long_endpoint_is_echoed_bounded() {
        let endpoint = format!("ftp://{}", "r".repeat(1 << 20));
        let error = ConnectionString::parse(&format!("endpoint={endpoint};accesskey={KEY}"), false)
            .unwrap_err();
        assert!(error.to_string().len() < 500, "{}", error.to_string().len());
    }

    #[test]
    fn http_is_accepted_when_allowed() {
        let parsed = ConnectionString::parse(
            &format!("endpoint=http://127.0.0.1:1/;accesskey={KEY}"),
            true,
        )
        .unwrap();
        assert_eq!(parsed.endpoint, "http://127.0.0.1:1");
    }

    #[test]
    fn the_key_never_shows_in_debug_or_errors() {
        let parsed =
            ConnectionString::parse(&format!("endpoint=https://r/;accesskey={KEY}"), false)
                .unwrap();
        assert!(!format!("{parsed:?}").contains(KEY));
        let err =
            ConnectionString::parse(&format!("endpoint=https://r/;{KEY}"), false).unwrap_err();
        assert!(!err.to_string().contains(KEY));
    }
}
