//! The connections' own controller: for each AcsConnection and ClusterAcsConnection, how many
//! identities use it (and, while any does, a finalizer that keeps it from being deleted from
//! under them), whether ACS accepts its credentials (tried when its spec changes and every
//! [`VERIFY_EVERY`]), the api-version in use and whether creates through it are exactly-once.
//! Its status is written only when it changes.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::warn;

use crate::cached::CachedIdentity;
use crate::connection::{
    AcsConnection, ClusterAcsConnection, ConnectionSource, ConnectionStatus, SourceAuth,
};
use crate::context::Context;
use crate::crd::{CONNECTION_SECRET_FINALIZER, ConnectionKind, FIELD_MANAGER, READY_CONDITION};
use crate::kube_call::{Error, kube_call, patch_finalizers};
use crate::status::Failure;

/// How often credentials that were accepted are tried again.
pub const VERIFY_EVERY: Duration = Duration::from_secs(10 * 60);
/// After a failure, the next try comes sooner.
const VERIFY_AFTER_FAILURE: Duration = Duration::from_secs(60);
pub const CREATES_EXACTLY_ONCE_CONDITION: &str = "CreatesExactlyOnce";

/// What differs between the two kinds.
pub trait ConnectionResource:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize + Send + Sync + 'static
{
    const KIND: ConnectionKind;
    fn status(&self) -> Option<&ConnectionStatus>;
    /// How it reaches ACS, whichever namespace asks.
    fn connection_source(&self, operator_namespace: &str) -> Result<ConnectionSource, Failure>;
    fn api(client: kube::Client, namespace: Option<&str>) -> Api<Self>;
    /// The connection `identity` names, if it is of this kind.
    fn named_by(identity: &CachedIdentity) -> Option<ObjectRef<Self>> {
        let reference = identity.connection_ref()?;
        let named = ObjectRef::new(&reference.name);
        match (Self::KIND, reference.kind) {
            (ConnectionKind::AcsConnection, ConnectionKind::AcsConnection) => {
                Some(named.within(&identity.namespace()?))
            }
            (ConnectionKind::ClusterAcsConnection, ConnectionKind::ClusterAcsConnection) => {
                Some(named)
            }
            _ => None,
        }
    }
    /// Whether `identity` names this connection.
    fn is_named_by(&self, identity: &CachedIdentity) -> bool {
        let named = identity.connection_ref().is_some_and(|reference| {
            reference.kind == Self::KIND && Some(&reference.name) == self.meta().name.as_ref()
        });
        let same_scope = match Self::KIND {
            ConnectionKind::AcsConnection => identity.namespace() == self.namespace(),
            ConnectionKind::ClusterAcsConnection => true,
        };
        named && same_scope
    }
}

impl ConnectionResource for AcsConnection {
    const KIND: ConnectionKind = ConnectionKind::AcsConnection;
    fn status(&self) -> Option<&ConnectionStatus> {
        self.status.as_ref()
    }
    fn connection_source(&self, _: &str) -> Result<ConnectionSource, Failure> {
        self.source()
    }
    fn api(client: kube::Client, namespace: Option<&str>) -> Api<Self> {
        match namespace {
            Some(namespace) => Api::namespaced(client, namespace),
            None => Api::all(client),
        }
    }
}

impl ConnectionResource for ClusterAcsConnection {
    const KIND: ConnectionKind = ConnectionKind::ClusterAcsConnection;
    fn status(&self) -> Option<&ConnectionStatus> {
        self.status.as_ref()
    }
    fn connection_source(&self, operator_namespace: &str) -> Result<ConnectionSource, Failure> {
        self.source(operator_namespace)
    }
    fn api(client: kube::Client, _: Option<&str>) -> Api<Self> {
        Api::all(client)
    }
}

/// The finalizer change a connection needs: `Some(true)` add, `Some(false)` remove.
pub fn finalizer_change(deleting: bool, in_use: bool, has_finalizer: bool) -> Option<bool> {
    match (deleting, in_use, has_finalizer) {
        (false, true, false) => Some(true),
        // Deleted and no longer used, or not used at all: nothing to hold it for.
        (_, false, true) => Some(false),
        _ => None,
    }
}

/// Whether the credentials are to be tried now: never yet, a new spec, or the last try is
/// older than its period (shorter after a failure).
pub fn verification_due(
    status: Option<&ConnectionStatus>,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let Some(status) = status else { return true };
    let Some(verified) = &status.last_verified_time else {
        return true;
    };
    let period = match ready(status) {
        Some(true) => VERIFY_EVERY,
        _ => VERIFY_AFTER_FAILURE,
    };
    status.observed_generation != generation
        || now.duration_since(verified.0).as_secs() >= period.as_secs() as i64
}

fn ready(status: &ConnectionStatus) -> Option<bool> {
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == READY_CONDITION)?;
    Some(condition.status == "True")
}

