//! What the operator knows of its own token Secrets without reading them: the resourceVersion at
//! which each was last written or read and found as status describes it, and the newest
//! resourceVersion the metadata watch of labelled Secrets has delivered. A pass whose Secret
//! has not moved since needs no GET (most passes are triggered by the operator's own writes);
//! one whose Secret the watch shows changed, or whose resource changed, reads it as before.
//!
//! Compact on purpose, about 50 bytes per Secret: a reflector store of the Secrets' metadata
//! gave the same answers but held a whole `ObjectMeta` each (+22 MiB at 10,000 identities,
//! docs/benchmarks.md). Keys are the owners' UIDs; resourceVersions are compared as integers,
//! which Kubernetes guarantees for objects of one resource since v1.35 (KEP-5504). Anything
//! that does not parse is simply not known, and the pass reads.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

/// What a pass may assume about its Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// As last verified, and nothing newer was watched.
    Unchanged,
    /// The watch has listed every labelled Secret and none belongs to this resource. A Secret
    /// of that name may still exist without the label; creating it then fails with 409 and
    /// the pass reads it.
    Absent,
    /// Read it.
    Unknown,
}

/// The inputs that decide a token Secret's content, hashed: a different generation (the spec
/// and its Secret template), Secret name, identity or expiry of any token (`entries`: each
/// named token's) means the verified content no longer answers for it.
pub fn fingerprint<'a>(
    generation: Option<i64>,
    secret_name: &str,
    identity_id: &str,
    expires_on: Timestamp,
    entries: impl Iterator<Item = (&'a str, Option<Timestamp>)>,
) -> u64 {
    let mut hasher = DefaultHasher::new();
    (generation, secret_name, identity_id, expires_on.as_second()).hash(&mut hasher);
    for (name, expires_on) in entries {
        (name, expires_on.map(|t| t.as_second())).hash(&mut hasher);
    }
    hasher.finish()
}

#[derive(Default)]
pub struct KnownSecrets {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_owner: HashMap<u128, Entry>,
    /// The watch has delivered a complete listing (and is not relisting).
    listed: bool,
    /// Counts the watch's listings; entries not seen in the newest are dropped at its end.
    listing: u32,
}

#[derive(Default, Clone, Copy)]
struct Entry {
    /// Newest resourceVersion the watch delivered (0: none yet).
    watched: u64,
    /// resourceVersion and fingerprint at which the content was last verified.
    verified: Option<(u64, u64)>,
    listing: u32,
}

