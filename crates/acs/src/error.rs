//! What can go wrong talking to ACS. Messages say what to fix and never carry the access key or
//! a token: only the service's error `code`/`message`, status codes, the endpoint and ids.

use std::fmt;
use std::time::Duration;

use crate::ratelimit::{Operation, Queued};

/// The largest answer the client reads. Identity answers are well under 2 KiB; anything near
/// this is not ACS talking, and reading it whole would let the endpoint fill memory.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The error body ACS returned, with the HTTP status it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

/// A failed ACS call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ACS rejected the access key ({0}): check the accesskey in the connection Secret and that this machine's clock is correct"
    )]
    Unauthorized(ServiceError),
    /// ACS answered 401 to a request with an Entra ID bearer token.
    #[error(
        "ACS rejected the Microsoft Entra ID token ({0}): check that the Entra application has a role on the ACS resource (Microsoft's quickstart assigns Contributor) and that the endpoint is that resource's"
    )]
    TokenRejected(ServiceError),
    #[error(
        "ACS rejected the request as invalid ({0}): check the scopes and the token lifetime (60..=1440 minutes)"
    )]
    BadRequest(ServiceError),
    #[error("ACS has no such identity ({0})")]
    NotFound(ServiceError),
    #[error("ACS is throttling requests ({error}){}", retry_after_text(.retry_after))]
    Throttled {
        error: ServiceError,
        retry_after: Option<Duration>,
    },
    #[error("ACS is unavailable ({0}); try again later")]
    Unavailable(ServiceError),
    #[error(
        "ACS did not answer within {after:?}: check the network path to the endpoint, or raise the request timeout"
    )]
    Timeout { after: Duration },
    #[error(
        "could not reach ACS at {endpoint}: {cause}; check the endpoint in the connection string, DNS, network policies and, for a private CA, --acs-ca-file"
    )]
    Connection {
        endpoint: String,
        cause: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "ACS's answer to {} exceeded {} KiB (HTTP {status}), far more than any identity answer: check that the connection string's endpoint is the ACS resource itself; try again later",
        .operation.as_str(),
        MAX_ANSWER_BYTES / 1024
    )]
    AnswerTooLarge { operation: Operation, status: u16 },
    /// Not sent: the request waits its turn for the endpoint's budget (or, `circuit_open`, for
    /// the endpoint to answer a probe); it is called back when its turn comes.
    #[error("{}", queued_text(.since, *.circuit_open))]
    Queued {
        since: jiff::Timestamp,
        circuit_open: bool,
    },
    /// Entra ID answered the token request with a refusal (4xx): `codes` are its AADSTS codes.
    #[error(
        "Microsoft Entra ID refused the token request (HTTP {status}{}): {description}",
        codes_text(.codes)
    )]
    EntraRefused {
        status: u16,
        codes: String,
        description: String,
    },
    /// The token request got no answer that says anything (unreachable, timeout, 5xx).
    #[error("could not get a Microsoft Entra ID token from {authority}: {cause}")]
    EntraUnavailable { authority: String, cause: String },
    /// The federated token to present to Entra could not be had.
    #[error("could not get the federated token to present to Microsoft Entra ID: {cause}")]
    FederatedTokenUnavailable { cause: String },
    #[error("ACS answered {} with an unexpected response (HTTP {status}): {detail}", .operation.as_str())]
    UnexpectedResponse {
        operation: Operation,
        status: u16,
        detail: String,
    },
}

fn queued_text(since: &jiff::Timestamp, circuit_open: bool) -> String {
    match circuit_open {
        true => format!(
            "ACS is unavailable: waiting for the endpoint to recover since {since}; it failed repeatedly, so one probe at a time goes out, and this request follows in deadline order once one succeeds"
        ),
        false => format!(
            "waiting for ACS budget since {since}: the endpoint's rate limit is shared, and more urgent requests go first"
        ),
    }
}

fn codes_text(codes: &str) -> String {
    match codes.is_empty() {
        true => String::new(),
        false => format!(", {codes}"),
    }
}

fn retry_after_text(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(after) => format!("; it asked to retry after {}s", after.as_secs()),
        None => String::new(),
    }
}

