//! Several tokens for one identity: the entries a spec asks for (`spec.scopes` as one unnamed
//! entry, or the named entries of `spec.tokens`), their keys in the Secret, and their state as
//! status records it. Pure.
//!
//! The unnamed entry is the one whose name is empty: its keys carry no prefix and its state
//! lives in the top-level status fields, exactly as before `spec.tokens` existed. Named
//! entries' states live in `status.tokens`, and the top-level fields then summarise them
//! (the earliest expiry and next refresh) for the printer columns.

use std::time::Duration;

use crate::crd::{
    CommunicationIdentitySpec, CommunicationIdentityStatus, InvalidSpec, MAX_TOKEN_LIFETIME,
    MIN_REFRESH_BEFORE, MIN_TOKEN_LIFETIME, MIN_TOKEN_USE, Scope, TokenStatus, parse_duration,
    secret_key,
};

/// One token the spec asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEntry<'a> {
    /// Empty for the token of `spec.scopes`.
    pub name: &'a str,
    pub scopes: &'a [Scope],
    pub token_lifetime: &'a str,
    pub refresh_before: Option<&'a str>,
}

/// The keys each token has in the Secret, before any `<name>.` prefix.
pub const TOKEN_KEYS: [&str; 3] = [
    secret_key::TOKEN,
    secret_key::EXPIRES_ON,
    secret_key::SCOPES,
];

/// `base` as the key of the token named `name` in the Secret: `<name>.<base>`, or `base` for
/// the unnamed token.
pub fn key(name: &str, base: &str) -> String {
    match name {
        "" => base.to_owned(),
        name => format!("{name}.{base}"),
    }
}

impl TokenEntry<'_> {
    /// `base` as this token's key in the Secret.
    pub fn key(&self, base: &str) -> String {
        key(self.name, base)
    }

    /// How Events and messages name this token: empty for the unnamed one, else ` "<name>"`.
    pub fn label(&self) -> String {
        match self.name {
            "" => String::new(),
            name => format!(" {name:?}"),
        }
    }

    /// The requested token lifetime, within 1h..=24h.
    pub fn token_lifetime(&self) -> Result<Duration, InvalidSpec> {
        let lifetime =
            parse_duration(self.token_lifetime).ok_or_else(|| InvalidSpec::Duration {
                field: "tokenLifetime",
                value: self.token_lifetime.to_owned(),
            })?;
        if !(MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME).contains(&lifetime) {
            return Err(InvalidSpec::TokenLifetimeOutOfRange);
        }
        Ok(lifetime)
    }

    /// The requested token lifetime as ACS's `expiresInMinutes`.
    pub fn token_lifetime_minutes(&self) -> Result<i32, InvalidSpec> {
        // Bounded by 1440, so the conversion cannot fail.
        Ok((self.token_lifetime()?.as_secs() / 60) as i32)
    }

    /// How long before expiry to refresh: refreshBefore, or one third of the lifetime.
    pub fn refresh_before(&self) -> Result<Duration, InvalidSpec> {
        let lifetime = self.token_lifetime()?;
        let Some(text) = self.refresh_before else {
            return Ok(lifetime / 3);
        };
        let refresh_before = parse_duration(text).ok_or_else(|| InvalidSpec::Duration {
            field: "refreshBefore",
            value: text.to_owned(),
        })?;
        if refresh_before < MIN_REFRESH_BEFORE {
            return Err(InvalidSpec::RefreshBeforeTooShort);
        }
        if refresh_before >= lifetime.saturating_sub(MIN_TOKEN_USE) {
            return Err(InvalidSpec::RefreshBeforeTooLong);
        }
        Ok(refresh_before)
    }

    /// Scopes as the Secret's `scopes` key holds them: comma-joined, in spec order.
    pub fn scopes_joined(&self) -> String {
        let names: Vec<&str> = self.scopes.iter().map(|s| s.as_str()).collect();
        names.join(",")
    }

    /// Scopes as ACS takes them.
    pub fn scope_names(&self) -> Vec<String> {
        self.scopes.iter().map(|s| s.as_str().to_owned()).collect()
    }

    /// The checks the schema makes on one token.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        if self.scopes.is_empty() || self.scopes.len() > 5 {
            return Err(InvalidSpec::ScopeCount);
        }
        if sorted(self.scopes)
            .windows(2)
            .any(|pair| pair[0] == pair[1])
        {
            return Err(InvalidSpec::DuplicateScopes);
        }
        self.refresh_before().map(drop)
    }

    /// Whether `state` describes a token issued for this entry's scopes and lifetime now; when
    /// not, a new token is due at once.
    pub fn matches(&self, state: &TokenStatus) -> bool {
        self.token_lifetime_minutes().ok() == state.token_lifetime_minutes
            && state.token_lifetime_minutes.is_some()
            && sorted(&state.scopes) == sorted(self.scopes)
    }
}