impl KnownSecrets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What to assume about the Secret of the resource with `owner_uid`, whose content
    /// `fingerprint` describes now (`None`: status describes no token).
    pub fn lookup(&self, owner_uid: &str, fingerprint: Option<u64>) -> Known {
        let Some(owner) = parse_uid(owner_uid) else {
            return Known::Unknown;
        };
        let inner = self.lock();
        match (inner.by_owner.get(&owner), fingerprint) {
            (None, _) if inner.listed => Known::Absent,
            (Some(entry), Some(fingerprint)) => match entry.verified {
                Some((verified, of)) if of == fingerprint && entry.watched <= verified => {
                    Known::Unchanged
                }
                _ => Known::Unknown,
            },
            _ => Known::Unknown,
        }
    }

    /// The Secret of `owner_uid` was written, or read and found as status describes it, at
    /// `resource_version`.
    pub fn verified(&self, owner_uid: &str, resource_version: Option<&str>, fingerprint: u64) {
        let (Some(owner), Some(version)) = (
            parse_uid(owner_uid),
            resource_version.and_then(parse_version),
        ) else {
            return self.forget(owner_uid);
        };
        let mut inner = self.lock();
        let listing = inner.listing;
        let entry = inner.by_owner.entry(owner).or_default();
        entry.verified = Some((version, fingerprint));
        entry.listing = listing;
    }

    /// What was verified of the Secret of `owner_uid` no longer holds (it was found otherwise,
    /// or a write met a change).
    pub fn forget(&self, owner_uid: &str) {
        if let Some(owner) = parse_uid(owner_uid)
            && let Some(entry) = self.lock().by_owner.get_mut(&owner)
        {
            entry.verified = None;
        }
    }

    /// Takes in one event of the metadata watch of the operator's labelled Secrets. Called
    /// before the event triggers a pass, so that pass already sees it.
    pub fn observe(&self, event: &Event<PartialObjectMeta<Secret>>) {
        let mut inner = self.lock();
        match event {
            Event::Init => {
                inner.listed = false;
                inner.listing = inner.listing.wrapping_add(1);
            }
            Event::InitApply(secret) | Event::Apply(secret) => {
                if let (Some(owner), Some(version)) = (owner_of(secret), version_of(secret)) {
                    let listing = inner.listing;
                    let entry = inner.by_owner.entry(owner).or_default();
                    // Only ever forward: a Secret elsewhere naming the same owner can make a
                    // pass read, never skip a read.
                    entry.watched = entry.watched.max(version);
                    entry.listing = listing;
                }
            }
            Event::Delete(secret) => {
                if let Some(owner) = owner_of(secret) {
                    inner.by_owner.remove(&owner);
                }
            }
            Event::InitDone => {
                // Secrets deleted while the watch was down are not in the new listing.
                let listing = inner.listing;
                inner.by_owner.retain(|_, entry| entry.listing == listing);
                inner.listed = true;
            }
        }
    }
}

/// The UID of the object that controls `secret` (as `secret::ownership` reads it).
fn owner_of(secret: &PartialObjectMeta<Secret>) -> Option<u128> {
    let owner = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))?;
    parse_uid(&owner.uid)
}

fn version_of(secret: &PartialObjectMeta<Secret>) -> Option<u64> {
    secret
        .metadata
        .resource_version
        .as_deref()
        .and_then(parse_version)
}

/// A UID in its canonical form (hyphenated hex), as 128 bits.
pub(crate) fn parse_uid(uid: &str) -> Option<u128> {
    let hex: String = uid.chars().filter(|c| *c != '-').collect();
    (hex.len() == 32)
        .then(|| u128::from_str_radix(&hex, 16).ok())
        .flatten()
}

