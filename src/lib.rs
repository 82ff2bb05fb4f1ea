//! acs-identity-operator: keeps Azure Communication Services identities and their access tokens
//! in step with `CommunicationIdentity` resources.

pub mod crd;
pub mod refresh;
pub mod secret;
pub mod status;
