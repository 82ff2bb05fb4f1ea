//! The reconcile loop: gather → decide → act → record, in the order of the lifecycle
//! (docs/operator.md). Decisions, Secret rendering, refresh times and conditions are pure
//! functions in their own modules; this file only does I/O around them.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::crd::{
    CONNECTION_SECRET_FINALIZER, CommunicationIdentity, CommunicationIdentityStatus,
    DeletionPolicy, FIELD_MANAGER, FINALIZER, reason, secret_key,
};
use crate::decide::{Decision, IssueReason, Observed, SecretState, decide};
use crate::refresh::{refresh_at, retry_delay};
use crate::secret::{SecretOwnership, ownership, render_secret, secret_is_current};
use crate::status::{Failure, Outcome, ready_condition, with_condition};

/// Failures of the Kubernetes API itself; everything about ACS or user input is a [`Failure`]
/// recorded in status instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the resource has no {0}; it was not read from the API server")]
    MissingMetadata(&'static str),
}

impl Error {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingMetadata(_) => "metadata",
        }
    }
}

/// How soon an API-server error is retried.
const KUBE_ERROR_RETRY: Duration = Duration::from_secs(5);

pub async fn reconcile(
    resource: Arc<CommunicationIdentity>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = resource
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let mut resource = resource;
    // The first pass works from the watch cache; one that would call ACS re-reads the resource
    // first, since the cache may not show yet what the previous pass wrote (a Secret event can
    // trigger a pass before our own status update arrives), and acting on that would issue twice.
    // The object a patch returns is as fresh as a read.
    let mut fresh = false;
    loop {
        let pass = Pass {
            api: Api::namespaced(ctx.client.clone(), &namespace),
            secrets: Api::namespaced(ctx.client.clone(), &namespace),
            uid: resource.uid().ok_or(Error::MissingMetadata("uid"))?,
            status: resource.status.clone().unwrap_or_default(),
            now: ctx.now(),
            resource: resource.clone(),
            ctx: ctx.clone(),
        };
        if pass.resource.metadata.deletion_timestamp.is_some() {
            return pass.cleanup().await;
        }
        if !pass.resource.finalizers().iter().any(|f| f == FINALIZER) {
            // Before anything exists in ACS, so that no identity can be created without cleanup.
            resource = Arc::new(add_finalizer(&pass.api, &pass.resource, FINALIZER).await?);
            fresh = true;
            continue;
        }
        match pass.apply(fresh).await? {
            Applied::Done(action) => return Ok(action),
            Applied::Stale(latest) => {
                resource = Arc::new(*latest);
                fresh = true;
            }
        }
    }
}

/// How [`Pass::apply`] ended.
enum Applied {
    Done(Action),
    /// The cached resource was older than the API server's: decide again from this one (a pass
    /// from a fresh read never ends so).
    Stale(Box<CommunicationIdentity>),
}

pub fn error_policy(
    _resource: Arc<CommunicationIdentity>,
    error: &Error,
    _ctx: Arc<Context>,
) -> Action {
    warn!(%error, "reconcile failed; retrying");
    Action::requeue(KUBE_ERROR_RETRY)
}

/// One reconcile pass of one resource.
struct Pass {
    resource: Arc<CommunicationIdentity>,
    ctx: Arc<Context>,
    api: Api<CommunicationIdentity>,
    secrets: Api<Secret>,
    uid: String,
    status: CommunicationIdentityStatus,
    now: Timestamp,
}

/// How a token came to be issued, for its event and for which requests it answers.
enum Issuance {
    /// With a new identity: the identity's first token.
    Created,
    Issued {
        reason: IssueReason,
        /// Every earlier token was revoked first.
        revoked: bool,
    },
}

/// A token just issued, with what the Secret and status need of it.
struct Issued {
    identity_id: String,
    token: String,
    expires_on: Timestamp,
    endpoint: String,
}