pub(crate) fn parse_version(version: &str) -> Option<u64> {
    version.parse().ok().filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use kube::core::PartialObjectMetaExt;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const OTHER_UID: &str = "11111111-2222-3333-4444-555555555555";

    fn watched(owner_uid: &str, version: &str) -> PartialObjectMeta<Secret> {
        let mut secret: PartialObjectMeta<Secret> = ObjectMeta {
            name: Some("alice-token".into()),
            resource_version: Some(version.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "acs-operator.io/v1alpha1".into(),
                kind: "CommunicationIdentity".into(),
                name: "alice".into(),
                uid: owner_uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        }
        .into_response_partial();
        secret.metadata.namespace = Some("team".into());
        secret
    }

    fn listed(secrets: &[PartialObjectMeta<Secret>]) -> KnownSecrets {
        let known = KnownSecrets::default();
        known.observe(&Event::Init);
        for secret in secrets {
            known.observe(&Event::InitApply(secret.clone()));
        }
        known.observe(&Event::InitDone);
        known
    }

    /// The fingerprint of the resource as the cases see it.
    fn fp() -> u64 {
        fingerprint_of(Some(1))
    }

    fn fingerprint_of(generation: Option<i64>) -> u64 {
        let entries = [("voip", Some(Timestamp::UNIX_EPOCH))].into_iter();
        fingerprint(
            generation,
            "alice-token",
            "8:acs:x",
            Timestamp::UNIX_EPOCH,
            entries,
        )
    }

    #[test]
    fn what_a_pass_may_assume() {
        let other_fp = fingerprint_of(Some(2));
        type Setup = fn(&KnownSecrets);
        let cases: &[(&str, bool, Setup, Option<u64>, Known)] = &[
            (
                "before the watch listed, nothing is known",
                false,
                |_| {},
                None,
                Known::Unknown,
            ),
            (
                "listed without its Secret: absent",
                true,
                |_| {},
                None,
                Known::Absent,
            ),
            (
                "written, the watch not yet caught up",
                true,
                |k| k.verified(UID, Some("7"), fp()),
                Some(fp()),
                Known::Unchanged,
            ),
            (
                "written, the watch delivered that write",
                true,
                |k| {
                    k.verified(UID, Some("7"), fp());
                    k.observe(&Event::Apply(watched(UID, "7")));
                },
                Some(fp()),
                Known::Unchanged,
            ),
            (
                "changed after the write: read",
                true,
                |k| {
                    k.verified(UID, Some("7"), fp());
                    k.observe(&Event::Apply(watched(UID, "9")));
                },
                Some(fp()),
                Known::Unknown,
            ),
            (
                "changed before our write was recorded: still read",
                true,
                |k| {
                    k.observe(&Event::Apply(watched(UID, "9")));
                    k.verified(UID, Some("7"), fp());
                },
                Some(fp()),
                Known::Unknown,
            ),
            (
                "the resource changed since (another fingerprint): read",
                true,
                |k| k.verified(UID, Some("7"), fp()),
                Some(other_fp),
                Known::Unknown,
            ),
            (
                "status describes no token but a Secret is there: read",
                true,
                |k| k.observe(&Event::Apply(watched(UID, "7"))),
                None,
                Known::Unknown,
            ),
            (
                "deleted: absent",
                true,
                |k| {
                    k.verified(UID, Some("7"), fp());
                    k.observe(&Event::Delete(watched(UID, "8")));
                },
                Some(fp()),
                Known::Absent,
            ),
            (
                "forgotten after a conflict: read",
                true,
                |k| {
                    k.verified(UID, Some("7"), fp());
                    k.forget(UID);
                },
                Some(fp()),
                Known::Unknown,
            ),
            (
                "another namespace's Secret naming this owner only ever forces a read",
                true,
                |k| {
                    k.observe(&Event::Apply(watched(UID, "9")));
                    k.verified(UID, Some("12"), fp());
                    k.observe(&Event::Apply(watched(UID, "3")));
                },
                Some(fp()),
                Known::Unchanged,
            ),
            (
                "a resourceVersion that is not an integer is never trusted",
                true,
                |k| k.verified(UID, Some("abc"), fp()),
                Some(fp()),
                Known::Absent,
            ),
        ];
        for (name, list, setup, fingerprint, expected) in cases {
            let known = if *list {
                listed(&[])
            } else {
                KnownSecrets::default()
            };
            setup(&known);
            assert_eq!(known.lookup(UID, *fingerprint), *expected, "{name}");
        }
    }

    #[test]
    fn a_relist_drops_secrets_deleted_while_the_watch_was_down() {
        let known = listed(&[watched(UID, "5"), watched(OTHER_UID, "6")]);
        let fp = fingerprint_of(None);
        known.verified(UID, Some("5"), fp);
        known.verified(OTHER_UID, Some("6"), fp);
        known.observe(&Event::Init);
        assert_eq!(
            known.lookup("22222222-2222-2222-2222-222222222222", None),
            Known::Unknown,
            "not absent while relisting"
        );
        known.observe(&Event::InitApply(watched(OTHER_UID, "6")));
        known.observe(&Event::InitDone);
        assert_eq!(known.lookup(UID, Some(fp)), Known::Absent);
        assert_eq!(known.lookup(OTHER_UID, Some(fp)), Known::Unchanged);
    }

    #[test]
    fn an_owner_uid_that_does_not_parse_is_never_absent() {
        let known = listed(&[]);
        assert_eq!(known.lookup("not-a-uid", None), Known::Unknown);
    }
}
