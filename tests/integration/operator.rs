//! The CommunicationIdentity lifecycle end to end: the operator binary against the real control
//! plane and the acs-emulator, each test in its own namespace with its own operator process.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::support::{
    Emulator, Operator, PROMPTLY, Setup, TestNamespace, basic_spec, create_connection_secret,
    ensure_crd, identity_manifest, next_second_after, ready, ready_message, secret_strings,
    wait_for, wait_gone, wait_ready,
};
use acs_identity_operator::crd::{
    CONNECTION_SECRET_FINALIZER, CommunicationIdentity, FINALIZER, MANAGED_BY_LABEL,
    MANAGED_BY_VALUE, REFRESH_REQUESTED_ANNOTATION, REVOKE_REQUESTED_ANNOTATION,
    SKIP_CLEANUP_ANNOTATION, reason, secret_key,
};

/// When the token in `secret` was minted: its expiry less the 1 h lifetime the tests ask for.
fn minted_at(secret: &BTreeMap<String, String>) -> jiff::Timestamp {
    let expires_on: jiff::Timestamp = secret[secret_key::EXPIRES_ON].parse().unwrap();
    expires_on - jiff::SignedDuration::from_hours(1)
}

fn total_requests(stats: &Value) -> u64 {
    stats["requests"]
        .as_object()
        .map(|ops| {
            ops.values()
                .flat_map(|by_status| by_status.as_object().unwrap().values())
                .map(|n| n.as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn create_issues_a_token_into_an_owned_secret() {
    let setup = Setup::new("create").await;
    setup.apply("alice", basic_spec()).await;
    let resource = setup.wait_ready("alice").await;
    let status = resource.status.clone().unwrap();
    let identity_id = status.identity_id.clone().unwrap();
    assert!(identity_id.starts_with("8:acs:"), "{identity_id}");
    assert!(resource.finalizers().contains(&FINALIZER.to_owned()));
    assert_eq!(status.observed_generation, resource.metadata.generation);

    let secret = setup.secrets.get("alice-acs-token").await.unwrap();
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.uid, resource.uid().unwrap());
    assert_eq!(owner.controller, Some(true));
    let labels = secret.labels();
    assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
    assert_eq!(labels["team"], "chat");
    let data = secret_strings(&secret);
    assert_eq!(data[secret_key::IDENTITY_ID], identity_id);
    assert_eq!(data[secret_key::SCOPES], "chat,voip");
    assert_eq!(data[secret_key::ENDPOINT], setup.emulator.endpoint);
    let expires_on: jiff::Timestamp = data[secret_key::EXPIRES_ON].parse().unwrap();
    assert_eq!(Some(expires_on), status.token_expires_on.map(|t| t.0));
    let lifetime = expires_on.duration_since(jiff::Timestamp::now());
    assert!(
        lifetime.as_secs() > 3500 && lifetime.as_secs() <= 3600,
        "{lifetime:?}"
    );

    let validity = setup.emulator.validate(&data[secret_key::TOKEN]).await;
    assert_eq!(validity["valid"], true, "{validity}");
    assert_eq!(validity["scopes"], "chat,voip");
    assert_eq!(validity["exp"], expires_on.as_second());

    // One identity, created with its token in one call.
    let stats = setup.emulator.stats().await;
    assert_eq!(stats["identitiesAlive"], 1, "{stats}");
    assert_eq!(total_requests(&stats), 1, "{stats}");
    // One event tells the whole creation.
    let created = setup.wait_event(reason::IDENTITY_CREATED).await;
    for part in [identity_id.as_str(), "chat,voip", "\"alice-acs-token\""] {
        assert!(created.contains(part), "{part} in {created}");
    }
    let reasons: Vec<String> = setup.events().await.into_iter().map(|(r, _)| r).collect();
    assert_eq!(reasons, [reason::IDENTITY_CREATED]);

    // The connection Secret is held while the identity needs it.
    let connection = setup.secrets.get("acs-connection").await.unwrap();
    assert!(
        connection
            .finalizers()
            .contains(&CONNECTION_SECRET_FINALIZER.to_owned())
    );
}

#[tokio::test]
async fn refresh_and_revoke_annotations_are_each_acted_on_once() {
    let setup = Setup::new("annotations").await;
    setup.apply("bob", basic_spec()).await;
    setup.wait_ready("bob").await;
    let first_secret = setup.secret_data("bob-acs-token").await;
    let first = first_secret[secret_key::TOKEN].clone();

    next_second_after(minted_at(&first_secret)).await;
    setup
        .annotate("bob", REFRESH_REQUESTED_ANNOTATION, "1")
        .await;
    let refreshed = setup.wait_refresh_handled("bob", "1").await;
    let second_secret = setup.secret_data("bob-acs-token").await;
    let second = second_secret[secret_key::TOKEN].clone();
    assert!(first != second, "a refresh puts a new token in the Secret");
    assert_eq!(ready(&refreshed).unwrap().0, "True");
    // A refresh never revokes: workloads may still hold the old token.
    assert_eq!(setup.emulator.validate(&first).await["valid"], true);
    setup.wait_event(reason::TOKEN_REFRESHED).await;

    next_second_after(minted_at(&second_secret)).await;
    setup
        .annotate("bob", REVOKE_REQUESTED_ANNOTATION, "leak-1")
        .await;
    setup
        .wait_resource("bob", "the revoke request handled", |r| {
            r.status.as_ref().unwrap().handled_revoke_request.as_deref() == Some("leak-1")
        })
        .await;
    let third = setup.secret_data("bob-acs-token").await[secret_key::TOKEN].clone();
    assert_eq!(setup.emulator.validate(&first).await["status"], "revoked");
    assert_eq!(setup.emulator.validate(&second).await["status"], "revoked");
    assert_eq!(setup.emulator.validate(&third).await["valid"], true);
    setup.wait_event(reason::TOKENS_REVOKED).await;

    // Requests already handled are not acted on again, whatever else triggers a reconcile.
    let issued = setup.emulator.stats().await["tokensIssued"].clone();
    let reconciles = setup.operator.settled_reconciles().await;
    setup.annotate("bob", "unrelated.example/touch", "1").await;
    setup
        .annotate("bob", REFRESH_REQUESTED_ANNOTATION, "1")
        .await;
    wait_for(
        "the operator to reconcile after the touch",
        PROMPTLY,
        || async { (setup.operator.reconciles().await > reconciles).then_some(()) },
    )
    .await;
    assert_eq!(setup.emulator.stats().await["tokensIssued"], issued);
    assert!(setup.secret_data("bob-acs-token").await[secret_key::TOKEN] == third);
}

#[tokio::test]
async fn a_scope_change_issues_at_once_and_other_changes_make_no_acs_call() {
    let setup = Setup::new("changes").await;
    setup.apply("carol", basic_spec()).await;
    setup.wait_ready("carol").await;
    let requests = total_requests(&setup.emulator.stats().await);

    let mut spec = basic_spec();
    spec["secretTemplate"]["labels"]["tier"] = json!("gold");
    spec["refreshBefore"] = json!("30m");
    spec["deletionPolicy"] = json!("Retain");
    let changed = setup.apply("carol", spec.clone()).await;
    setup
        .wait_resource("carol", "the new generation observed", |r| {
            r.status.as_ref().unwrap().observed_generation == changed.metadata.generation
        })
        .await;
    let secret = setup.secrets.get("carol-acs-token").await.unwrap();
    assert_eq!(secret.labels()["tier"], "gold");
    assert_eq!(
        total_requests(&setup.emulator.stats().await),
        requests,
        "no ACS call"
    );

    spec["scopes"] = json!(["chat"]);
    setup.apply("carol", spec).await;
    wait_for("a token with the new scopes", PROMPTLY, || async {
        (setup.secret_data("carol-acs-token").await[secret_key::SCOPES] == "chat").then_some(())
    })
    .await;
    let token = setup.secret_data("carol-acs-token").await[secret_key::TOKEN].clone();
    assert_eq!(setup.emulator.validate(&token).await["scopes"], "chat");
}

#[tokio::test]
async fn the_schema_rejects_bad_input_at_apply_time() {
    ensure_crd().await;
    let ns = TestNamespace::new("schema").await;
    let identities: Api<CommunicationIdentity> = ns.api();
    let cases = [
        (json!({ "scopes": ["chat", "fax"] }), "fax"),
        (
            json!({ "scopes": ["chat", "chat"] }),
            "scopes must be distinct",
        ),
        (json!({ "scopes": [] }), "scopes"),
        (
            json!({ "scopes": ["chat"], "tokenLifetime": "30m" }),
            "tokenLifetime must be between 1h and 24h",
        ),
        (
            json!({ "scopes": ["chat"], "tokenLifetime": "25h" }),
            "tokenLifetime must be between 1h and 24h",
        ),
        (
            json!({ "scopes": ["chat"], "tokenLifetime": "1h", "refreshBefore": "50m" }),
            "refreshBefore must be less than tokenLifetime minus 15m",
        ),
        (
            json!({ "scopes": ["chat"], "refreshBefore": "5m" }),
            "refreshBefore must be at least 15m",
        ),
        (
            json!({ "scopes": ["chat"], "secretName": "Not_A_Name" }),
            "secretName",
        ),
        (
            json!({ "scopes": ["chat"], "secretTemplate": { "labels": { "bad key!": "v" } } }),
            "secretTemplate.labels keys must be qualified names",
        ),
        (
            json!({ "scopes": ["chat"], "secretTemplate": { "labels": { "team": "x".repeat(70) } } }),
            "63",
        ),
        (
            json!({ "scopes": ["chat"], "secretTemplate": { "labels": { "app.kubernetes.io/managed-by": "me" } } }),
            "must not set app.kubernetes.io/managed-by",
        ),
        (
            json!({ "scopes": ["chat"], "connectionSecretRef": { "name": "acs-connection", "key": "bad/key" } }),
            "connectionSecretRef.key must be a Secret data key",
        ),
        (
            json!({ "scopes": ["chat"], "identityId": "not-an-acs-id" }),
            "identityId must be an ACS communication user id",
        ),
        (
            json!({ "scopes": ["chat"], "tokens": [{ "name": "voip", "scopes": ["voip"] }] }),
            "set exactly one of spec.scopes",
        ),
        (json!({}), "set exactly one of spec.scopes"),
        (
            json!({ "tokens": [
                { "name": "voip", "scopes": ["voip"] },
                { "name": "voip", "scopes": ["chat"] },
            ] }),
            "tokens names must be distinct",
        ),
        (
            json!({ "tokens": [{ "name": "Voip.1", "scopes": ["voip"] }] }),
            "spec.tokens[0].name",
        ),
        (json!({ "tokens": [] }), "spec.tokens"),
        (
            json!({ "tokens": [{ "name": "voip", "scopes": ["voip"], "tokenLifetime": "25h" }] }),
            "tokenLifetime must be between 1h and 24h",
        ),
        (
            json!({ "tokens": [{ "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h", "refreshBefore": "50m" }] }),
            "refreshBefore must be less than tokenLifetime minus 15m",
        ),
        (
            json!({ "tokens": [{ "name": "voip", "scopes": ["voip"] }], "refreshBefore": "1h" }),
            "with spec.tokens, set tokenLifetime and refreshBefore on each entry",
        ),
    ];
    for (mut spec, expected) in cases {
        if spec.get("connectionSecretRef").is_none() {
            spec["connectionSecretRef"] = json!({ "name": "acs-connection" });
        }
        let manifest = identity_manifest("bad", spec.clone());
        let error = identities
            .patch("bad", &PatchParams::apply("test"), &Patch::Apply(manifest))
            .await
            .expect_err(&format!("{spec} must be rejected"));
        assert!(error.to_string().contains(expected), "{spec}: {error}");
    }

    let manifest = |id: &str| {
        identity_manifest(
            "adopted",
            json!({
                "connectionSecretRef": { "name": "acs-connection" },
                "scopes": ["chat"],
                "identityId": id,
            }),
        )
    };
    identities
        .patch(
            "adopted",
            &PatchParams::apply("test"),
            &Patch::Apply(manifest("8:acs:bbbcbc1e-9f06-482a-b5d8-20e3f26ef0cd_1")),
        )
        .await
        .unwrap();
    let error = identities
        .patch(
            "adopted",
            &PatchParams::apply("test"),
            &Patch::Apply(manifest("8:acs:bbbcbc1e-9f06-482a-b5d8-20e3f26ef0cd_2")),
        )
        .await
        .expect_err("identityId is immutable");
    assert!(
        error.to_string().contains("identityId is immutable"),
        "{error}"
    );
}

#[tokio::test]
async fn deletion_follows_the_deletion_policy() {
    let setup = Setup::new("deletion").await;
    let mut tokens = BTreeMap::new();
    for (name, policy) in [
        ("del", "Delete"),
        ("rev", "RevokeTokens"),
        ("ret", "Retain"),
    ] {
        let mut spec = basic_spec();
        spec["deletionPolicy"] = json!(policy);
        setup.apply(name, spec).await;
    }
    for name in ["del", "rev", "ret"] {
        setup.wait_ready(name).await;
        tokens.insert(
            name,
            setup.secret_data(&format!("{name}-acs-token")).await[secret_key::TOKEN].clone(),
        );
        setup
            .identities
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in ["del", "rev", "ret"] {
        wait_gone(&setup.identities, name, PROMPTLY).await;
    }
    assert_eq!(
        setup.emulator.validate(&tokens["del"]).await["status"],
        "deleted"
    );
    assert_eq!(
        setup.emulator.validate(&tokens["rev"]).await["status"],
        "revoked"
    );
    assert_eq!(setup.emulator.validate(&tokens["ret"]).await["valid"], true);
    let stats = setup.emulator.stats().await;
    assert_eq!(stats["identitiesAlive"], 2, "{stats}");
    assert_eq!(stats["identitiesDeleted"], 1, "{stats}");
    setup.wait_event(reason::IDENTITY_DELETED).await;
    setup.wait_event(reason::IDENTITY_RETAINED).await;

    // The last user gone, the connection Secret is released.
    wait_for("the connection Secret released", PROMPTLY, || async {
        let secret = setup.secrets.get("acs-connection").await.unwrap();
        secret.finalizers().is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_deleted_or_edited_secret_is_restored_and_a_foreign_one_is_never_touched() {
    let setup = Setup::new("secrets").await;
    setup.apply("dave", basic_spec()).await;
    setup.wait_ready("dave").await;
    let token = setup.secret_data("dave-acs-token").await[secret_key::TOKEN].clone();

    // Edited: a key removed and the label changed. Restored without a new token.
    let issued = setup.emulator.stats().await["tokensIssued"].clone();
    setup
        .secrets
        .patch(
            "dave-acs-token",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": { "labels": { "team": "other" } },
                "data": { "scopes": null }
            })),
        )
        .await
        .unwrap();
    wait_for("the edited Secret restored", PROMPTLY, || async {
        let secret = setup.secrets.get("dave-acs-token").await.unwrap();
        let data = secret_strings(&secret);
        (secret.labels()["team"] == "chat" && data.get("scopes").is_some_and(|s| s == "chat,voip"))
            .then_some(())
    })
    .await;
    assert!(setup.secret_data("dave-acs-token").await[secret_key::TOKEN] == token);
    assert_eq!(setup.emulator.stats().await["tokensIssued"], issued);

    // Deleted: rewritten with a new token.
    setup
        .secrets
        .delete("dave-acs-token", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the deleted Secret restored", PROMPTLY, || async {
        let secret = setup.secrets.get_opt("dave-acs-token").await.unwrap()?;
        secret_strings(&secret).contains_key("token").then_some(())
    })
    .await;

    // Foreign: a Secret of the wanted name that someone else owns.
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": { "name": "erin-acs-token" },
        "stringData": { "token": "mine" }
    }))
    .unwrap();
    setup
        .secrets
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    setup.apply("erin", basic_spec()).await;
    let conflicted = setup.wait_reason("erin", reason::SECRET_CONFLICT).await;
    assert_eq!(ready(&conflicted).unwrap().0, "False");
    assert_eq!(
        setup.secret_data("erin-acs-token").await[secret_key::TOKEN],
        "mine"
    );
    setup.wait_event(reason::SECRET_CONFLICT).await;
}

