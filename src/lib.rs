//! acs-identity-operator: keeps Azure Communication Services identities and their access tokens
//! in step with `CommunicationIdentity` resources.
