//! acs-identity-operator: keeps Azure Communication Services identities and their access tokens
//! in step with `CommunicationIdentity` resources.

pub mod admin;
pub mod adoption;
pub mod cached;
pub mod connection;
pub mod connection_status;
pub mod context;
pub mod crd;
pub mod decide;
pub mod federated_token;
pub mod held;
pub mod known_secrets;
pub mod kube_call;
pub mod launch;
pub mod leader;
pub mod metrics;
pub mod own_writes;
pub mod pass_queue;
pub mod reconcile;
pub mod record;
pub mod refresh;
pub mod restart;
pub mod run;
pub mod secret;
pub mod status;
pub mod tokens;
pub mod turns;
pub mod urgency;
pub mod wakeups;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod reconcile_tests;