/// The status after a try of the credentials: `outcome` is the api-version then in use, or the
/// failure; `previous` keeps the transition times of unchanged conditions.
pub fn verified_status(
    source: &Result<ConnectionSource, Failure>,
    outcome: Result<&'static str, &Failure>,
    identities: u32,
    generation: Option<i64>,
    now: Timestamp,
    previous: Option<&ConnectionStatus>,
) -> ConnectionStatus {
    let authentication = source.as_ref().ok().map(|source| match source.auth {
        SourceAuth::AccessKey { .. } => "AccessKey".to_owned(),
        SourceAuth::WorkloadIdentity(_) => "WorkloadIdentity".to_owned(),
    });
    let (ready, api_version) = match outcome {
        Ok(version) => (
            condition(
                READY_CONDITION,
                true,
                "Verified",
                format!("ACS accepted the credentials at {now} (api-version {version})"),
            ),
            Some(version),
        ),
        Err(failure) => (
            condition(READY_CONDITION, false, failure.reason(), failure.message()),
            None,
        ),
    };
    let mut conditions = vec![ready];
    if let Some(version) = api_version {
        conditions.push(match acs::wire::has_custom_id(version) {
            true => condition(
                CREATES_EXACTLY_ONCE_CONDITION,
                true,
                "CustomId",
                format!("api-version {version} has customId: a create retried after a lost answer or a crash finds the identity the first one made"),
            ),
            false => condition(
                CREATES_EXACTLY_ONCE_CONDITION,
                false,
                "ApiVersionWithoutCustomId",
                format!("Warning: api-version {version} has no customId, so creation is no longer exactly-once after a crash or a lost answer: such a create may leave an identity in ACS that no resource records (each is reported as a PossibleOrphanIdentity Event)"),
            ),
        });
    }
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    for condition in &mut conditions {
        condition.observed_generation = generation;
        if let Some(before) = previous_conditions
            .iter()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = before.last_transition_time.clone();
        } else {
            condition.last_transition_time = Time(now);
        }
    }
    ConnectionStatus {
        authentication,
        api_version: api_version.map(str::to_owned),
        identities: Some(identities),
        last_verified_time: Some(Time(now)),
        observed_generation: generation,
        conditions,
    }
}

fn condition(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: crate::status::bounded(message),
        observed_generation: None,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// Runs the controller of the connections `watched` lists, each also reconciled whenever
/// `triggers` names it (an identity naming it changed or went).
pub async fn run<K: ConnectionResource>(
    ctx: Arc<Context>,
    watched: Api<K>,
    triggers: UnboundedReceiver<ObjectRef<K>>,
) {
    Controller::new(watched, watcher::Config::default())
        .reconcile_on(triggers)
        .shutdown_on_signal()
        .run(
            reconcile::<K>,
            |_, _, _| Action::requeue(VERIFY_AFTER_FAILURE),
            ctx,
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, kind = K::KIND.as_str(), "connection reconcile error");
            }
        })
        .await;
}

async fn reconcile<K: ConnectionResource>(
    connection: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let api = K::api(ctx.client.clone(), connection.namespace().as_deref());
    let users = ctx
        .identities
        .state()
        .iter()
        .filter(|i| connection.is_named_by(i))
        .count();
    let deleting = connection.meta().deletion_timestamp.is_some();
    let finalizers = connection.finalizers().to_vec();
    let has = finalizers.iter().any(|f| f == CONNECTION_SECRET_FINALIZER);
    if let Some(add) = finalizer_change(deleting, users > 0, has) {
        let mut wanted: Vec<String> = finalizers
            .into_iter()
            .filter(|f| f != CONNECTION_SECRET_FINALIZER)
            .collect();
        if add {
            wanted.push(CONNECTION_SECRET_FINALIZER.to_owned());
        }
        patch_finalizers(&ctx.metrics, &api, &*connection, wanted, None).await?;
    }
    if deleting {
        return Ok(Action::await_change());
    }
    let now = ctx.now();
    let previous = connection.status();
    let generation = connection.meta().generation;
    let users = users as u32;
    let source = connection.connection_source(ctx.acs.operator_namespace());
    // The identities' passes share the client: one that fell back shows here at once.
    let recorded = previous.and_then(|status| status.api_version.as_deref());
    let cached = source
        .as_ref()
        .ok()
        .and_then(|source| ctx.acs.cached_api_version(source));
    let moved = cached.is_some_and(|cached| recorded.is_some_and(|recorded| recorded != cached));
    let status = match moved || verification_due(previous, generation, now) {
        true => {
            let outcome = match &source {
                Ok(source) => verify(&ctx, source).await?,
                Err(failure) => Err(failure.clone()),
            };
            let outcome = outcome.as_ref().map(|version| *version);
            verified_status(&source, outcome, users, generation, now, previous)
        }
        false => ConnectionStatus {
            identities: Some(users),
            ..previous.cloned().unwrap_or_default()
        },
    };
    if Some(&status) != previous {
        let patch = json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": K::KIND.as_str(),
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let name = connection.name_any();
        let patch = Patch::Apply(patch);
        let request = api.patch_status(&name, &params, &patch);
        kube_call(&ctx.metrics, "connection_status_patch", request).await?;
    }
    let period = match ready(&status) {
        Some(true) => VERIFY_EVERY,
        _ => VERIFY_AFTER_FAILURE,
    };
    Ok(Action::requeue(period))
}