#[tokio::test]
async fn bad_connection_input_is_reported_and_a_fixed_key_takes_effect() {
    let setup = Setup::new("badinput").await;
    let spec = |secret: &str| {
        json!({
            "connectionSecretRef": { "name": secret },
            "scopes": ["voip"],
            "tokenLifetime": "1h",
        })
    };
    setup.apply("missing", spec("nope")).await;
    let missing = setup
        .wait_reason("missing", reason::CONNECTION_SECRET_NOT_FOUND)
        .await;
    let message = ready_message(&missing);
    assert!(message.contains("\"nope\""), "{message}");

    create_connection_secret(
        &setup.secrets,
        "malformed",
        "endpoint=https://x/;accesskey=%%%",
    )
    .await;
    setup.apply("malformed", spec("malformed")).await;
    setup
        .wait_reason("malformed", reason::INVALID_CONNECTION_STRING)
        .await;
    // A Secret whose content is no connection string is never pinned with the finalizer.
    let malformed = setup.secrets.get("malformed").await.unwrap();
    assert!(
        !malformed
            .finalizers()
            .iter()
            .any(|f| f == CONNECTION_SECRET_FINALIZER),
        "{:?}",
        malformed.finalizers()
    );

    let wrong_key = setup.emulator.connection_string.replace(
        &setup.emulator.key,
        "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=",
    );
    create_connection_secret(&setup.secrets, "wrongkey", &wrong_key).await;
    setup.apply("wrongkey", spec("wrongkey")).await;
    let denied = setup
        .wait_reason("wrongkey", reason::AUTHENTICATION_FAILED)
        .await;
    assert_eq!(ready(&denied).unwrap().0, "False");
    setup.wait_event(reason::AUTHENTICATION_FAILED).await;

    // Fixing the key takes effect within a minute, without a restart.
    setup
        .secrets
        .patch(
            "wrongkey",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "stringData": { "connectionString": setup.emulator.connection_string } }),
            ),
        )
        .await
        .unwrap();
    wait_ready(&setup.identities, "wrongkey", Duration::from_secs(60)).await;

    // Neither the key nor a token ever reached the logs or events.
    let logs = setup.operator.logs();
    let token = setup.secret_data("wrongkey-acs-token").await[secret_key::TOKEN].clone();
    for secret in [
        setup.emulator.key.as_str(),
        "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=",
        &token,
    ] {
        assert!(
            !logs.contains(secret),
            "a secret value leaked into the logs"
        );
        for (_, note) in setup.events().await {
            assert!(
                !note.contains(secret),
                "a secret value leaked into an event"
            );
        }
    }
}