pub fn sorted(scopes: &[Scope]) -> Vec<Scope> {
    let mut scopes = scopes.to_vec();
    scopes.sort_unstable();
    scopes
}

/// The state of each token status records, named as its entry ("" for the unnamed one).
pub fn token_states(status: &CommunicationIdentityStatus) -> Vec<TokenStatus> {
    if !status.tokens.is_empty() {
        return status.tokens.clone();
    }
    let recorded = status.token_expires_on.is_some()
        || status.last_refresh_time.is_some()
        || !status.token_scopes.is_empty();
    if !recorded {
        return Vec::new();
    }
    vec![TokenStatus {
        name: String::new(),
        scopes: status.token_scopes.clone(),
        token_lifetime_minutes: status.token_lifetime_minutes,
        expires_on: status.token_expires_on.clone(),
        last_refresh_time: status.last_refresh_time.clone(),
        next_refresh_time: status.next_refresh_time.clone(),
    }]
}

/// The state recorded for the token named `name`.
pub fn token_state<'a>(states: &'a [TokenStatus], name: &str) -> Option<&'a TokenStatus> {
    states.iter().find(|state| state.name == name)
}

/// `status` recording `states`, the states of the tokens `spec` asks for: the unnamed token's
/// in the top-level fields, named tokens' in `status.tokens` with the top-level fields
/// summarising them.
pub fn with_token_states(
    status: CommunicationIdentityStatus,
    spec: &CommunicationIdentitySpec,
    states: Vec<TokenStatus>,
) -> CommunicationIdentityStatus {
    if spec.tokens.is_empty() {
        let state = states.into_iter().next().unwrap_or_default();
        return CommunicationIdentityStatus {
            token_expires_on: state.expires_on,
            last_refresh_time: state.last_refresh_time,
            next_refresh_time: state.next_refresh_time,
            token_scopes: state.scopes,
            token_lifetime_minutes: state.token_lifetime_minutes,
            tokens: Vec::new(),
            ..status
        };
    }
    let earliest = |times: Vec<_>| times.into_iter().flatten().min();
    CommunicationIdentityStatus {
        token_expires_on: earliest(states.iter().map(|s| s.expires_on.clone()).collect()),
        last_refresh_time: states
            .iter()
            .filter_map(|s| s.last_refresh_time.clone())
            .max(),
        next_refresh_time: earliest(states.iter().map(|s| s.next_refresh_time.clone()).collect()),
        token_scopes: Vec::new(),
        token_lifetime_minutes: None,
        tokens: states,
        ..status
    }
}

