//! JSON bodies and constants of the identity API, as the service and the SDKs exchange them.

use serde::{Deserialize, Serialize};

/// The api-version the operator sends: the first stable-or-preview version with `customId`,
/// which makes a retried create idempotent.
pub const API_VERSION_WITH_CUSTOM_ID: &str = "2025-03-02-preview";
/// The newest GA api-version: no `customId`, no `GET /identities/{id}`.
pub const NEWEST_GA_API_VERSION: &str = "2026-09-23";

/// Whether `version` has `customId` (and `GET /identities/{id}`).
pub fn has_custom_id(version: &str) -> bool {
    version == API_VERSION_WITH_CUSTOM_ID
}

/// The api-version Microsoft's SDKs send.
pub const API_VERSION_SDK: &str = "2023-10-01";
/// Every api-version the service answers for the identity operations.
pub const API_VERSIONS: &[&str] = &[
    "2021-03-07",
    "2022-06-01",
    "2022-10-01",
    "2023-08-01",
    API_VERSION_SDK,
    "2025-06-30",
    "2026-07-22",
    NEWEST_GA_API_VERSION,
    API_VERSION_WITH_CUSTOM_ID,
];

/// Token scopes the service accepts.
pub const SCOPES: &[&str] = &[
    "chat",
    "voip",
    "chat.join",
    "chat.join.limited",
    "voip.join",
];
/// Bounds of `expiresInMinutes`.
pub const MIN_TOKEN_MINUTES: u32 = 60;
pub const MAX_TOKEN_MINUTES: u32 = 1440;

/// Body of `POST /identities`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateIdentityRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_token_with_scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_minutes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
}

/// Body of `POST /identities/{id}/:issueAccessToken`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueTokenRequest {
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_minutes: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: String,
}

/// A token as the service returns it. `expires_on` is RFC 3339 with up to 7 fractional digits.
/// `Debug` redacts the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessToken {
    pub token: String,
    pub expires_on: String,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

/// Answer to `POST /identities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateIdentityResponse {
    pub identity: Identity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<AccessToken>,
}

/// Answer to `GET /identities/{id}` (preview).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDetails {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_token_issued_at: Option<String>,
}

/// The error body every non-2xx answer carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub innererror: Option<serde_json::Value>,
}

impl ErrorResponse {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
                target: None,
                details: Vec::new(),
                innererror: None,
            },
        }
    }
}

/// Parses an `expiresOn` value (RFC 3339, any number of fractional digits, any offset).
pub fn parse_expires_on(value: &str) -> Option<jiff::Timestamp> {
    value.parse().ok()
}

/// Formats a time as the service does: 7 fractional digits and `+00:00`.
pub fn format_expires_on(time: jiff::Timestamp) -> String {
    let whole = time.strftime("%Y-%m-%dT%H:%M:%S").to_string();
    let ticks = time.subsec_nanosecond() / 100;
    format!("{whole}.{ticks:07}+00:00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_on_round_trips_with_seven_digits() {
        let text = "2026-11-24T10:00:00.1234567+00:00";
        let time = parse_expires_on(text).unwrap();
        assert_eq!(format_expires_on(time), text);
        assert_eq!(
            parse_expires_on("2026-11-24T10:00:00Z")
                .unwrap()
                .as_second(),
            time.as_second()
        );
    }

    #[test]
    fn create_body_omits_what_is_not_asked() {
        let body = serde_json::to_string(&CreateIdentityRequest::default()).unwrap();
        assert_eq!(body, "{}");
        let body = serde_json::to_string(&CreateIdentityRequest {
            create_token_with_scopes: Some(vec!["chat".into()]),
            expires_in_minutes: Some(60),
            custom_id: Some("uid".into()),
        })
        .unwrap();
        assert_eq!(
            body,
            r#"{"createTokenWithScopes":["chat"],"expiresInMinutes":60,"customId":"uid"}"#
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        let token = AccessToken {
            token: "eyJsecret".into(),
            expires_on: "x".into(),
        };
        assert!(!format!("{token:?}").contains("eyJsecret"));
    }
}
