//! The Azure Communication Services identity API as the operator and the emulator speak it.
//!
//! This crate knows nothing of Kubernetes: connection strings, HMAC request signing, Entra ID
//! bearer tokens ([`entra`]), the JSON wire types, and (in [`client`]) an async HTTPS client
//! with retries, rate limiting in deadline order ([`schedule`]) and a circuit per endpoint
//! ([`circuit`]).

pub mod api_version;
mod body;
pub mod circuit;
pub mod client;
pub mod connection;
pub mod endpoint;
pub mod entra;
pub mod error;
pub mod ratelimit;
pub mod retry;
pub mod schedule;
pub mod signing;
pub mod wire;

pub use api_version::ApiVersionPolicy;
pub use client::{
    AcsClient, BuildError, ClientOptions, CreatedIdentity, Credential, Observer, RequestOutcome,
};
pub use connection::{AccessKey, ConnectionString, ConnectionStringError};
pub use endpoint::{EndpointListError, EndpointPolicy, is_azure_host};
pub use entra::{FederatedToken, WorkloadIdentity};
pub use error::{Error, MAX_ANSWER_BYTES, ServiceError};
pub use ratelimit::{Operation, Queued, Quota, RateLimits, Turn};
pub use retry::{MAX_RETRY_AFTER, RetryPolicy};
pub use schedule::{Class, Ticket};
