//! The Secret that workloads mount: rendered from the resource and the token, and checked for
//! ownership and drift. Pure: the reconciler writes the result.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::crd::{
    CommunicationIdentity, CommunicationIdentityStatus, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    secret_key,
};
use crate::decide::SecretState;
use crate::tokens;

/// The resource lacks metadata that every object read from the API server has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "CommunicationIdentity has no metadata.{0}; only objects read from the API server can own a Secret"
)]
pub struct MissingMetadata(&'static str);

/// One token as the Secret holds it, under the keys of the entry `name`.
#[derive(Clone, PartialEq, Eq)]
pub struct Delivered {
    pub name: String,
    pub token: String,
    pub expires_on: Timestamp,
}

impl fmt::Debug for Delivered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivered")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

/// Renders the complete Secret for `resource` holding `tokens`, one for each entry of the spec
/// (a token of an entry the spec no longer has is left out).
///
/// `data` (not `stringData`) so that what server-side apply stores equals what was sent, and a
/// later comparison with [`secret_is_current`] is exact. The managed-by label wins over a template
/// label of the same key, as the controller finds its Secrets by that label.
pub fn render_secret(
    resource: &CommunicationIdentity,
    identity_id: &str,
    endpoint: &str,
    tokens: &[Delivered],
) -> Result<Secret, MissingMetadata> {
    let namespace = resource
        .metadata
        .namespace
        .clone()
        .ok_or(MissingMetadata("namespace"))?;
    let mut owner = resource
        .controller_owner_ref(&())
        .ok_or(MissingMetadata("uid"))?;
    // The garbage collector then deletes the owner only after the Secret (foreground deletion).
    owner.block_owner_deletion = Some(true);

    let template = &resource.spec.secret_template;
    let mut labels = template.labels.clone();
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    let annotations = (!template.annotations.is_empty()).then(|| template.annotations.clone());

    let mut data = BTreeMap::from([
        (secret_key::IDENTITY_ID.to_owned(), identity_id.to_owned()),
        (secret_key::ENDPOINT.to_owned(), endpoint.to_owned()),
    ]);
    for entry in resource.spec.entries() {
        let Some(delivered) = tokens.iter().find(|t| t.name == entry.name) else {
            continue;
        };
        data.extend([
            (entry.key(secret_key::TOKEN), delivered.token.clone()),
            (
                entry.key(secret_key::EXPIRES_ON),
                delivered.expires_on.to_string(),
            ),
            (entry.key(secret_key::SCOPES), entry.scopes_joined()),
        ]);
    }
    let data = data
        .into_iter()
        .map(|(key, value)| (key, ByteString(value.into_bytes())))
        .collect();

    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(resource.secret_name()),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations,
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}

/// Who holds a Secret of the name the resource wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretOwnership {
    /// No such Secret: the operator creates it.
    Absent,
    /// This resource is its controller: the operator keeps it current.
    Ours,
    /// Someone else's (or another resource's): never overwritten; Ready=False, SecretConflict.
    Foreign,
}

/// Classifies `existing` against the resource with UID `owner_uid`. Only a controller
/// ownerReference to that UID makes a Secret ours; a managed-by label alone does not (anyone can
/// set a label, and a Secret left behind by a deleted namesake has a different UID).
pub fn ownership(existing: Option<&Secret>, owner_uid: &str) -> SecretOwnership {
    let Some(secret) = existing else {
        return SecretOwnership::Absent;
    };
    let controlled_by_us = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == owner_uid);
    if controlled_by_us {
        SecretOwnership::Ours
    } else {
        SecretOwnership::Foreign
    }
}