impl From<Queued> for Error {
    fn from(queued: Queued) -> Self {
        Error::Queued {
            since: queued.since,
            circuit_open: queued.circuit_open,
        }
    }
}

impl Error {
    /// A bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Unauthorized(_) | Error::TokenRejected(_) => "unauthorized",
            Error::BadRequest(_) => "bad_request",
            Error::NotFound(_) => "not_found",
            Error::Throttled { .. } => "throttled",
            Error::Unavailable(_) => "unavailable",
            Error::Timeout { .. } => "timeout",
            Error::Connection { .. } => "connection",
            Error::AnswerTooLarge { .. } => "answer_too_large",
            Error::Queued { .. } => "queued",
            Error::UnexpectedResponse { .. } => "unexpected_response",
            Error::EntraRefused { .. } => "entra_refused",
            Error::EntraUnavailable { .. } => "entra_unavailable",
            Error::FederatedTokenUnavailable { .. } => "federated_token_unavailable",
        }
    }

    /// Whether the service refused the request's api-version (400 `UnsupportedApiVersion`, as
    /// ACS answers once it has retired a version).
    pub fn is_unsupported_api_version(&self) -> bool {
        matches!(self, Error::BadRequest(error) if error.code == "UnsupportedApiVersion")
    }

    /// Whether the request may have been carried out although no answer came (a timeout, or
    /// a connection lost after it was made).
    pub fn is_lost_answer(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Connection { source, .. } => !source.is_connect(),
            _ => false,
        }
    }

    /// Whether trying again later may succeed (throttling, 5xx, timeouts, connection failures).
    /// An oversized answer counts too: like a 5xx it says nothing about the request, and what
    /// answers may change (a proxy's error page goes away), so the caller backs off.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Throttled { .. }
                | Error::Unavailable(_)
                | Error::Timeout { .. }
                | Error::Connection { .. }
                | Error::AnswerTooLarge { .. }
                | Error::EntraUnavailable { .. }
        )
    }

    /// The HTTP status, when the service answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::UnexpectedResponse { status, .. } | Error::AnswerTooLarge { status, .. } => {
                Some(*status)
            }
            _ => self.service_error().map(|error| error.status),
        }
    }

    /// The service's error code and message, when it sent them.
    pub fn service_error(&self) -> Option<&ServiceError> {
        match self {
            Error::Unauthorized(error)
            | Error::TokenRejected(error)
            | Error::BadRequest(error)
            | Error::NotFound(error)
            | Error::Throttled { error, .. }
            | Error::Unavailable(error) => Some(error),
            Error::Timeout { .. }
            | Error::Connection { .. }
            | Error::AnswerTooLarge { .. }
            | Error::Queued { .. }
            | Error::UnexpectedResponse { .. }
            | Error::EntraRefused { .. }
            | Error::EntraUnavailable { .. }
            | Error::FederatedTokenUnavailable { .. } => None,
        }
    }

    /// How long the service asked us to wait (429 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The innermost cause of an error chain: for a failed connection that is the useful part
/// ("Connection refused", "invalid peer certificate: UnknownIssuer").
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    bounded_echo(&current.to_string(), MAX_CAUSE_BYTES)
}

/// Longest service error `code` echoed, in bytes (ACS codes are words like `Denied`).
pub(crate) const MAX_CODE_BYTES: usize = 64;
/// Longest service error `message` echoed, in bytes: room for any real ACS message.
pub(crate) const MAX_MESSAGE_BYTES: usize = 300;
/// Longest endpoint (or host) echoed, in bytes: a DNS name has at most 253.
pub(crate) const MAX_ENDPOINT_BYTES: usize = 300;
/// Longest low-level cause (a connection or TLS error) echoed, in bytes.
const MAX_CAUSE_BYTES: usize = 300;

/// `text` made fit to echo in conditions, Events and logs, whoever's server it came from: cut
/// to at most `max_bytes` (plus the `…` that marks a cut) on a character boundary, with control
/// and bidirectional-override characters (which could forge log lines or reorder what a
/// reader sees) replaced by spaces. Only the kept part is visited, however long `text` is.
pub(crate) fn bounded_echo(text: &str, max_bytes: usize) -> String {
    let mut kept = String::with_capacity(text.len().min(max_bytes) + '…'.len_utf8());
    for character in text.chars() {
        let character = if is_unsafe_to_echo(character) {
            ' '
        } else {
            character
        };
        if kept.len() + character.len_utf8() > max_bytes {
            kept.push('…');
            break;
        }
        kept.push(character);
    }
    kept
}