impl Pass {
    async fn apply(&self, fresh: bool) -> Result<Applied, Error> {
        if let Err(invalid) = self.resource.spec.validate() {
            return Ok(Applied::Done(
                self.record_failure(Failure::InvalidSpec(invalid)).await?,
            ));
        }
        let secret_name = self.resource.secret_name();
        let existing = self.secrets.get_opt(&secret_name).await?;
        if ownership(existing.as_ref(), &self.uid) == SecretOwnership::Foreign {
            return Ok(Applied::Done(
                self.record_failure(Failure::SecretConflict { secret_name })
                    .await?,
            ));
        }
        let (secret_state, rewritten) = self.secret_state(existing.as_ref());
        let observed = Observed {
            generation: self.resource.metadata.generation,
            status: &self.status,
            adopt_identity_id: self.resource.spec.adopted_identity_id(),
            token_matches_spec: self.status.token_matches(&self.resource.spec),
            refresh_request: self.resource.pending_refresh_request(),
            revoke_request: self.resource.pending_revoke_request(),
            secret: secret_state,
        };
        let decision = decide(&observed, self.now);
        debug!(?decision, "decided");
        let calls_acs = matches!(
            decision,
            Decision::CreateIdentity | Decision::IssueToken { .. }
        );
        if calls_acs && !fresh {
            let latest = self.api.get(&self.resource.name_any()).await?;
            if latest.resource_version() != self.resource.resource_version() {
                return Ok(Applied::Stale(Box::new(latest)));
            }
        }
        self.act(decision, rewritten).await.map(Applied::Done)
    }

    /// Carries out a decision.
    async fn act(&self, decision: Decision, rewritten: Option<Secret>) -> Result<Action, Error> {
        match decision {
            Decision::CreateIdentity => match self.create_identity().await? {
                Ok(issued) => self.record_issued(issued, Issuance::Created).await,
                Err(failure) => self.record_failure(failure).await,
            },
            Decision::IssueToken {
                identity_id,
                reason,
                revoke_first,
            } => match self.issue_token(identity_id, revoke_first).await? {
                Ok(issued) => {
                    let how = Issuance::Issued {
                        reason,
                        revoked: revoke_first,
                    };
                    self.record_issued(issued, how).await
                }
                Err(failure) => self.record_failure(failure).await,
            },
            Decision::RewriteSecret => {
                let desired = rewritten.expect("a rewrite decision comes with the Secret");
                self.write_secret(&desired).await?;
                info!(identity = ?self.status.identity_id, secret = %self.resource.secret_name(), "secret restored");
                self.publish(
                    EventType::Normal,
                    reason::SECRET_RESTORED,
                    format!(
                        "Restored Secret {:?}, which was edited; the token in it is unchanged",
                        self.resource.secret_name()
                    ),
                )
                .await;
                self.settle().await
            }
            Decision::WaitUntil(_) => self.settle().await,
        }
    }

