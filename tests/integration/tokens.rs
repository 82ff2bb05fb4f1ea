//! Several named tokens for one identity (spec.tokens) on the real control plane: each entry's
//! token carries its own scopes and lifetime, a change to one entry touches only its token,
//! and a revoke replaces them all.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::support::{Setup, next_second_after};
use acs_identity_operator::crd::{CommunicationIdentity, REVOKE_REQUESTED_ANNOTATION, reason};

/// The quickstart's two tokens: `voip` for an hour, `chat` for `chat_lifetime`.
fn two_tokens(chat_lifetime: &str) -> Value {
    json!({
        "connectionSecretRef": { "name": "acs-connection" },
        "tokens": [
            { "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" },
            { "name": "chat", "scopes": ["chat"], "tokenLifetime": chat_lifetime },
        ],
    })
}

/// The lifetime status records for the token `name`: its expiry less its issue, in seconds.
fn lifetime_seconds(resource: &CommunicationIdentity, name: &str) -> i64 {
    let status = resource.status.as_ref().expect("a status");
    let token = status
        .tokens
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("status.tokens has {name}"));
    let issued = token.last_refresh_time.as_ref().expect("issued").0;
    let expires = token.expires_on.as_ref().expect("an expiry").0;
    expires.as_second() - issued.as_second()
}

/// Checks the token under `<name>.token` with the emulator: valid, for `identity`, with
/// `scopes`, and expiring when `<name>.expiresOn` says.
async fn assert_token(
    setup: &Setup,
    data: &BTreeMap<String, String>,
    name: &str,
    identity: &str,
    scopes: &str,
) {
    let verdict = setup
        .emulator
        .validate(&data[&format!("{name}.token")])
        .await;
    assert_eq!(verdict["valid"], true, "{name}: {verdict}");
    assert_eq!(verdict["identity"], identity, "{name}");
    assert_eq!(verdict["scopes"], scopes, "{name}");
    let expires_on: Timestamp = data[&format!("{name}.expiresOn")].parse().unwrap();
    assert_eq!(verdict["exp"], expires_on.as_second(), "{name}");
    assert_eq!(data[&format!("{name}.scopes")], scopes, "{name}");
}

#[tokio::test]
async fn two_entries_give_two_tokens_for_one_identity_and_a_change_touches_only_its_own() {
    let setup = Setup::new("tokens").await;
    setup.apply("duo", two_tokens("2h")).await;
    let resource = setup.wait_ready("duo").await;
    let identity = resource
        .status
        .as_ref()
        .unwrap()
        .identity_id
        .clone()
        .unwrap();
    let data = setup.secret_data("duo-acs-token").await;
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
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
    assert_eq!(data["identityId"], identity);
    assert_token(&setup, &data, "voip", &identity, "voip").await;
    assert_token(&setup, &data, "chat", &identity, "chat").await;
    assert_eq!(lifetime_seconds(&resource, "voip"), 3600);
    assert_eq!(lifetime_seconds(&resource, "chat"), 2 * 3600);
    let status = resource.status.as_ref().unwrap();
    assert_eq!(
        status.token_expires_on, status.tokens[0].expires_on,
        "the printer column shows the first expiry"
    );

    // A longer chat lifetime reissues the chat token only.
    setup.apply("duo", two_tokens("3h")).await;
    let changed = setup
        .wait_resource("duo", "the chat token reissued for 3h", |r| {
            r.status.as_ref().is_some_and(|s| {
                s.observed_generation == r.metadata.generation
                    && s.tokens
                        .iter()
                        .any(|t| t.name == "chat" && t.token_lifetime_minutes == Some(180))
            })
        })
        .await;
    let after = setup.secret_data("duo-acs-token").await;
    assert_eq!(after["voip.token"], data["voip.token"], "voip untouched");
    assert_eq!(after["voip.expiresOn"], data["voip.expiresOn"]);
    assert_ne!(after["chat.token"], data["chat.token"]);
    assert_token(&setup, &after, "chat", &identity, "chat").await;
    assert_eq!(lifetime_seconds(&changed, "chat"), 3 * 3600);
    assert_eq!(
        changed.status.as_ref().unwrap().tokens[0],
        status.tokens[0],
        "the voip entry's status untouched"
    );
    // The old chat token stays valid until it expires: a change never revokes.
    assert_eq!(
        setup.emulator.validate(&data["chat.token"]).await["valid"],
        true
    );
}

#[tokio::test]
async fn a_revoke_replaces_every_named_token() {
    let setup = Setup::new("tokens-revoke").await;
    setup.apply("duo", two_tokens("2h")).await;
    let resource = setup.wait_ready("duo").await;
    let identity = resource
        .status
        .as_ref()
        .unwrap()
        .identity_id
        .clone()
        .unwrap();
    let before = setup.secret_data("duo-acs-token").await;
    // Tokens carry whole-second times: revoke in a later second than the issue.
    let issued = resource
        .status
        .as_ref()
        .unwrap()
        .last_refresh_time
        .clone()
        .unwrap()
        .0;
    next_second_after(issued).await;

    setup
        .annotate("duo", REVOKE_REQUESTED_ANNOTATION, "leak-1")
        .await;
    setup
        .wait_resource("duo", "the revoke request handled", |r| {
            r.status.as_ref().unwrap().handled_revoke_request.as_deref() == Some("leak-1")
        })
        .await;
    let after = setup.secret_data("duo-acs-token").await;
    for name in ["voip", "chat"] {
        let old = &before[&format!("{name}.token")];
        assert_eq!(
            setup.emulator.validate(old).await["status"],
            "revoked",
            "{name}"
        );
        assert_ne!(&after[&format!("{name}.token")], old, "{name}");
    }
    assert_token(&setup, &after, "voip", &identity, "voip").await;
    assert_token(&setup, &after, "chat", &identity, "chat").await;
    setup.wait_event(reason::TOKENS_REVOKED).await;
}