/// What the resource's own Secret holds of the tokens status describes. No `Debug`: the
/// Secret to write back holds the tokens.
#[derive(Clone)]
pub struct Classified {
    pub state: SecretState,
    /// The tokens still in the Secret as status describes them, in spec order: those a pass
    /// that issues only some tokens writes back unchanged.
    pub carried: Vec<Delivered>,
    /// The Secret's endpoint, when it carries any token.
    pub endpoint: Option<String>,
    /// For a Secret edited with every token intact: what to write back (no ACS call needed).
    pub rewrite: Option<Secret>,
    /// Keys the operator wrote for tokens the spec no longer asks for, still in the Secret.
    pub stale_keys: Vec<String>,
}

/// Classifies the resource's own Secret against the tokens `status` says it holds.
pub fn classify(
    resource: &CommunicationIdentity,
    status: &CommunicationIdentityStatus,
    existing: Option<&Secret>,
) -> Classified {
    let value = |key: &str| {
        existing
            .and_then(|s| s.data.as_ref())
            .and_then(|data| data.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    let stale_keys: Vec<String> = tokens::stale_keys(status, &resource.spec)
        .into_iter()
        .filter(|key| value(key).is_some())
        .collect();
    let missing = Classified {
        state: SecretState::TokenMissing,
        carried: Vec::new(),
        endpoint: None,
        rewrite: None,
        stale_keys: stale_keys.clone(),
    };
    let (Some(existing), Some(identity_id), Some(endpoint)) = (
        existing,
        status.identity_id.as_deref(),
        value(secret_key::ENDPOINT),
    ) else {
        return missing;
    };
    let states = tokens::token_states(status);
    let entries = resource.spec.entries();
    let carried: Vec<Delivered> = entries
        .iter()
        .filter_map(|entry| {
            let state = tokens::token_state(&states, entry.name)?;
            let expires_on = state.expires_on.as_ref()?.0;
            let token = value(&entry.key(secret_key::TOKEN))?;
            (value(&entry.key(secret_key::EXPIRES_ON)) == Some(expires_on.to_string())).then(|| {
                Delivered {
                    name: entry.name.to_owned(),
                    token,
                    expires_on,
                }
            })
        })
        .collect();
    if carried.len() < entries.len() {
        return Classified {
            carried,
            endpoint: Some(endpoint),
            ..missing
        };
    }
    let Ok(desired) = render_secret(resource, identity_id, &endpoint, &carried) else {
        return missing;
    };
    let (state, rewrite) = match secret_is_current(existing, &desired) && stale_keys.is_empty() {
        true => (SecretState::Current, None),
        false => (SecretState::TokenIntactButEdited, Some(desired)),
    };
    Classified {
        state,
        carried,
        endpoint: Some(endpoint),
        rewrite,
        stale_keys,
    }
}

/// Whether `existing` still carries everything `desired` sets, so no write is needed.
///
/// Only what the operator sets is compared: keys, labels and annotations added by others stay
/// (server-side apply leaves them alone too), so they must not make the Secret look edited.
pub fn secret_is_current(existing: &Secret, desired: &Secret) -> bool {
    let carries_owner = |wanted: &OwnerReference| {
        existing
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|owner| owner == wanted)
    };
    contains_all(&existing.data, &desired.data)
        && contains_all(&existing.metadata.labels, &desired.metadata.labels)
        && contains_all(
            &existing.metadata.annotations,
            &desired.metadata.annotations,
        )
        && desired
            .metadata
            .owner_references
            .iter()
            .flatten()
            .all(carries_owner)
}

fn contains_all<V: PartialEq>(
    existing: &Option<BTreeMap<String, V>>,
    desired: &Option<BTreeMap<String, V>>,
) -> bool {
    desired
        .iter()
        .flatten()
        .all(|(key, value)| existing.as_ref().and_then(|map| map.get(key)) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CommunicationIdentitySpec, ConnectionSecretRef, Scope, SecretTemplate};

    const UID: &str = "7f9c2a4e-0000-4000-8000-000000000001";

    fn resource(template: SecretTemplate, secret_name: Option<&str>) -> CommunicationIdentity {
        let mut resource = CommunicationIdentity::new(
            "alice",
            CommunicationIdentitySpec {
                connection_secret_ref: Some(ConnectionSecretRef {
                    name: "acs-connection".into(),
                    key: "connectionString".into(),
                }),
                connection_ref: None,
                scopes: vec![Scope::Chat, Scope::Voip],
                token_lifetime: "24h".into(),
                refresh_before: None,
                tokens: Vec::new(),
                secret_name: secret_name.map(Into::into),
                secret_template: template,
                deletion_policy: Default::default(),
                identity_id: None,
                rollout_restart_targets: Vec::new(),
                min_restart_interval: None,
            },
        );
        resource.metadata.namespace = Some("chat-app".into());
        resource.metadata.uid = Some(UID.into());
        resource
    }

    fn expires_on() -> Timestamp {
        "2026-11-24T10:00:00Z".parse().unwrap()
    }

    fn delivered(name: &str, token: &str) -> Delivered {
        Delivered {
            name: name.into(),
            token: token.into(),
            expires_on: expires_on(),
        }
    }

    fn render(resource: &CommunicationIdentity) -> Secret {
        render_secret(
            resource,
            "8:acs:r_1",
            "https://acs.example/",
            &[delivered("", "tok-123")],
        )
        .unwrap()
    }

    fn text(secret: &Secret, key: &str) -> String {
        String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
    }

    #[test]
    fn the_secret_is_classified_against_the_token_status_describes() {
        let resource = resource(SecretTemplate::default(), None);
        let status = CommunicationIdentityStatus {
            identity_id: Some("8:acs:r_1".into()),
            token_expires_on: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                expires_on(),
            )),
            ..Default::default()
        };
        let written = render(&resource);
        let edited = |change: fn(&mut Secret)| {
            let mut secret = written.clone();
            change(&mut secret);
            secret
        };
        let cases = [
            ("no Secret", None, &status, SecretState::TokenMissing),
            (
                "as written",
                Some(written.clone()),
                &status,
                SecretState::Current,
            ),
            (
                "a label removed",
                Some(edited(|s| drop(s.metadata.labels.take()))),
                &status,
                SecretState::TokenIntactButEdited,
            ),
            (
                "a key of someone else's added",
                Some(edited(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("extra".into(), ByteString(b"x".to_vec()));
                })),
                &status,
                SecretState::Current,
            ),
            (
                "the token removed",
                Some(edited(|s| drop(s.data.as_mut().unwrap().remove("token")))),
                &status,
                SecretState::TokenMissing,
            ),
            (
                "another expiry",
                Some(edited(|s| {
                    s.data.as_mut().unwrap().insert(
                        "expiresOn".into(),
                        ByteString(b"2030-01-01T00:00:00Z".to_vec()),
                    );
                })),
                &status,
                SecretState::TokenMissing,
            ),
            (
                "status knows no token",
                Some(written.clone()),
                &CommunicationIdentityStatus::default(),
                SecretState::TokenMissing,
            ),
        ];
        for (name, existing, status, expected) in cases {
            let Classified { state, rewrite, .. } = classify(&resource, status, existing.as_ref());
            assert_eq!(state, expected, "{name}");
            assert_eq!(
                rewrite.is_some(),
                expected == SecretState::TokenIntactButEdited,
                "{name}"
            );
            if let Some(rewrite) = rewrite {
                assert!(
                    secret_is_current(&rewrite, &written),
                    "{name}: the rewrite restores it"
                );
            }
        }
    }

    /// `alice` with the two named tokens of the quickstart.
    fn two_tokens() -> CommunicationIdentity {
        let mut resource = resource(SecretTemplate::default(), None);
        resource.spec.scopes.clear();
        resource.spec.tokens = serde_json::from_value(serde_json::json!([
            { "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" },
            { "name": "chat", "scopes": ["chat", "chat.join"] },
        ]))
        .unwrap();
        resource
    }

    #[test]
    fn named_tokens_have_prefixed_keys_and_share_identity_and_endpoint() {
        let secret = render_secret(
            &two_tokens(),
            "8:acs:r_1",
            "https://acs.example/",
            &[delivered("voip", "tok-v"), delivered("chat", "tok-c")],
        )
        .unwrap();
        assert_eq!(
            secret.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            [
                "chat.expiresOn",
                "chat.scopes",
                "chat.token",
                "endpoint",
                "identityId",
                "voip.expiresOn",
                "voip.scopes",
                "voip.token",
            ]
        );
        assert_eq!(text(&secret, "voip.token"), "tok-v");
        assert_eq!(text(&secret, "chat.scopes"), "chat,chat.join");
        assert_eq!(text(&secret, "voip.expiresOn"), "2026-11-24T10:00:00Z");
    }

    #[test]
    fn named_tokens_are_classified_one_by_one() {
        use crate::crd::TokenStatus;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let resource = two_tokens();
        let state = |name: &str| TokenStatus {
            name: name.into(),
            expires_on: Some(Time(expires_on())),
            ..Default::default()
        };
        let status = CommunicationIdentityStatus {
            identity_id: Some("8:acs:r_1".into()),
            tokens: vec![state("voip"), state("chat")],
            ..Default::default()
        };
        let with_removed = CommunicationIdentityStatus {
            tokens: vec![state("voip"), state("chat"), state("video")],
            ..status.clone()
        };
        let both = [delivered("voip", "tok-v"), delivered("chat", "tok-c")];
        let written = render_secret(&resource, "8:acs:r_1", "https://acs.example/", &both).unwrap();
        let without = |key: &'static str| {
            let mut secret = written.clone();
            secret.data.as_mut().unwrap().remove(key);
            secret
        };
        let mut left_over = written.clone();
        left_over
            .data
            .as_mut()
            .unwrap()
            .insert("video.token".into(), ByteString(b"old".to_vec()));
        let cases = [
            (
                "as written",
                &status,
                written.clone(),
                SecretState::Current,
                vec!["voip", "chat"],
                vec![],
            ),
            (
                "one token's key removed",
                &status,
                without("chat.token"),
                SecretState::TokenMissing,
                vec!["voip"],
                vec![],
            ),
            (
                "a removed entry's keys left over",
                &with_removed,
                left_over,
                SecretState::TokenIntactButEdited,
                vec!["voip", "chat"],
                vec!["video.token"],
            ),
            (
                "a removed entry whose keys are gone",
                &with_removed,
                written.clone(),
                SecretState::Current,
                vec!["voip", "chat"],
                vec![],
            ),
        ];
        for (name, status, existing, state, carried, stale) in cases {
            let classified = classify(&resource, status, Some(&existing));
            assert_eq!(classified.state, state, "{name}");
            let names: Vec<&str> = classified.carried.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, carried, "{name}");
            assert_eq!(classified.stale_keys, stale, "{name}");
        }
    }

    #[test]
    fn debug_never_shows_a_delivered_token() {
        let text = format!("{:?}", delivered("voip", "tok-secret"));
        assert!(
            !text.contains("tok-secret") && text.contains("<redacted>"),
            "{text}"
        );
    }

    #[test]
    fn renders_keys_name_and_owner() {
        let secret = render(&resource(SecretTemplate::default(), None));
        assert_eq!(secret.metadata.name.as_deref(), Some("alice-acs-token"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("chat-app"));
        assert_eq!(text(&secret, "token"), "tok-123");
        assert_eq!(text(&secret, "expiresOn"), "2026-11-24T10:00:00Z");
        assert_eq!(text(&secret, "identityId"), "8:acs:r_1");
        assert_eq!(text(&secret, "scopes"), "chat,voip");
        assert_eq!(text(&secret, "endpoint"), "https://acs.example/");
        assert_eq!(secret.data.as_ref().unwrap().len(), 5);
        let owners = secret.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, UID);
        assert_eq!(owners[0].kind, "CommunicationIdentity");
        assert_eq!(owners[0].api_version, "acs-operator.io/v1alpha1");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
        assert_eq!(secret.metadata.annotations, None);
    }

    #[test]
    fn template_labels_and_annotations_are_applied_and_managed_by_wins() {
        let template = SecretTemplate {
            labels: BTreeMap::from([
                ("team".into(), "chat".into()),
                (MANAGED_BY_LABEL.into(), "someone-else".into()),
            ]),
            annotations: BTreeMap::from([("note".into(), "mounted by web".into())]),
        };
        let secret = render(&resource(template, Some("custom")));
        assert_eq!(secret.metadata.name.as_deref(), Some("custom"));
        let labels = secret.metadata.labels.unwrap();
        assert_eq!(labels["team"], "chat");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(
            secret.metadata.annotations.unwrap()["note"],
            "mounted by web"
        );
    }

    #[test]
    fn a_resource_not_from_the_api_server_cannot_own_a_secret() {
        let mut no_uid = resource(SecretTemplate::default(), None);
        no_uid.metadata.uid = None;
        assert_eq!(
            render_secret(&no_uid, "id", "e", &[delivered("", "t")]),
            Err(MissingMetadata("uid"))
        );
        let mut no_namespace = resource(SecretTemplate::default(), None);
        no_namespace.metadata.namespace = None;
        assert_eq!(
            render_secret(&no_namespace, "id", "e", &[delivered("", "t")]),
            Err(MissingMetadata("namespace"))
        );
    }

    #[test]
    fn ownership_cases() {
        let ours = render(&resource(SecretTemplate::default(), None));
        let mut namesake = ours.clone();
        namesake.metadata.owner_references.as_mut().unwrap()[0].uid = "other-uid".into();
        let mut not_controller = ours.clone();
        not_controller.metadata.owner_references.as_mut().unwrap()[0].controller = None;
        let mut labelled_only = ours.clone();
        labelled_only.metadata.owner_references = None;

        let cases = [
            ("no Secret", None, SecretOwnership::Absent),
            (
                "controlled by this resource",
                Some(&ours),
                SecretOwnership::Ours,
            ),
            (
                "controlled by a deleted namesake",
                Some(&namesake),
                SecretOwnership::Foreign,
            ),
            (
                "owner reference without controller",
                Some(&not_controller),
                SecretOwnership::Foreign,
            ),
            (
                "managed-by label but no owner",
                Some(&labelled_only),
                SecretOwnership::Foreign,
            ),
        ];
        for (name, existing, expected) in cases {
            assert_eq!(ownership(existing, UID), expected, "{name}");
        }
    }

    #[test]
    fn drift_cases() {
        let desired = render(&resource(SecretTemplate::default(), None));
        let edit = |change: fn(&mut Secret)| {
            let mut secret = desired.clone();
            change(&mut secret);
            secret
        };
        let cases = [
            ("unchanged", desired.clone(), true),
            (
                "another key added by someone",
                edit(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("extra".into(), ByteString(b"x".to_vec()));
                }),
                true,
            ),
            (
                "an extra label added by someone",
                edit(|s| {
                    s.metadata
                        .labels
                        .as_mut()
                        .unwrap()
                        .insert("x".into(), "y".into());
                }),
                true,
            ),
            (
                "token edited",
                edit(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("token".into(), ByteString(b"forged".to_vec()));
                }),
                false,
            ),
            (
                "key removed",
                edit(|s| {
                    s.data.as_mut().unwrap().remove("expiresOn");
                }),
                false,
            ),
            ("data emptied", edit(|s| s.data = None), false),
            (
                "managed-by label changed",
                edit(|s| {
                    s.metadata
                        .labels
                        .as_mut()
                        .unwrap()
                        .insert(MANAGED_BY_LABEL.into(), "me".into());
                }),
                false,
            ),
            (
                "owner reference removed",
                edit(|s| s.metadata.owner_references = None),
                false,
            ),
        ];
        for (name, existing, expected) in cases {
            assert_eq!(secret_is_current(&existing, &desired), expected, "{name}");
        }
    }
}