/// The Secret keys of tokens that status records and the spec no longer asks for (a removed
/// entry, or the other form's keys after a switch between spec.scopes and spec.tokens): the
/// operator wrote them and must take them out.
pub fn stale_keys(
    status: &CommunicationIdentityStatus,
    spec: &CommunicationIdentitySpec,
) -> Vec<String> {
    let wanted: Vec<&str> = spec.entries().iter().map(|e| e.name).collect();
    token_states(status)
        .iter()
        .filter(|state| !wanted.contains(&state.name.as_str()))
        .flat_map(|state| TOKEN_KEYS.map(|base| key(&state.name, base)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    fn spec(fields: serde_json::Value) -> CommunicationIdentitySpec {
        let mut spec = json!({ "connectionSecretRef": { "name": "acs" } });
        spec.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::from_value(spec).unwrap()
    }

    fn two_tokens() -> CommunicationIdentitySpec {
        spec(json!({ "tokens": [
            { "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" },
            { "name": "chat", "scopes": ["chat"], "refreshBefore": "2h" },
        ]}))
    }

    fn at(text: &str) -> Option<Time> {
        Some(Time(text.parse::<Timestamp>().unwrap()))
    }

    fn state(name: &str, expires: &str, next: &str) -> TokenStatus {
        TokenStatus {
            name: name.into(),
            scopes: vec![Scope::Chat],
            token_lifetime_minutes: Some(60),
            expires_on: at(expires),
            last_refresh_time: at("2026-11-24T09:00:00Z"),
            next_refresh_time: at(next),
        }
    }

    #[test]
    fn entries_and_their_keys() {
        let single = spec(json!({ "scopes": ["chat", "voip"] }));
        let entries = single.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key("token"), "token");
        assert_eq!(entries[0].label(), "");
        assert_eq!(entries[0].token_lifetime_minutes(), Ok(1440));

        let named = two_tokens();
        let entries = named.entries();
        let keys: Vec<String> = entries.iter().map(|e| e.key("expiresOn")).collect();
        assert_eq!(keys, ["voip.expiresOn", "chat.expiresOn"]);
        assert_eq!(entries[0].label(), " \"voip\"");
        assert_eq!(entries[0].token_lifetime_minutes(), Ok(60));
        assert_eq!(
            entries[0].refresh_before(),
            Ok(Duration::from_secs(20 * 60))
        );
        assert_eq!(
            entries[1].refresh_before(),
            Ok(Duration::from_secs(2 * 3600))
        );
        assert_eq!(entries[1].scopes_joined(), "chat");
    }

    #[test]
    fn a_state_matches_the_entry_it_was_issued_for() {
        let named = two_tokens();
        let voip = named.entries()[0];
        let issued = |scopes: Vec<Scope>, minutes: Option<i32>| TokenStatus {
            scopes,
            token_lifetime_minutes: minutes,
            ..Default::default()
        };
        let cases = [
            (
                "same scopes and lifetime",
                issued(vec![Scope::Voip], Some(60)),
                true,
            ),
            ("another scope", issued(vec![Scope::Chat], Some(60)), false),
            (
                "another lifetime",
                issued(vec![Scope::Voip], Some(1440)),
                false,
            ),
            ("nothing recorded", issued(vec![], None), false),
        ];
        for (name, state, expected) in cases {
            assert_eq!(voip.matches(&state), expected, "{name}");
        }
    }

    #[test]
    fn states_round_trip_through_status() {
        let single = spec(json!({ "scopes": ["chat"] }));
        let one = vec![TokenStatus {
            name: String::new(),
            ..state("", "2026-11-24T10:00:00Z", "2026-11-24T09:40:00Z")
        }];
        let status = with_token_states(Default::default(), &single, one.clone());
        assert!(
            status.tokens.is_empty(),
            "the unnamed token stays top-level"
        );
        assert_eq!(status.token_expires_on, at("2026-11-24T10:00:00Z"));
        assert_eq!(status.token_scopes, [Scope::Chat]);
        assert_eq!(token_states(&status), one);

        let named = two_tokens();
        let two = vec![
            state("voip", "2026-11-24T10:00:00Z", "2026-11-24T09:40:00Z"),
            state("chat", "2026-11-24T12:00:00Z", "2026-11-24T09:30:00Z"),
        ];
        let status = with_token_states(Default::default(), &named, two.clone());
        assert_eq!(status.tokens, two);
        assert_eq!(
            status.token_expires_on,
            at("2026-11-24T10:00:00Z"),
            "the first expiry"
        );
        assert_eq!(
            status.next_refresh_time,
            at("2026-11-24T09:30:00Z"),
            "the first refresh"
        );
        assert!(status.token_scopes.is_empty() && status.token_lifetime_minutes.is_none());
        assert_eq!(token_states(&status), two);
        assert!(token_states(&Default::default()).is_empty());
    }

    #[test]
    fn stale_keys_are_those_of_tokens_no_longer_asked_for() {
        let named = two_tokens();
        let single = spec(json!({ "scopes": ["chat"] }));
        let unnamed_state = with_token_states(
            Default::default(),
            &single,
            vec![state("", "2026-11-24T10:00:00Z", "2026-11-24T09:40:00Z")],
        );
        let with = |names: &[&str]| {
            let states = names
                .iter()
                .map(|n| state(n, "2026-11-24T10:00:00Z", "2026-11-24T09:40:00Z"))
                .collect();
            with_token_states(Default::default(), &named, states)
        };
        let cases = [
            (
                "the entries asked for",
                with(&["voip", "chat"]),
                &named,
                vec![],
            ),
            (
                "an entry removed",
                with(&["voip", "chat", "video"]),
                &named,
                vec!["video.token", "video.expiresOn", "video.scopes"],
            ),
            (
                "switched to spec.tokens",
                unnamed_state.clone(),
                &named,
                vec!["token", "expiresOn", "scopes"],
            ),
            (
                "switched to spec.scopes",
                with(&["voip"]),
                &single,
                vec!["voip.token", "voip.expiresOn", "voip.scopes"],
            ),
            ("no token yet", Default::default(), &named, vec![]),
        ];
        for (name, status, spec, expected) in cases {
            assert_eq!(stale_keys(&status, spec), expected, "{name}");
        }
    }
}
