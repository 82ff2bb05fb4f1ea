//! Tokens ACS issued that are not yet recorded in their Secret and status.
//!
//! A Secret or status write can fail after ACS answered (a quota, a terminating namespace, an
//! API-server hiccup). Issuing again on every retry would spend a token of the budget every
//! tenant of that ACS resource shares, so the token is held here until it is recorded and the
//! retry uses it, as long as it still answers what the resource asks for. In memory only: after
//! a restart one more token is issued, which is harmless.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};

use crate::crd::{CommunicationIdentity, CommunicationIdentitySpec, Scope};
use crate::decide::IssueReason;
use crate::refresh::MIN_REMAINING;
use crate::tokens::{TokenEntry, sorted};

/// A token as a pass records it. `expires_on` is in whole seconds, the precision status keeps.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub identity_id: String,
    pub token: String,
    pub expires_on: Timestamp,
    pub endpoint: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("identity_id", &self.identity_id)
            .field("token", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

/// How a token came to be issued, for its event and for which requests it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuance {
    /// With a new identity: the identity's first token.
    Created,
    Issued {
        reason: IssueReason,
        /// Every earlier token was revoked first.
        revoked: bool,
    },
}

/// An issued token waiting to be recorded, with what it was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldToken {
    /// The entry it was issued for; empty for the token of spec.scopes.
    pub name: String,
    pub issued: Issued,
    pub issued_at: Timestamp,
    pub issuance: Issuance,
    scopes: Vec<Scope>,
    lifetime_minutes: Option<i32>,
    /// The refresh and revoke requests pending when it was issued: it answers those.
    refresh_request: Option<String>,
    revoke_request: Option<String>,
}

/// Room beyond [`MIN_REMAINING`] a held token must have left to be handed to workloads.
const HELD_MARGIN: SignedDuration = SignedDuration::from_mins(5);

impl HeldToken {
    pub fn new(
        resource: &CommunicationIdentity,
        entry: &TokenEntry<'_>,
        issued: Issued,
        issued_at: Timestamp,
        issuance: Issuance,
    ) -> Self {
        Self {
            name: entry.name.to_owned(),
            issued,
            issued_at,
            issuance,
            scopes: sorted(entry.scopes),
            lifetime_minutes: entry.token_lifetime_minutes().ok(),
            refresh_request: resource.pending_refresh_request().map(str::to_owned),
            revoke_request: resource.pending_revoke_request().map(str::to_owned),
        }
    }

    /// Whether this token can stand in for the ACS call `resource` needs now: issued for an
    /// entry of the same name, scopes and lifetime, and the same identity, answering any
    /// request still pending, and with well over [`MIN_REMAINING`] left.
    pub fn usable_for(&self, resource: &CommunicationIdentity, now: Timestamp) -> bool {
        let spec: &CommunicationIdentitySpec = &resource.spec;
        let entries = spec.entries();
        let Some(entry) = entries.iter().find(|e| e.name == self.name) else {
            return false;
        };
        let identity = resource
            .status
            .as_ref()
            .and_then(|status| status.identity_id.as_deref())
            .or(spec.adopted_identity_id());
        let answers = |pending: Option<&str>, answered: &Option<String>| {
            pending.is_none_or(|value| answered.as_deref() == Some(value))
        };
        let minimum = SignedDuration::try_from(MIN_REMAINING).unwrap_or(SignedDuration::MAX);
        sorted(entry.scopes) == self.scopes
            && entry.token_lifetime_minutes().ok() == self.lifetime_minutes
            && identity.is_none_or(|id| id == self.issued.identity_id)
            && answers(resource.pending_refresh_request(), &self.refresh_request)
            && answers(resource.pending_revoke_request(), &self.revoke_request)
            && self.issued.expires_on.duration_since(now) > minimum + HELD_MARGIN
    }
}

/// Held tokens by resource UID and entry name: one at most per entry, dropped once recorded
/// or when the resource is released.
#[derive(Default)]
pub struct HeldTokens {
    by_uid: Mutex<HashMap<String, Vec<HeldToken>>>,
}

impl HeldTokens {
    pub fn hold(&self, uid: &str, token: HeldToken) {
        let mut held = self.lock();
        let tokens = held.entry(uid.to_owned()).or_default();
        tokens.retain(|t| t.name != token.name);
        tokens.push(token);
    }

    /// The held token of `uid`'s entry `name` if it can serve `resource` now; an unusable one
    /// is dropped.
    pub fn usable(
        &self,
        uid: &str,
        name: &str,
        resource: &CommunicationIdentity,
        now: Timestamp,
    ) -> Option<HeldToken> {
        let mut held = self.lock();
        let tokens = held.get_mut(uid)?;
        let index = tokens.iter().position(|t| t.name == name)?;
        if tokens[index].usable_for(resource, now) {
            return Some(tokens[index].clone());
        }
        tokens.remove(index);
        if tokens.is_empty() {
            held.remove(uid);
        }
        None
    }

