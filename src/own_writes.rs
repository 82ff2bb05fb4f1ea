//! The resourceVersion of the operator's newest write to each CommunicationIdentity whose watch
//! event has not reached the cache yet. A pass that starts from a cached object older than that
//! write is redundant: the write's own watch event triggers another pass, which sees it. Such
//! passes are common (the event of the Secret a pass wrote usually arrives before the event of
//! the status it wrote next), and each would otherwise read the Secret and the resource.
//!
//! An entry lives only from a write until its watch event, so the map holds the writes in
//! flight, not one entry per resource. resourceVersions are compared as integers (see
//! `known_secrets`); one that does not parse is not recorded, and the pass goes ahead.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};

use crate::crd::CommunicationIdentity;
use crate::known_secrets::{parse_uid, parse_version};

#[derive(Default)]
pub struct OwnWrites {
    newest: Mutex<HashMap<u128, u64>>,
}

impl OwnWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u128, u64>> {
        self.newest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The operator wrote the resource with `uid`, and the API server answered `written`.
    pub fn wrote(&self, uid: &str, written: &CommunicationIdentity) {
        let version = written.resource_version();
        if let (Some(owner), Some(version)) =
            (parse_uid(uid), version.as_deref().and_then(parse_version))
        {
            let mut newest = self.lock();
            let entry = newest.entry(owner).or_default();
            *entry = (*entry).max(version);
        }
    }

    /// Whether `cached` is older than a write of the operator's whose event is still to come.
    pub fn cache_is_behind(&self, cached: &CommunicationIdentity) -> bool {
        let (Some(owner), Some(version)) = (
            cached.uid().as_deref().and_then(parse_uid),
            cached.resource_version().as_deref().and_then(parse_version),
        ) else {
            return false;
        };
        self.lock()
            .get(&owner)
            .is_some_and(|written| version < *written)
    }

    /// Takes in one event of the CommunicationIdentity watch once the cache holds it: removed
    /// sooner, an entry would let a pass start from the older cached object unnoticed.
    pub fn observe(&self, event: &Event<impl Resource>) {
        match event {
            // A relist shows every object as it is now; what it misses of a write in flight
            // costs one redundant pass, not a wrong one.
            Event::Init => self.lock().clear(),
            Event::InitApply(resource) | Event::Apply(resource) => {
                let Some(owner) = resource.uid().as_deref().and_then(parse_uid) else {
                    return;
                };
                let version = resource
                    .resource_version()
                    .as_deref()
                    .and_then(parse_version);
                let mut newest = self.lock();
                if newest
                    .get(&owner)
                    .is_some_and(|written| version.is_none_or(|seen| seen >= *written))
                {
                    newest.remove(&owner);
                }
            }
            Event::Delete(resource) => {
                if let Some(owner) = resource.uid().as_deref().and_then(parse_uid) {
                    self.lock().remove(&owner);
                }
            }
            Event::InitDone => {}
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn at(version: &str) -> CommunicationIdentity {
        serde_json::from_value(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": { "name": "alice", "namespace": "team", "uid": UID, "resourceVersion": version },
            "spec": { "connectionSecretRef": { "name": "acs" }, "scopes": ["chat"] }
        }))
        .unwrap()
    }

    #[test]
    fn a_cache_older_than_a_write_is_behind_until_the_write_is_watched() {
        let writes = OwnWrites::default();
        assert!(!writes.cache_is_behind(&at("10")), "nothing written");
        writes.wrote(UID, &at("12"));
        writes.wrote(UID, &at("11"));
        assert!(writes.cache_is_behind(&at("10")));
        assert!(writes.cache_is_behind(&at("11")), "the newest write counts");
        assert!(!writes.cache_is_behind(&at("12")));
        writes.observe(&Event::Apply(at("11")));
        assert!(writes.cache_is_behind(&at("11")), "an older event");
        writes.observe(&Event::Apply(at("12")));
        assert_eq!(writes.len(), 0, "the entry ends with its event");
        assert!(!writes.cache_is_behind(&at("10")));
    }

    #[test]
    fn a_relist_or_a_deletion_ends_what_was_recorded() {
        let writes = OwnWrites::default();
        writes.wrote(UID, &at("12"));
        writes.observe(&Event::<CommunicationIdentity>::Init);
        assert!(!writes.cache_is_behind(&at("10")));
        writes.wrote(UID, &at("12"));
        writes.observe(&Event::Delete(at("11")));
        assert_eq!(writes.len(), 0);
    }

    #[test]
    fn versions_that_do_not_parse_are_not_recorded_and_never_hold_a_pass() {
        let writes = OwnWrites::default();
        writes.wrote(UID, &at("v12"));
        assert_eq!(writes.len(), 0);
        writes.wrote(UID, &at("12"));
        assert!(!writes.cache_is_behind(&at("opaque")));
    }
}