#[tokio::test]
async fn acs_outage_keeps_the_token_and_a_restart_makes_no_acs_call() {
    let mut setup = Setup::new("outage").await;
    setup.apply("frank", basic_spec()).await;
    setup.wait_ready("frank").await;
    let token = setup.secret_data("frank-acs-token").await[secret_key::TOKEN].clone();

    setup
        .emulator
        .admin_post("outage", json!({ "mode": "unavailable", "seconds": 600 }))
        .await;
    setup
        .annotate("frank", REFRESH_REQUESTED_ANNOTATION, "during-outage")
        .await;
    let degraded = setup.wait_reason("frank", reason::ACS_UNAVAILABLE).await;
    assert_eq!(
        ready(&degraded).unwrap().0,
        "True",
        "the token in the Secret is still valid"
    );
    assert!(setup.secret_data("frank-acs-token").await[secret_key::TOKEN] == token);
    setup.wait_event(reason::ACS_UNAVAILABLE).await;
    setup.emulator.admin_delete("outage").await;
    setup.wait_refresh_handled("frank", "during-outage").await;
    setup.wait_ready("frank").await;

    // A restart with a valid token in place makes no ACS call.
    let requests = total_requests(&setup.emulator.stats().await);
    setup.operator.kill();
    setup.operator = Operator::start(&setup.ns.name, &setup.emulator, &[]);
    wait_for("the restarted operator to reconcile", PROMPTLY, || async {
        (setup.operator.reconciles().await > 0).then_some(())
    })
    .await;
    assert_eq!(total_requests(&setup.emulator.stats().await), requests);
}