fn is_unsafe_to_echo(character: char) -> bool {
    character.is_control() || matches!(character, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(status: u16) -> ServiceError {
        ServiceError {
            status,
            code: "Denied".into(),
            message: "Denied by the resource provider.".into(),
        }
    }

    #[test]
    fn messages_are_actionable() {
        assert_eq!(
            Error::Unauthorized(service(401)).to_string(),
            "ACS rejected the access key (401 Denied: Denied by the resource provider.): check the accesskey in the connection Secret and that this machine's clock is correct"
        );
        let refused = Error::EntraRefused {
            status: 400,
            codes: "AADSTS700016".into(),
            description: "AADSTS700016: Application not found.".into(),
        };
        assert_eq!(
            refused.to_string(),
            "Microsoft Entra ID refused the token request (HTTP 400, AADSTS700016): AADSTS700016: Application not found."
        );
        assert!(!refused.is_transient());
        let unreachable = Error::EntraUnavailable {
            authority: "https://login.microsoftonline.com".into(),
            cause: "connection refused".into(),
        };
        assert!(unreachable.is_transient());
        assert_eq!(unreachable.status(), None);
        let throttled = Error::Throttled {
            error: service(429),
            retry_after: Some(Duration::from_secs(7)),
        };
        assert!(throttled.to_string().ends_with("retry after 7s"));
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(throttled.status(), Some(429));
        let unexpected = Error::UnexpectedResponse {
            operation: Operation::DeleteIdentity,
            status: 200,
            detail: "expected 204".into(),
        };
        assert_eq!(
            unexpected.to_string(),
            "ACS answered delete_identity with an unexpected response (HTTP 200): expected 204"
        );
        assert_eq!(unexpected.status(), Some(200));
        let too_large = Error::AnswerTooLarge {
            operation: Operation::IssueToken,
            status: 200,
        };
        assert_eq!(
            too_large.to_string(),
            "ACS's answer to issue_token exceeded 64 KiB (HTTP 200), far more than any identity answer: check that the connection string's endpoint is the ACS resource itself; try again later"
        );
        assert_eq!(too_large.status(), Some(200));
        assert_eq!(too_large.metric_label(), "answer_too_large");
    }

    #[test]
    fn only_transient_errors_are_transient() {
        assert!(Error::Unavailable(service(503)).is_transient());
        assert!(
            Error::AnswerTooLarge {
                operation: Operation::CreateIdentity,
                status: 201
            }
            .is_transient()
        );
        assert!(
            Error::Timeout {
                after: Duration::from_secs(1)
            }
            .is_transient()
        );
        for permanent in [
            Error::Unauthorized(service(401)),
            Error::BadRequest(service(400)),
            Error::NotFound(service(404)),
        ] {
            assert!(!permanent.is_transient(), "{}", permanent.metric_label());
        }
    }

    #[test]
    fn echoes_are_cut_on_a_character_boundary_and_cleaned() {
        assert_eq!(bounded_echo("Denied", 64), "Denied");
        assert_eq!(bounded_echo("abcdef", 6), "abcdef");
        assert_eq!(bounded_echo("abcdefg", 6), "abcdef…");
        // 'é' is two bytes: it does not fit in the third and fourth, so the cut comes before it.
        assert_eq!(bounded_echo("abcé", 4), "abc…");
        assert_eq!(
            bounded_echo("line\nforged\r\x1b[31m\u{202E}", 64),
            "line forged  [31m "
        );
        assert_eq!(bounded_echo("", 0), "");
        assert_eq!(bounded_echo("x", 0), "…");
        let huge = "é".repeat(1 << 20);
        let cut = bounded_echo(&huge, MAX_MESSAGE_BYTES);
        assert!(
            cut.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8(),
            "{}",
            cut.len()
        );
        assert!(cut.ends_with("é…"));
    }
}
