//! Whether an identity named in `spec.identityId` may be adopted. Pure: the reconciler passes
//! the CommunicationIdentities it knows (its watch cache).

use std::borrow::Borrow;

use kube::ResourceExt;

use crate::crd::CommunicationIdentity;

/// The resource that already holds `identity_id`, if another one does: one that created or
/// adopted it (it is in its status), or one that asks to adopt it too and came first (older,
/// then the smaller UID). Ids are printed in columns and Events, so without this anyone sharing
/// the ACS resource could take over another resource's identity and revoke or delete it.
pub fn claimed_by<Other: Borrow<CommunicationIdentity>>(
    identity_id: &str,
    claimant: &CommunicationIdentity,
    others: impl IntoIterator<Item = Other>,
) -> Option<Other> {
    let order = |resource: &CommunicationIdentity| {
        (
            resource.creation_timestamp().map(|t| t.0),
            resource.uid().unwrap_or_default(),
        )
    };
    others.into_iter().find(|other| {
        let other = other.borrow();
        if other.uid() == claimant.uid() {
            return false;
        }
        let holds = other
            .status
            .as_ref()
            .and_then(|status| status.identity_id.as_deref())
            == Some(identity_id);
        let asked_first =
            other.spec.adopted_identity_id() == Some(identity_id) && order(other) < order(claimant);
        holds || asked_first
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resource(
        uid: &str,
        created: &str,
        adopts: Option<&str>,
        holds: Option<&str>,
    ) -> CommunicationIdentity {
        let mut spec = json!({ "connectionSecretRef": { "name": "acs" }, "scopes": ["chat"] });
        if let Some(id) = adopts {
            spec["identityId"] = json!(id);
        }
        serde_json::from_value(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": { "name": uid, "namespace": "team", "uid": uid, "creationTimestamp": created },
            "spec": spec,
            "status": { "identityId": holds },
        }))
        .unwrap()
    }

    const ID: &str = "8:acs:r_1";
    const EARLY: &str = "2026-11-24T10:00:00Z";
    const LATE: &str = "2026-11-24T11:00:00Z";

    #[test]
    fn an_identity_belongs_to_whoever_holds_it_or_asked_first() {
        let me = resource("u-me", LATE, Some(ID), None);
        let cases = [
            ("nobody else", vec![], None),
            (
                "myself in the cache",
                vec![resource("u-me", LATE, Some(ID), None)],
                None,
            ),
            (
                "another created it",
                vec![resource("u-a", LATE, None, Some(ID))],
                Some("u-a"),
            ),
            (
                "another adopted it, even if younger",
                vec![resource("u-a", "2026-11-25T00:00:00Z", Some(ID), Some(ID))],
                Some("u-a"),
            ),
            (
                "another asks for it and is older",
                vec![resource("u-a", EARLY, Some(ID), None)],
                Some("u-a"),
            ),
            (
                "another asks for it and is younger",
                vec![resource("u-z", "2026-11-25T00:00:00Z", Some(ID), None)],
                None,
            ),
            (
                "same age: the smaller uid first",
                vec![resource("u-a", LATE, Some(ID), None)],
                Some("u-a"),
            ),
            (
                "same age: a larger uid waits",
                vec![resource("u-z", LATE, Some(ID), None)],
                None,
            ),
            (
                "another identity",
                vec![resource("u-a", EARLY, Some("8:acs:r_2"), Some("8:acs:r_2"))],
                None,
            ),
        ];
        for (name, others, expected) in cases {
            let found = claimed_by(ID, &me, &others).and_then(ResourceExt::uid);
            assert_eq!(found.as_deref(), expected, "{name}");
        }
    }
}