    /// Classifies the resource's Secret; for an edited one, also renders what to write back.
    fn secret_state(&self, existing: Option<&Secret>) -> (SecretState, Option<Secret>) {
        let value = |key: &str| {
            existing
                .and_then(|s| s.data.as_ref())
                .and_then(|data| data.get(key))
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let (Some(existing), Some(identity_id), Some(expires_on)) = (
            existing,
            self.status.identity_id.as_deref(),
            self.status.token_expires_on.as_ref().map(|t| t.0),
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
        let Ok(desired) = render_secret(&self.resource, &token, expires_on, identity_id, &endpoint)
        else {
            return (SecretState::TokenMissing, None);
        };
        if secret_is_current(existing, &desired) {
            (SecretState::Current, None)
        } else {
            (SecretState::TokenIntactButEdited, Some(desired))
        }
    }

    /// Creates the identity with its first token. The resource's UID is the identity's
    /// customId, so a create retried after a crash returns the same identity.
    async fn create_identity(&self) -> Result<Result<Issued, Failure>, Error> {
        let (acs, endpoint) = match self.acs_client().await? {
            Ok(client) => client,
            Err(failure) => return Ok(Err(failure)),
        };
        let spec = &self.resource.spec;
        let minutes = spec.token_lifetime_minutes().unwrap_or_default() as u32;
        let created = match acs
            .create_identity_with_token(&self.uid, &scope_names(spec), minutes)
            .await
        {
            Ok(created) => created,
            Err(error) => return Ok(Err(failure_from_acs(&error, self, None))),
        };
        // Recorded before anything else can fail, so that a crash never loses track of it.
        let recorded = CommunicationIdentityStatus {
            identity_id: Some(created.id.clone()),
            ..self.status.clone()
        };
        self.patch_status(&recorded).await?;
        info!(identity = %created.id, existing = !created.created, "identity created");
        Ok(to_issued(created.id, created.token, endpoint))
    }

    /// Issues a new token for `identity_id`, revoking all its tokens first when asked to.
    async fn issue_token(
        &self,
        identity_id: String,
        revoke_first: bool,
    ) -> Result<Result<Issued, Failure>, Error> {
        let (acs, endpoint) = match self.acs_client().await? {
            Ok(client) => client,
            Err(failure) => return Ok(Err(failure)),
        };
        if revoke_first {
            if let Err(error) = acs.revoke_tokens(&identity_id).await {
                return Ok(Err(failure_from_acs(&error, self, Some(&identity_id))));
            }
            info!(identity = %identity_id, "all tokens revoked");
            self.publish(
                EventType::Normal,
                reason::TOKENS_REVOKED,
                format!("Revoked every access token of ACS identity {identity_id}"),
            )
            .await;
        }
        let spec = &self.resource.spec;
        let minutes = spec.token_lifetime_minutes().unwrap_or_default() as u32;
        match acs
            .issue_token(&identity_id, &scope_names(spec), minutes)
            .await
        {
            Ok(token) => Ok(to_issued(identity_id, token, endpoint)),
            Err(error) => Ok(Err(failure_from_acs(&error, self, Some(&identity_id)))),
        }
    }

    /// The ACS client for the connection Secret's connection string.
    async fn acs_client(&self) -> Result<Result<(acs::AcsClient, String), Failure>, Error> {
        let reference = &self.resource.spec.connection_secret_ref;
        let namespace = self.resource.namespace().unwrap_or_default();
        let secret = match self.ctx.connection_secrets.get(&namespace, &reference.name) {
            Some(secret) => Some(secret),
            None => self.read_connection_secret(&namespace).await?,
        };
        let client = self
            .ctx
            .acs
            .client_for(&namespace, reference, secret.as_deref());
        if client.is_err() {
            self.ctx
                .connection_secrets
                .forget(&namespace, &reference.name);
        }
        Ok(client)
    }

    /// Reads the connection Secret and holds it with a finalizer while this resource needs it.
    async fn read_connection_secret(&self, namespace: &str) -> Result<Option<Arc<Secret>>, Error> {
        let name = &self.resource.spec.connection_secret_ref.name;
        let Some(mut secret) = self.secrets.get_opt(name).await? else {
            return Ok(None);
        };
        if secret.metadata.deletion_timestamp.is_some() {
            return Ok(Some(Arc::new(secret)));
        }
        if !secret
            .finalizers()
            .iter()
            .any(|f| f == CONNECTION_SECRET_FINALIZER)
        {
            secret = add_finalizer(&self.secrets, &secret, CONNECTION_SECRET_FINALIZER).await?;
        }
        let secret = Arc::new(secret);
        self.ctx
            .connection_secrets
            .remember(namespace, secret.clone());
        Ok(Some(secret))
    }

    /// Writes the Secret with the new token, then the status that describes it.
    async fn record_issued(&self, issued: Issued, how: Issuance) -> Result<Action, Error> {
        let revoke_handled = matches!(
            how,
            Issuance::Created | Issuance::Issued { revoked: true, .. }
        );
        let spec = &self.resource.spec;
        let secret = render_secret(
            &self.resource,
            &issued.token,
            issued.expires_on,
            &issued.identity_id,
            &issued.endpoint,
        )
        .map_err(|_| Error::MissingMetadata("uid"))?;
        self.write_secret(&secret).await?;

        let lifetime = spec.token_lifetime().unwrap_or_default();
        let refresh_before = spec.refresh_before().unwrap_or_default();
        let plan = refresh_at(
            self.now,
            issued.expires_on,
            lifetime,
            refresh_before,
            &self.uid,
        );
        let mut status = CommunicationIdentityStatus {
            identity_id: Some(issued.identity_id.clone()),
            secret_name: Some(self.resource.secret_name()),
            token_expires_on: Some(Time(issued.expires_on)),
            last_refresh_time: Some(Time(self.now)),
            next_refresh_time: Some(Time(plan.at)),
            token_scopes: spec.scopes.clone(),
            token_lifetime_minutes: spec.token_lifetime_minutes().ok(),
            failed_attempts: 0,
            last_failure_time: None,
            handled_refresh_request: self
                .resource
                .pending_refresh_request()
                .map(str::to_owned)
                .or_else(|| self.status.handled_refresh_request.clone()),
            handled_revoke_request: if revoke_handled {
                self.resource
                    .pending_revoke_request()
                    .map(str::to_owned)
                    .or_else(|| self.status.handled_revoke_request.clone())
            } else {
                self.status.handled_revoke_request.clone()
            },
            observed_generation: self.resource.metadata.generation,
            conditions: self.status.conditions.clone(),
        };
        status.conditions = self.conditions_with_ready(Outcome::TokenCurrent {
            secret_name: &self.resource.secret_name(),
            expires_on: issued.expires_on,
        });
        self.patch_status(&status).await?;

        // One event per issue, a creation included: events are API writes too.
        let (event_reason, verb) = match &how {
            Issuance::Created => (
                reason::IDENTITY_CREATED,
                format!(
                    "Created ACS identity {} and issued its first access token",
                    issued.identity_id
                ),
            ),
            Issuance::Issued {
                reason: IssueReason::Refresh | IssueReason::RefreshRequested,
                ..
            } => (reason::TOKEN_REFRESHED, "Refreshed the access token".into()),
            Issuance::Issued { .. } => (reason::TOKEN_ISSUED, "Issued an access token".into()),
        };
        let why = match how {
            Issuance::Created => None,
            Issuance::Issued { reason, .. } => Some(reason),
        };
        info!(identity = %issued.identity_id, ?why, expires_on = %issued.expires_on, "token issued");
        self.publish(
            EventType::Normal,
            event_reason,
            format!(
                "{verb} with scopes {} that expires at {} into Secret {:?}",
                spec.scopes_joined(),
                issued.expires_on,
                self.resource.secret_name()
            ),
        )
        .await;
        if plan.shortened {
            self.publish(
                EventType::Warning,
                reason::SHORT_TOKEN_LIFETIME,
                format!(
                    "ACS issued a token that expires at {}, sooner than the requested {}; refreshing at two thirds of its actual lifetime ({})",
                    issued.expires_on, spec.token_lifetime, plan.at
                ),
            )
            .await;
        }
        Ok(Action::requeue(plan.wait_from(self.now).max(MIN_REQUEUE)))
    }

    /// Nothing to do in ACS: bring status up to date with the spec (a new refreshBefore moves
    /// the refresh time) and wait for the next refresh.
    async fn settle(&self) -> Result<Action, Error> {
        let mut status = self.status.clone();
        if status.failed_attempts == 0
            && let (Some(issued), Some(expires_on)) = (
                status.last_refresh_time.as_ref().map(|t| t.0),
                status.token_expires_on.as_ref().map(|t| t.0),
            )
        {
            let spec = &self.resource.spec;
            let plan = refresh_at(
                issued,
                expires_on,
                spec.token_lifetime().unwrap_or_default(),
                spec.refresh_before().unwrap_or_default(),
                &self.uid,
            );
            status.next_refresh_time = Some(Time(plan.at));
            status.conditions = self.conditions_with_ready(Outcome::TokenCurrent {
                secret_name: &self.resource.secret_name(),
                expires_on,
            });
            status.secret_name = Some(self.resource.secret_name());
        }
        status.observed_generation = self.resource.metadata.generation;
        if status != self.status {
            self.patch_status(&status).await?;
        }
        let wait = status
            .next_refresh_time
            .map(|t| duration_until(self.now, t.0))
            .unwrap_or(KUBE_ERROR_RETRY);
        Ok(Action::requeue(wait.max(MIN_REQUEUE)))
    }

    /// Records a failure: condition, backoff in status (so it survives a restart), a Warning
    /// event; the retry comes after the backoff.
    async fn record_failure(&self, failure: Failure) -> Result<Action, Error> {
        let attempts = self.status.failed_attempts.saturating_add(1);
        let expires_on = self.status.token_expires_on.as_ref().map(|t| t.0);
        let delay = retry_delay(attempts, failure.kind(), self.now, expires_on, &self.uid);
        let retry_at = self.now + delay;
        let token_valid_until = expires_on.filter(|_| {
            self.status.token_matches(&self.resource.spec)
                && !matches!(failure, Failure::SecretConflict { .. })
        });
        let mut status = CommunicationIdentityStatus {
            failed_attempts: attempts,
            last_failure_time: Some(Time(self.now)),
            next_refresh_time: Some(Time(retry_at)),
            observed_generation: self.resource.metadata.generation,
            ..self.status.clone()
        };
        status.conditions = self.conditions_with_ready(Outcome::Failed {
            failure: &failure,
            token_valid_until,
        });
        self.patch_status(&status).await?;
        warn!(reason = failure.reason(), message = %failure.message(), retry_in = ?delay, "reconcile failed");
        self.ctx.metrics.failure(failure.reason());
        self.publish(EventType::Warning, failure.reason(), failure.message())
            .await;
        Ok(Action::requeue(delay.max(MIN_REQUEUE)))
    }

    /// Deletion: clean up in ACS per deletionPolicy, then release the resource and, when it was
    /// the last user, the connection Secret.
    async fn cleanup(&self) -> Result<Action, Error> {
        if !self.resource.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let policy = self.resource.spec.deletion_policy;
        let identity_id = self.status.identity_id.clone();
        if self.resource.skip_cleanup_requested() {
            self.publish(
                EventType::Warning,
                reason::CLEANUP_SKIPPED,
                format!(
                    "Released without cleanup in ACS (skip-cleanup annotation); identity {} is left in ACS",
                    identity_id.as_deref().unwrap_or("(none created)")
                ),
            )
            .await;
        } else if let Some(identity_id) = identity_id
            && let Err(failure) = self.cleanup_in_acs(&identity_id, policy).await?
        {
            return self.record_cleanup_failure(policy, failure).await;
        }
        remove_finalizer(&self.api, &self.resource, FINALIZER).await?;
        self.release_connection_secret().await?;
        Ok(Action::await_change())
    }

    async fn cleanup_in_acs(
        &self,
        identity_id: &str,
        policy: DeletionPolicy,
    ) -> Result<Result<(), Failure>, Error> {
        if policy == DeletionPolicy::Retain {
            self.publish(
                EventType::Normal,
                reason::IDENTITY_RETAINED,
                format!("Left ACS identity {identity_id} in place (deletionPolicy Retain)"),
            )
            .await;
            return Ok(Ok(()));
        }
        let (acs, _) = match self.acs_client().await? {
            Ok(client) => client,
            Err(failure) => return Ok(Err(failure)),
        };
        let (result, event_reason, done) = match policy {
            DeletionPolicy::Delete => (
                acs.delete_identity(identity_id).await,
                reason::IDENTITY_DELETED,
                "Deleted ACS identity",
            ),
            _ => (
                acs.revoke_tokens(identity_id).await,
                reason::TOKENS_REVOKED,
                "Revoked every access token of ACS identity",
            ),
        };
        match result {
            // Already gone counts as done.
            Ok(()) | Err(acs::Error::NotFound(_)) => {
                info!(identity = %identity_id, ?policy, "cleaned up in ACS");
                self.publish(
                    EventType::Normal,
                    event_reason,
                    format!("{done} {identity_id}"),
                )
                .await;
                Ok(Ok(()))
            }
            Err(error) => Ok(Err(failure_from_acs(&error, self, Some(identity_id)))),
        }
    }

    async fn record_cleanup_failure(
        &self,
        policy: DeletionPolicy,
        failure: Failure,
    ) -> Result<Action, Error> {
        let attempts = self.status.failed_attempts.saturating_add(1);
        let delay = retry_delay(attempts, failure.kind(), self.now, None, &self.uid);
        let mut status = CommunicationIdentityStatus {
            failed_attempts: attempts,
            last_failure_time: Some(Time(self.now)),
            ..self.status.clone()
        };
        status.conditions = self.conditions_with_ready(Outcome::Deleting {
            policy,
            blocked_by: Some(&failure),
        });
        self.patch_status(&status).await?;
        warn!(reason = failure.reason(), message = %failure.message(), retry_in = ?delay, "cleanup in ACS failed; deletion waits");
        self.ctx.metrics.failure(failure.reason());
        self.publish(EventType::Warning, failure.reason(), failure.message())
            .await;
        Ok(Action::requeue(delay.max(MIN_REQUEUE)))
    }

    /// Drops the connection Secret's finalizer once no other CommunicationIdentity still
    /// holding its own finalizer refers to it. Runs after this resource dropped its finalizer
    /// and lists fresh from the API server, so of two resources finishing at once the later one
    /// always sees the other gone.
    async fn release_connection_secret(&self) -> Result<(), Error> {
        let secret_name = &self.resource.spec.connection_secret_ref.name;
        let others = self.api.list(&Default::default()).await?;
        let still_used = others.items.iter().any(|other| {
            other.uid().as_deref() != Some(self.uid.as_str())
                && other.spec.connection_secret_ref.name == *secret_name
                && other.finalizers().iter().any(|f| f == FINALIZER)
        });
        if still_used {
            return Ok(());
        }
        if let Some(secret) = self.secrets.get_opt(secret_name).await? {
            remove_finalizer(&self.secrets, &secret, CONNECTION_SECRET_FINALIZER).await?;
        }
        let namespace = self.resource.namespace().unwrap_or_default();
        self.ctx.connection_secrets.forget(&namespace, secret_name);
        Ok(())
    }

    async fn write_secret(&self, secret: &Secret) -> Result<(), Error> {
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        let mut manifest = serde_json::to_value(secret).expect("a Secret serialises");
        manifest["apiVersion"] = json!("v1");
        manifest["kind"] = json!("Secret");
        self.secrets
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(manifest),
            )
            .await?;
        Ok(())
    }

    /// The conditions with Ready computed for `outcome` (its transition time kept from the
    /// previous status while unchanged).
    fn conditions_with_ready(
        &self,
        outcome: Outcome<'_>,
    ) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        with_condition(
            &self.status.conditions,
            ready_condition(
                outcome,
                self.resource.metadata.generation,
                self.now,
                &self.status.conditions,
            ),
        )
    }