#[tokio::test]
async fn deleting_the_namespace_still_deletes_the_identity_in_acs() {
    let setup = Setup::new("nsdelete").await;
    setup.apply("gina", basic_spec()).await;
    setup.wait_ready("gina").await;
    let token = setup.secret_data("gina-acs-token").await[secret_key::TOKEN].clone();
    Api::<Namespace>::all(setup.ns.client.clone())
        .delete(&setup.ns.name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the identity deleted in ACS",
        Duration::from_secs(60),
        || async { (setup.emulator.validate(&token).await["status"] == "deleted").then_some(()) },
    )
    .await;
    let namespaces = Api::<Namespace>::all(setup.ns.client.clone());
    wait_gone(&namespaces, &setup.ns.name, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn a_short_lived_token_is_refreshed_before_it_expires() {
    // With the emulator's compressed time a "1h" token really lives 60 s: the operator sees a
    // shorter token than it asked for, refreshes at two thirds of its life and says so.
    let setup = Setup::start(
        "shortlived",
        Emulator::start(&["--minutes-are-seconds"]),
        &[],
    )
    .await;
    setup.apply("hana", basic_spec()).await;
    setup.wait_ready("hana").await;
    let first = setup.secret_data("hana-acs-token").await;
    let expires_on: jiff::Timestamp = first[secret_key::EXPIRES_ON].parse().unwrap();
    let lifetime = expires_on.duration_since(jiff::Timestamp::now());
    assert!(lifetime.as_secs() <= 60, "{lifetime:?}");

    // Until a new token arrives, the one in the Secret is always valid.
    wait_for("a refreshed token", Duration::from_secs(60), || async {
        let data = setup.secret_data("hana-acs-token").await;
        let validity = setup.emulator.validate(&data[secret_key::TOKEN]).await;
        assert_eq!(
            validity["valid"], true,
            "the Secret held an unusable token: {validity}"
        );
        (data[secret_key::EXPIRES_ON] != first[secret_key::EXPIRES_ON]).then_some(())
    })
    .await;
    let warning = setup.wait_event(reason::SHORT_TOKEN_LIFETIME).await;
    assert!(warning.contains("two thirds"), "{warning}");
    assert_eq!(setup.emulator.stats().await["tokensIssued"], 2);
}

#[tokio::test]
async fn an_existing_identity_is_adopted_and_one_already_gone_counts_as_deleted() {
    let setup = Setup::new("adopt").await;
    let mut retained = basic_spec();
    retained["deletionPolicy"] = json!("Retain");
    setup.apply("original", retained).await;
    let original = setup.wait_ready("original").await;
    let identity_id = original.status.unwrap().identity_id.unwrap();
    setup
        .identities
        .delete("original", &DeleteParams::default())
        .await
        .unwrap();
    // Until it is gone, the original still holds the identity (IdentityInUse).
    wait_gone(&setup.identities, "original", PROMPTLY).await;

    let mut adopting = basic_spec();
    adopting["identityId"] = json!(identity_id);
    setup.apply("adopter", adopting).await;
    let adopter = setup.wait_ready("adopter").await;
    assert_eq!(
        adopter.status.unwrap().identity_id.as_deref(),
        Some(identity_id.as_str())
    );
    let token = setup.secret_data("adopter-acs-token").await[secret_key::TOKEN].clone();
    let validity = setup.emulator.validate(&token).await;
    assert_eq!(validity["identity"], json!(identity_id), "{validity}");
    assert_eq!(
        setup.emulator.stats().await["identitiesAlive"],
        1,
        "no second identity"
    );

    // An identity ACS does not know: reported, and deleting the resource is not held up (404).
    let mut ghost = basic_spec();
    ghost["identityId"] = json!(format!("{}_gone", identity_id.rsplit_once('_').unwrap().0));
    setup.apply("ghost", ghost).await;
    setup.wait_reason("ghost", reason::IDENTITY_NOT_FOUND).await;
    setup
        .identities
        .delete("ghost", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&setup.identities, "ghost", PROMPTLY).await;
}

#[tokio::test]
async fn deletion_waits_while_acs_is_down_unless_cleanup_is_skipped() {
    let setup = Setup::new("deletewait").await;
    setup.apply("ivan", basic_spec()).await;
    setup.apply("jill", basic_spec()).await;
    setup.wait_ready("ivan").await;
    setup.wait_ready("jill").await;
    let ivan = setup.secret_data("ivan-acs-token").await[secret_key::TOKEN].clone();
    let jill = setup.secret_data("jill-acs-token").await[secret_key::TOKEN].clone();

    setup
        .emulator
        .admin_post("outage", json!({ "mode": "unavailable", "seconds": 600 }))
        .await;
    for name in ["ivan", "jill"] {
        setup
            .identities
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let waiting = setup.wait_reason("ivan", reason::DELETING).await;
    let message = ready_message(&waiting);
    assert!(message.contains("ACS is unavailable"), "{message}");
    setup.wait_reason("jill", reason::DELETING).await;

    // An admin releases jill knowingly; ivan keeps waiting for ACS.
    setup
        .annotate("jill", SKIP_CLEANUP_ANNOTATION, "true")
        .await;
    wait_gone(&setup.identities, "jill", PROMPTLY).await;
    let skipped = setup.wait_event(reason::CLEANUP_SKIPPED).await;
    assert!(skipped.contains("left in ACS"), "{skipped}");
    assert!(setup.identities.get_opt("ivan").await.unwrap().is_some());

    setup.emulator.admin_delete("outage").await;
    wait_gone(&setup.identities, "ivan", Duration::from_secs(60)).await;
    assert_eq!(setup.emulator.validate(&ivan).await["status"], "deleted");
    assert_eq!(setup.emulator.validate(&jill).await["valid"], true);
}

#[tokio::test]
async fn throttling_is_reported_while_the_token_stays_valid() {
    let setup = Setup::new("throttled").await;
    setup.apply("kim", basic_spec()).await;
    setup.wait_ready("kim").await;
    // One token issue per five minutes: a Retry-After far longer than the client waits inline.
    setup
        .emulator
        .patch_config(json!({ "limits": { "issueAccessToken": 1, "windowSeconds": 300 } }))
        .await;
    let secret = setup.secret_data("kim-acs-token").await;
    next_second_after(minted_at(&secret)).await;
    setup
        .annotate("kim", REFRESH_REQUESTED_ANNOTATION, "1")
        .await;
    setup.wait_refresh_handled("kim", "1").await;
    let token = setup.secret_data("kim-acs-token").await[secret_key::TOKEN].clone();
    setup
        .annotate("kim", REFRESH_REQUESTED_ANNOTATION, "2")
        .await;
    let throttled = setup.wait_reason("kim", reason::THROTTLED).await;
    assert_eq!(
        ready(&throttled).unwrap().0,
        "True",
        "the token in the Secret is still valid"
    );
    assert!(setup.secret_data("kim-acs-token").await[secret_key::TOKEN] == token);
    assert_eq!(setup.emulator.validate(&token).await["valid"], true);
    setup.wait_event(reason::THROTTLED).await;
    assert!(setup.emulator.stats().await["throttled"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_leaks_no_identity() {
    let setup = Setup::new("lostanswer").await;
    // The emulator carries out every request and answers none, as if each answer were lost.
    setup
        .emulator
        .patch_config(json!({ "faults": { "loseAnswers": 1.0 } }))
        .await;
    setup.apply("lost", basic_spec()).await;
    // Past the operator's 30-s deadline for one ACS call.
    wait_for(
        "the create recorded as attempted and failed, with no identity known",
        Duration::from_secs(90),
        || async {
            let lost = setup.identities.get("lost").await.unwrap();
            let status = lost.status.as_ref()?;
            (lost.create_attempted() && status.identity_id.is_none() && status.failed_attempts > 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        setup.emulator.stats().await["identitiesAlive"],
        1,
        "the create did happen"
    );

    // Answers come again; the deletion (well before the ~5-s retry of the create) repeats the
    // create to learn the identity, and deletes it.
    setup
        .emulator
        .patch_config(json!({ "faults": { "loseAnswers": 0.0 } }))
        .await;
    setup
        .identities
        .delete("lost", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&setup.identities, "lost", PROMPTLY).await;
    let stats = setup.emulator.stats().await;
    assert_eq!(stats["identitiesAlive"], 0, "{stats}");
    assert_eq!(stats["identitiesDeleted"], 1, "{stats}");
}

#[tokio::test]
async fn a_revoke_whose_reissue_fails_is_not_ready() {
    let setup = Setup::new("revokefail").await;
    setup.apply("rita", basic_spec()).await;
    setup.wait_ready("rita").await;
    // Fresh windows admitting one token issue per ten minutes: a refresh uses it up.
    setup
        .emulator
        .patch_config(json!({ "limits": { "issueAccessToken": 1, "windowSeconds": 600 } }))
        .await;
    setup
        .annotate("rita", REFRESH_REQUESTED_ANNOTATION, "1")
        .await;
    setup.wait_refresh_handled("rita", "1").await;
    let token = setup.secret_data("rita-acs-token").await[secret_key::TOKEN].clone();

    // The revoke goes through, the new token is refused (429): the Secret's token is dead.
    setup
        .annotate("rita", REVOKE_REQUESTED_ANNOTATION, "leak-1")
        .await;
    let rita = setup.wait_reason("rita", reason::THROTTLED).await;
    assert_eq!(ready(&rita).unwrap().0, "False");
    let status = rita.status.unwrap();
    assert_eq!(status.handled_revoke_request.as_deref(), Some("leak-1"));
    assert_eq!(setup.emulator.validate(&token).await["status"], "revoked");
}