    pub fn release(&self, uid: &str) {
        self.lock().remove(uid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<HeldToken>>> {
        self.by_uid
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        CommunicationIdentityStatus, REFRESH_REQUESTED_ANNOTATION, REVOKE_REQUESTED_ANNOTATION,
    };
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-11-24T10:00:00Z".parse().unwrap()
    }

    fn resource() -> CommunicationIdentity {
        serde_json::from_value(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": { "name": "alice", "namespace": "team", "uid": "u-1" },
            "spec": {
                "connectionSecretRef": { "name": "acs" },
                "scopes": ["chat", "voip"],
                "tokenLifetime": "24h",
            },
            "status": { "identityId": "8:acs:r_1" },
        }))
        .unwrap()
    }

    fn held(resource: &CommunicationIdentity, expires_in_hours: i64) -> HeldToken {
        let issued = Issued {
            identity_id: "8:acs:r_1".into(),
            token: "t".into(),
            expires_on: now() + SignedDuration::from_hours(expires_in_hours),
            endpoint: "https://r.communication.azure.com".into(),
        };
        let issuance = Issuance::Issued {
            reason: IssueReason::SecretLost,
            revoked: false,
        };
        HeldToken::new(
            resource,
            &resource.spec.entries()[0],
            issued,
            now(),
            issuance,
        )
    }

    fn annotated(key: &str, value: &str) -> CommunicationIdentity {
        let mut resource = resource();
        resource
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(key.into(), value.into());
        resource
    }

    #[test]
    fn a_held_token_serves_only_what_it_was_issued_for() {
        let base = resource();
        let cases: Vec<(&str, HeldToken, CommunicationIdentity, bool)> = vec![
            ("same spec, hours left", held(&base, 24), base.clone(), true),
            (
                "scopes in another order",
                held(&base, 24),
                {
                    let mut r = base.clone();
                    r.spec.scopes.reverse();
                    r
                },
                true,
            ),
            (
                "scopes changed",
                held(&base, 24),
                {
                    let mut r = base.clone();
                    r.spec.scopes.pop();
                    r
                },
                false,
            ),
            (
                "lifetime changed",
                held(&base, 24),
                {
                    let mut r = base.clone();
                    r.spec.token_lifetime = "12h".into();
                    r
                },
                false,
            ),
            (
                "another identity",
                held(&base, 24),
                {
                    let mut r = base.clone();
                    r.status = Some(CommunicationIdentityStatus {
                        identity_id: Some("8:acs:r_2".into()),
                        ..Default::default()
                    });
                    r
                },
                false,
            ),
            ("too close to expiry", held(&base, 0), base.clone(), false),
            (
                "a revoke asked for after it was issued",
                held(&base, 24),
                annotated(REVOKE_REQUESTED_ANNOTATION, "r1"),
                false,
            ),
            (
                "issued in answer to that revoke",
                held(&annotated(REVOKE_REQUESTED_ANNOTATION, "r1"), 24),
                annotated(REVOKE_REQUESTED_ANNOTATION, "r1"),
                true,
            ),
            (
                "a refresh asked for after it was issued",
                held(&base, 24),
                annotated(REFRESH_REQUESTED_ANNOTATION, "f1"),
                false,
            ),
        ];
        for (name, token, resource, usable) in cases {
            assert_eq!(token.usable_for(&resource, now()), usable, "{name}");
        }
    }

    #[test]
    fn an_unusable_held_token_is_dropped() {
        let tokens = HeldTokens::default();
        let base = resource();
        tokens.hold("u-1", held(&base, 24));
        assert!(tokens.usable("u-1", "", &base, now()).is_some());
        assert!(
            tokens.usable("u-1", "", &base, now()).is_some(),
            "kept while usable"
        );
        assert!(tokens.usable("u-2", "", &base, now()).is_none());
        let mut changed = base.clone();
        changed.spec.scopes.pop();
        assert!(tokens.usable("u-1", "", &changed, now()).is_none());
        assert!(tokens.usable("u-1", "", &base, now()).is_none(), "dropped");
        tokens.hold("u-1", held(&base, 24));
        tokens.release("u-1");
        assert!(tokens.usable("u-1", "", &base, now()).is_none());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let text = format!("{:?}", held(&resource(), 24));
        assert!(
            !text.contains("\"t\"") && text.contains("<redacted>"),
            "{text}"
        );
    }
}