/// Tries the credentials of `source`: the api-version in use once ACS accepted them, or why not.
async fn verify(
    ctx: &Context,
    source: &ConnectionSource,
) -> Result<Result<&'static str, Failure>, Error> {
    let via = source.via.as_deref().unwrap_or_default();
    let client = match &source.auth {
        SourceAuth::AccessKey { namespace, secret } => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
            let read = kube_call(
                &ctx.metrics,
                "connection_secret_get",
                secrets.get_opt(&secret.name),
            );
            let read = read.await?;
            ctx.acs
                .client_for_key((namespace, secret), source, read.as_ref())
        }
        SourceAuth::WorkloadIdentity(identity) => {
            (ctx.workload_identity_client(identity, source.api_version, via))
                .map(|client| (client, identity.endpoint.clone()))
        }
    };
    let client = match client {
        Ok((client, _)) => client,
        Err(failure) => return Ok(Err(failure)),
    };
    Ok(match client.verify().await {
        Ok(()) => Ok(client.api_version()),
        Err(error) => Err(Failure::from_acs(
            &error,
            &format!("the Secret {via} names"),
            via,
            None,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_held_while_identities_use_it() {
        let cases = [
            ("in use, not held", false, true, false, Some(true)),
            ("in use, held", false, true, true, None),
            ("unused, held", false, false, true, Some(false)),
            ("unused", false, false, false, None),
            ("deleted while in use: held on", true, true, true, None),
            (
                "deleted, the last user gone",
                true,
                false,
                true,
                Some(false),
            ),
            (
                "deleted while in use, never held: nothing to add",
                true,
                true,
                false,
                None,
            ),
        ];
        for (name, deleting, in_use, has, expected) in cases {
            assert_eq!(finalizer_change(deleting, in_use, has), expected, "{name}");
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn status_verified(at_time: Timestamp, ready: bool, generation: i64) -> ConnectionStatus {
        ConnectionStatus {
            last_verified_time: Some(Time(at_time)),
            observed_generation: Some(generation),
            conditions: vec![condition(READY_CONDITION, ready, "r", String::new())],
            ..ConnectionStatus::default()
        }
    }

    #[test]
    fn credentials_are_tried_on_a_new_spec_and_then_periodically() {
        let ok = status_verified(at(0), true, 1);
        let failed = status_verified(at(0), false, 1);
        let cases = [
            ("never", None, 1, at(0), true),
            ("just verified", Some(&ok), 1, at(60), false),
            ("a new spec", Some(&ok), 2, at(60), true),
            ("ten minutes on", Some(&ok), 1, at(600), true),
            (
                "a failure is tried again after a minute",
                Some(&failed),
                1,
                at(60),
                true,
            ),
            ("not sooner", Some(&failed), 1, at(30), false),
        ];
        for (name, status, generation, now, expected) in cases {
            assert_eq!(
                verification_due(status, Some(generation), now),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn a_ga_api_version_is_a_warning_that_creates_are_not_exactly_once() {
        let source = Err(Failure::ConnectionUnusable {
            connection: "x".into(),
        });
        let preview = verified_status(&source, Ok("2025-03-02-preview"), 3, Some(1), at(0), None);
        assert_eq!(preview.identities, Some(3));
        assert_eq!(preview.api_version.as_deref(), Some("2025-03-02-preview"));
        assert_eq!(preview.conditions[1].status, "True");
        let ga = verified_status(
            &source,
            Ok("2026-09-23"),
            3,
            Some(1),
            at(60),
            Some(&preview),
        );
        let exactly_once = &ga.conditions[1];
        assert_eq!(exactly_once.type_, CREATES_EXACTLY_ONCE_CONDITION);
        assert_eq!(exactly_once.status, "False");
        assert!(
            exactly_once
                .message
                .starts_with("Warning: api-version 2026-09-23 has no customId")
        );
        assert_eq!(exactly_once.last_transition_time, Time(at(60)));
        // Ready stayed True: its transition time is kept.
        assert_eq!(ga.conditions[0].last_transition_time, Time(at(0)));
        let failure = Failure::EntraUnavailable {
            connection: "x".into(),
            detail: "HTTP 503".into(),
        };
        let down = verified_status(&source, Err(&failure), 3, Some(1), at(120), Some(&ga));
        assert_eq!(down.conditions.len(), 1);
        assert_eq!(down.conditions[0].reason, "EntraUnavailable");
    }
}
