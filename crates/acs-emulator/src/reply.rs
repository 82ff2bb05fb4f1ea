//! What the API and the admin endpoints answer alike: JSON bodies, errors in the service's
//! error shape, and request bodies read within a bound.

use acs::wire::ErrorResponse;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::store::StoreError;

/// The largest request body read, admin bodies included; the API's bodies are a few hundred
/// bytes.
const MAX_BODY: usize = 64 * 1024;

pub(crate) type Reply = Response<Full<Bytes>>;

/// An answer that is not a success.
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    code: &'static str,
    message: String,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Denied", message)
    }

    pub(crate) fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ValidationError", message)
    }

    pub(crate) fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "IdentityNotFound",
            format!("Identity '{id}' was not found."),
        )
    }

    pub(crate) fn with_retry_after(self, seconds: u64) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }

    pub(crate) fn reply(self) -> Reply {
        let mut reply = json_reply(self.status, &ErrorResponse::new(self.code, self.message));
        // Only a throttling answer carries Retry-After: azure-core retries any status that
        // has it, which would turn a 400 into pointless retries.
        if let Some(seconds) = self.retry_after {
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        reply
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::new(
                StatusCode::NOT_FOUND,
                "IdentityNotFound",
                "The identity was not found.",
            ),
            StoreError::Persist(e) => {
                tracing::error!("writing the state file failed: {e}");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    "The emulator could not write its state file.",
                )
            }
        }
    }
}

pub(crate) fn json_reply(status: StatusCode, body: &impl serde::Serialize) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).expect("bodies serialise"),
    )));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    reply
}

pub(crate) fn empty_reply(status: StatusCode) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = status;
    reply
}

/// The whole body, or 413 past [`MAX_BODY`] so a client cannot make the server buffer
/// without bound.
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("The request body is larger than {MAX_BODY} bytes."),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("The request body could not be read: {e}"),
        )),
    }
}