    async fn patch_status(&self, status: &CommunicationIdentityStatus) -> Result<(), Error> {
        let patch = json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "status": status,
        });
        self.api
            .patch_status(
                &self.resource.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await?;
        Ok(())
    }

    async fn publish(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: reason.to_owned(),
            secondary: None,
        };
        let reference = self.resource.object_ref(&());
        if let Err(error) = self.ctx.recorder.publish(&event, &reference).await {
            // An event is worth a log line, not a failed reconcile.
            warn!(%error, reason, "could not publish event");
        }
    }
}

/// No requeue sooner than this, so a clock at the edge never spins.
const MIN_REQUEUE: Duration = Duration::from_secs(1);

fn duration_until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

fn scope_names(spec: &crate::crd::CommunicationIdentitySpec) -> Vec<String> {
    spec.scopes.iter().map(|s| s.as_str().to_owned()).collect()
}

/// A token as the rest of the pass uses it. `expiresOn` is truncated to whole seconds, the
/// precision status keeps, so the Secret and status always agree.
fn to_issued(
    identity_id: String,
    token: acs::wire::AccessToken,
    endpoint: String,
) -> Result<Issued, Failure> {
    let expires_on = acs::wire::parse_expires_on(&token.expires_on)
        .and_then(|t| Timestamp::from_second(t.as_second()).ok())
        .ok_or_else(|| Failure::AcsUnavailable {
            detail: format!(
                "ACS returned an unreadable expiresOn {:?} for identity {identity_id}",
                token.expires_on
            ),
        })?;
    Ok(Issued {
        identity_id,
        token: token.token,
        expires_on,
        endpoint,
    })
}

