//! The Secret that workloads mount: rendered from the resource and the token, and checked for
//! ownership and drift. Pure: the reconciler writes the result.

use std::collections::BTreeMap;

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

/// The resource lacks metadata that every object read from the API server has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "CommunicationIdentity has no metadata.{0}; only objects read from the API server can own a Secret"
)]
pub struct MissingMetadata(&'static str);

/// Renders the complete Secret for `resource` holding `token`.
///
/// `data` (not `stringData`) so that what server-side apply stores equals what was sent, and a
/// later comparison with [`secret_is_current`] is exact. The managed-by label wins over a template
/// label of the same key, as the controller finds its Secrets by that label.
pub fn render_secret(
    resource: &CommunicationIdentity,
    token: &str,
    expires_on: Timestamp,
    identity_id: &str,
    endpoint: &str,
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

    let data = BTreeMap::from([
        (secret_key::TOKEN, token.to_owned()),
        (secret_key::EXPIRES_ON, expires_on.to_string()),
        (secret_key::IDENTITY_ID, identity_id.to_owned()),
        (secret_key::SCOPES, resource.spec.scopes_joined()),
        (secret_key::ENDPOINT, endpoint.to_owned()),
    ])
    .into_iter()
    .map(|(key, value)| (key.to_owned(), ByteString(value.into_bytes())))
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

/// Classifies the resource's own Secret against the token `status` says it holds; for one
/// edited with the token intact, also renders what to write back (no ACS call needed).
pub fn classify(
    resource: &CommunicationIdentity,
    status: &CommunicationIdentityStatus,
    existing: Option<&Secret>,
) -> (SecretState, Option<Secret>) {
    let value = |key: &str| {
        existing
            .and_then(|s| s.data.as_ref())
            .and_then(|data| data.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    let (Some(existing), Some(identity_id), Some(expires_on)) = (
        existing,
        status.identity_id.as_deref(),
        status.token_expires_on.as_ref().map(|t| t.0),
    ) else {
        return (SecretState::TokenMissing, None);
    };
    let (Some(token), Some(endpoint)) = (value(secret_key::TOKEN), value(secret_key::ENDPOINT))
    else {
        return (SecretState::TokenMissing, None);
    };
    if value(secret_key::EXPIRES_ON) != Some(expires_on.to_string()) {
        return (SecretState::TokenMissing, None);
    }
    let Ok(desired) = render_secret(resource, &token, expires_on, identity_id, &endpoint) else {
        return (SecretState::TokenMissing, None);
    };
    if secret_is_current(existing, &desired) {
        (SecretState::Current, None)
    } else {
        (SecretState::TokenIntactButEdited, Some(desired))
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
                connection_secret_ref: ConnectionSecretRef {
                    name: "acs-connection".into(),
                    key: "connectionString".into(),
                },
                scopes: vec![Scope::Chat, Scope::Voip],
                token_lifetime: "24h".into(),
                refresh_before: None,
                secret_name: secret_name.map(Into::into),
                secret_template: template,
                deletion_policy: Default::default(),
                identity_id: None,
            },
        );
        resource.metadata.namespace = Some("chat-app".into());
        resource.metadata.uid = Some(UID.into());
        resource
    }

    fn expires_on() -> Timestamp {
        "2026-11-24T10:00:00Z".parse().unwrap()
    }

    fn render(resource: &CommunicationIdentity) -> Secret {
        render_secret(
            resource,
            "tok-123",
            expires_on(),
            "8:acs:r_1",
            "https://acs.example/",
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
            let (state, rewrite) = classify(&resource, status, existing.as_ref());
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
            render_secret(&no_uid, "t", expires_on(), "id", "e"),
            Err(MissingMetadata("uid"))
        );
        let mut no_namespace = resource(SecretTemplate::default(), None);
        no_namespace.metadata.namespace = None;
        assert_eq!(
            render_secret(&no_namespace, "t", expires_on(), "id", "e"),
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
