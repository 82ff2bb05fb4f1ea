//! The Azure Communication Services identity API as the operator and the emulator speak it.
//!
//! This crate knows nothing of Kubernetes: connection strings, HMAC request signing, the JSON
//! wire types, and (in [`client`]) an async HTTPS client with retries and rate limiting.

pub mod connection;
pub mod signing;
pub mod wire;

pub use connection::{AccessKey, ConnectionString, ConnectionStringError};