fn failure_from_acs(error: &acs::Error, pass: &Pass, identity_id: Option<&str>) -> Failure {
    let secret = pass.resource.spec.connection_secret_ref.name.clone();
    match error {
        acs::Error::Unauthorized(service) => Failure::AuthenticationFailed {
            secret,
            acs_message: service.to_string(),
        },
        acs::Error::BadRequest(service) => Failure::InvalidRequest {
            acs_code: service.code.clone(),
            acs_message: service.message.clone(),
        },
        acs::Error::NotFound(_) => Failure::IdentityNotFound {
            identity_id: identity_id.unwrap_or_default().to_owned(),
        },
        acs::Error::Throttled { retry_after, .. } => Failure::Throttled {
            retry_after: *retry_after,
        },
        other => Failure::AcsUnavailable {
            detail: other.to_string(),
        },
    }
}

/// Adds `finalizer` with a merge patch guarded by resourceVersion: a concurrent change makes it
/// fail (and the reconcile retry) instead of dropping someone else's finalizer. Returns the
/// object as patched.
async fn add_finalizer<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<K, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut finalizers = object.meta().finalizers.clone().unwrap_or_default();
    finalizers.push(finalizer.to_owned());
    patch_finalizers(api, object, finalizers).await
}

async fn remove_finalizer<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let before = object.meta().finalizers.clone().unwrap_or_default();
    let finalizers: Vec<String> = before.iter().filter(|f| *f != finalizer).cloned().collect();
    if finalizers.len() == before.len() {
        return Ok(());
    }
    patch_finalizers(api, object, finalizers).await?;
    Ok(())
}

async fn patch_finalizers<K>(api: &Api<K>, object: &K, finalizers: Vec<String>) -> Result<K, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let meta = object.meta();
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": meta.resource_version,
        }
    });
    Ok(api
        .patch(
            meta.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await?)
}
