//! The reconcile loop: gather → decide → act → record, in the order of the lifecycle
//! (docs/operator.md). What to do (`decide`), the Secret (`secret`), the status and Events
//! after each outcome (`record`), refresh times and conditions are pure functions in their own
//! modules; this file only does the I/O around them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use acs::{Class, Ticket};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Event;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::adoption::claimed_by;
use crate::cached::CachedIdentity;
use crate::connection::{self, AcsConnection, ClusterAcsConnection, ConnectionSource, SourceAuth};
use crate::context::Context;
use crate::crd::{
    CONNECTION_SECRET_FINALIZER, CREATE_ATTEMPTED_ANNOTATION, CommunicationIdentity,
    CommunicationIdentityStatus, Connection, ConnectionKind, ConnectionSecretRef,
    DEFAULT_MIN_RESTART_INTERVAL, FIELD_MANAGER, FINALIZER, RestartTarget, WorkloadKind, reason,
};
use crate::decide::{
    Cleanup, Decision, Deletion, IssueReason, Observed, SecretState, TokenSeen, decide, tokens_seen,
};
use crate::held::{HeldToken, Issuance, Issued};
use crate::known_secrets::{Known, fingerprint};
use crate::kube_call::{Error, kube_call, patch_finalizers};
use crate::record::{
    FailedDuring, Note, after_failure, after_issue, issue_notes, merged, rewrite_note, settled,
};
use crate::refresh::{check_expiry, wait_until};
use crate::restart::{self, RestartOutcome, after_restart, restart_due, restart_patch};
use crate::secret::{Classified, Delivered, SecretOwnership, classify, ownership, render_secret};
use crate::status::{Failure, bounded};
use crate::tokens::TokenEntry;
use crate::urgency::urgency;

/// A pass's place in the ACS queues: its class and deadline (see [`urgency`]).
type Place = (Class, Timestamp);

/// How soon an API-server error is retried.
const KUBE_ERROR_RETRY: Duration = Duration::from_secs(5);
/// A pass skipped because the cache is behind the operator's own write runs again after this
/// if that write's watch event has not triggered it first (it comes within milliseconds; this
/// only covers a watch that breaks in between).
const CACHE_BEHIND_RETRY: Duration = Duration::from_secs(10);
/// No requeue sooner than this, so a clock at the edge never spins.
const MIN_REQUEUE: Duration = Duration::from_secs(1);
/// No requeue later than this: longer than any refresh plan (tokens live 24 h at most).
const MAX_REQUEUE: Duration = Duration::from_secs(25 * 60 * 60);
/// Decisions one reconcile makes at most before requeueing (a fresh read, a Secret that
/// changed under a write): bounded, so a resource edited in a loop cannot hold a worker.
const MAX_DECISIONS: usize = 4;

/// Whether `secret` carries the finalizer that holds it as a connection Secret, and is not
/// being deleted.
fn holds_connection(secret: &Secret) -> bool {
    secret.metadata.deletion_timestamp.is_none()
        && secret
            .finalizers()
            .iter()
            .any(|f| f == CONNECTION_SECRET_FINALIZER)
}

fn requeue(wait: Duration) -> Action {
    Action::requeue(wait.clamp(MIN_REQUEUE, MAX_REQUEUE))
}

pub async fn reconcile(
    resource: Arc<CommunicationIdentity>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = resource
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    // The watch event of the operator's own newer write triggers the pass that matters.
    if ctx.own_writes.cache_is_behind(&resource) {
        debug!(
            "the cache is behind the operator's own write; its watch event brings the next pass"
        );
        return Ok(requeue(CACHE_BEHIND_RETRY));
    }
    let mut resource = resource;
    // The first pass works from the watch cache; one that would call ACS re-reads the resource
    // first, since the cache may not show yet what the previous pass wrote (a Secret event can
    // trigger a pass before our own status update arrives), and acting on that would issue twice.
    // The object a patch returns is as fresh as a read.
    let mut basis = Basis::Cached;
    for _ in 0..MAX_DECISIONS {
        let pass = Pass::new(resource.clone(), ctx.clone(), &namespace)?;
        let has_finalizer = pass.resource.finalizers().iter().any(|f| f == FINALIZER);
        if pass.resource.metadata.deletion_timestamp.is_some() {
            if !has_finalizer {
                return Ok(Action::await_change());
            }
            return pass.clean_up().await;
        }
        match pass.apply(basis).await? {
            Applied::Done(action) => return Ok(action),
            Applied::Stale(latest) => {
                resource = Arc::new(*latest);
                basis = Basis::FreshResource;
            }
            Applied::Changed => {
                // Decide again from what the API server holds now.
                let name = resource.name_any();
                let latest = kube_call(&ctx.metrics, "identity_get", pass.api.get(&name)).await?;
                resource = Arc::new(latest);
                basis = Basis::AfterChange;
            }
        }
    }
    Ok(requeue(MIN_REQUEUE))
}

/// What a decision of [`Pass::apply`] starts from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// The resource from the watch cache; its Secret as `known_secrets` knows it.
    Cached,
    /// The resource as the API server answered; its Secret as known.
    FreshResource,
    /// Both changed under a write: the resource as answered, and the Secret read.
    AfterChange,
}

/// How [`Pass::apply`] ended.
enum Applied {
    Done(Action),
    /// The cached resource was older than the API server's: decide again from this one (a pass
    /// from a fresh read never ends so).
    Stale(Box<CommunicationIdentity>),
    /// The resource or its Secret changed between a read and a write: decide again from
    /// fresh reads (a token just issued is held, so this costs no ACS call).
    Changed,
}

pub fn error_policy(_resource: Arc<CachedIdentity>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(%error, "reconcile failed; retrying");
    Action::requeue(KUBE_ERROR_RETRY)
}

/// Why a step of a pass stopped short.
enum Halt {
    /// Something for the user or ACS to fix: recorded in status, retried after a backoff.
    /// `tokens_revoked`: every token of the identity was revoked before it, so the one in the
    /// Secret no longer works.
    Failed {
        failure: Failure,
        tokens_revoked: bool,
    },
    Kube(Error),
    /// See [`Applied::Changed`].
    Changed,
}

impl From<Failure> for Halt {
    fn from(failure: Failure) -> Self {
        Halt::Failed {
            failure,
            tokens_revoked: false,
        }
    }
}

impl From<Error> for Halt {
    fn from(error: Error) -> Self {
        Halt::Kube(error)
    }
}

/// What the pass saw of its Secret: the precondition of its write.
enum SecretSeen {
    Absent,
    Ours { resource_version: Option<String> },
}

/// A failure before the Secret was looked at.
const APPLYING: FailedDuring = FailedDuring::Apply {
    tokens_revoked: false,
    secret_holds_token: true,
};

/// One reconcile pass of one resource.
struct Pass {
    resource: Arc<CommunicationIdentity>,
    ctx: Arc<Context>,
    api: Api<CommunicationIdentity>,
    secrets: Api<Secret>,
    namespace: String,
    uid: String,
    status: CommunicationIdentityStatus,
    now: Timestamp,
}

impl Pass {
    fn new(
        resource: Arc<CommunicationIdentity>,
        ctx: Arc<Context>,
        namespace: &str,
    ) -> Result<Self, Error> {
        let status = resource.status.clone().unwrap_or_default();
        Ok(Self {
            api: Api::namespaced(ctx.client.clone(), namespace),
            secrets: Api::namespaced(ctx.client.clone(), namespace),
            namespace: namespace.to_owned(),
            uid: resource.uid().ok_or(Error::MissingMetadata("uid"))?,
            status,
            now: ctx.now(),
            resource,
            ctx,
        })
    }

    /// Create or refresh: gather (the spec's validity, the Secret), decide, act.
    async fn apply(&self, basis: Basis) -> Result<Applied, Error> {
        if let Err(invalid) = self.resource.validate() {
            let failure = Failure::InvalidSpec(invalid);
            return Ok(Applied::Done(self.record_failure(failure, APPLYING).await?));
        }
        let known = match basis {
            Basis::AfterChange => Known::Unknown,
            Basis::Cached | Basis::FreshResource => {
                let fingerprint = self.fingerprint(&self.status);
                self.ctx.known_secrets.lookup(&self.uid, fingerprint)
            }
        };
        // A Secret known unchanged since it was last written or read holds what status
        // describes: when that needs nothing done (the passes the operator's own writes
        // trigger), the Secret is not read.
        if matches!(known, Known::Unchanged) && !self.restart_is_due(&self.status) {
            let tokens = tokens_seen(&self.resource.spec, &self.status, |_| true);
            let decision = decide(&self.observed(SecretState::Current, tokens, None), self.now);
            if let Decision::WaitUntil(_) = decision {
                return Ok(Applied::Done(self.settle().await?));
            }
        }
        let (seen, classified) = match self.read_secret(&known).await {
            Ok(read) => read,
            Err(halt) => return self.halted(halt, true).await,
        };
        let secret_state = classified.state;
        let tokens = tokens_seen(&self.resource.spec, &self.status, |name| {
            classified
                .carried
                .iter()
                .any(|carried| carried.name == name)
        });
        let decision = decide(&self.observed(secret_state, tokens, None), self.now);
        debug!(?decision, "decided");
        let calls_acs = matches!(
            decision,
            Decision::CreateIdentity | Decision::IssueTokens { .. }
        );
        // A restart the cache shows as due may be done already: the cache can lag behind the
        // status the restarting pass wrote.
        let restarts = self.restart_is_due(&self.status);
        // Without the finalizer, the patch that adds it before the ACS call proves the cache
        // current (it is guarded by resourceVersion); with it, a read does.
        if (calls_acs || restarts) && basis == Basis::Cached && self.has_finalizer() {
            let name = self.resource.name_any();
            let latest = self.kube("identity_get", self.api.get(&name)).await?;
            if latest.resource_version() != self.resource.resource_version() {
                return Ok(Applied::Stale(Box::new(latest)));
            }
        }
        match self.act(decision, classified, &seen).await {
            Ok(action) => Ok(Applied::Done(action)),
            Err(halt) => {
                let secret_holds_token = secret_state != SecretState::TokenMissing;
                self.halted(halt, secret_holds_token).await
            }
        }
    }

    /// How a pass that stopped short ends: a failure is recorded, a change decided again.
    async fn halted(&self, halt: Halt, secret_holds_token: bool) -> Result<Applied, Error> {
        match halt {
            Halt::Failed {
                failure,
                tokens_revoked,
            } => {
                let during = FailedDuring::Apply {
                    tokens_revoked,
                    secret_holds_token,
                };
                Ok(Applied::Done(self.record_failure(failure, during).await?))
            }
            Halt::Kube(error) => Err(error),
            Halt::Changed => Ok(Applied::Changed),
        }
    }

    /// The resource's Secret, and what the pass saw of it: read from the API server unless
    /// `known` says it is absent. Someone else's Secret of that name is a failure.
    async fn read_secret(&self, known: &Known) -> Result<(SecretSeen, Classified), Halt> {
        let secret_name = self.resource.secret_name();
        let existing = match known {
            Known::Absent => None,
            Known::Unchanged | Known::Unknown => {
                self.kube("secret_get", self.secrets.get_opt(&secret_name))
                    .await?
            }
        };
        let seen = match ownership(existing.as_ref(), &self.uid) {
            SecretOwnership::Foreign => {
                self.ctx.known_secrets.forget(&self.uid);
                return Err(Failure::SecretConflict { secret_name }.into());
            }
            SecretOwnership::Absent => SecretSeen::Absent,
            SecretOwnership::Ours => SecretSeen::Ours {
                resource_version: existing.as_ref().and_then(|s| s.resource_version()),
            },
        };
        let classified = classify(&self.resource, &self.status, existing.as_ref());
        match (classified.state, &seen, self.fingerprint(&self.status)) {
            (SecretState::Current, SecretSeen::Ours { resource_version }, Some(fingerprint)) => {
                let known = &self.ctx.known_secrets;
                known.verified(&self.uid, resource_version.as_deref(), fingerprint);
            }
            _ => self.ctx.known_secrets.forget(&self.uid),
        }
        Ok((seen, classified))
    }

    /// The fingerprint of the Secret `status` describes, if it describes one.
    fn fingerprint(&self, status: &CommunicationIdentityStatus) -> Option<u64> {
        let identity_id = status.identity_id.as_deref()?;
        let first = status.token_expires_on.as_ref()?.0;
        let entries = status.tokens.iter().map(|token| {
            let expires_on = token.expires_on.as_ref().map(|t| t.0);
            (token.name.as_str(), expires_on)
        });
        let generation = self.resource.metadata.generation;
        let secret_name = self.resource.secret_name();
        Some(fingerprint(
            generation,
            &secret_name,
            identity_id,
            first,
            entries,
        ))
    }

    /// What [`decide`] looks at. The Secret is not read while deleting.
    fn observed(
        &self,
        secret: SecretState,
        tokens: Vec<TokenSeen>,
        deletion: Option<Deletion>,
    ) -> Observed<'_> {
        Observed {
            generation: self.resource.metadata.generation,
            status: &self.status,
            adopt_identity_id: self.resource.spec.adopted_identity_id(),
            tokens,
            refresh_request: self.resource.pending_refresh_request(),
            revoke_request: self.resource.pending_revoke_request(),
            secret,
            deletion,
        }
    }

    /// Carries out a decision. A token issued earlier and not yet recorded stands in for a new
    /// ACS call while it answers what the resource asks for.
    async fn act(
        &self,
        decision: Decision,
        classified: Classified,
        seen: &SecretSeen,
    ) -> Result<Action, Halt> {
        let place = urgency(&decision, &self.status, self.now);
        match decision {
            Decision::CreateIdentity => {
                let entries = self.resource.spec.entries();
                let created = match self.held(entries[0].name) {
                    Some(token) => token,
                    None => {
                        let issued = self.create_identity(&entries[0], place).await?;
                        self.hold(&entries[0], issued, Issuance::Created)
                    }
                };
                // The identity's other tokens, in the same pass: one Secret write for all.
                let others: Vec<(String, IssueReason)> = entries[1..]
                    .iter()
                    .map(|entry| (entry.name.to_owned(), IssueReason::Initial))
                    .collect();
                let identity_id = created.issued.identity_id.clone();
                let mut tokens = vec![created];
                let more = self.issue_tokens(&identity_id, &others, false, true, place);
                tokens.extend(more.await?);
                self.record_issued(tokens, &classified, seen).await
            }
            Decision::IssueTokens {
                identity_id,
                tokens,
                revoke_first,
            } => {
                let tokens = self
                    .issue_tokens(&identity_id, &tokens, revoke_first, false, place)
                    .await?;
                self.record_issued(tokens, &classified, seen).await
            }
            Decision::RewriteSecret => {
                let desired = classified
                    .rewrite
                    .as_ref()
                    .expect("a rewrite decision comes with the Secret");
                let written = self
                    .write_secret(desired, seen, &classified.stale_keys)
                    .await?;
                if let Some(fingerprint) = self.fingerprint(&self.status) {
                    let known = &self.ctx.known_secrets;
                    known.verified(&self.uid, written.as_deref(), fingerprint);
                }
                let secret_name = self.resource.secret_name();
                info!(identity = ?self.status.identity_id, secret = %secret_name, "secret restored");
                let note = rewrite_note(&secret_name, &classified.stale_keys);
                self.publish(note).await;
                Ok(self.settle().await?)
            }
            Decision::WaitUntil(_) => Ok(self.settle().await?),
            Decision::CleanUp(_) => unreachable!("decided without a deletion"),
        }
    }

    /// The token held for entry `name`, if it can serve the resource now.
    fn held(&self, name: &str) -> Option<HeldToken> {
        self.ctx
            .held_tokens
            .usable(&self.uid, name, &self.resource, self.now)
    }

    fn hold(&self, entry: &TokenEntry<'_>, issued: Issued, issuance: Issuance) -> HeldToken {
        let token = HeldToken::new(&self.resource, entry, issued, self.now, issuance);
        self.ctx.held_tokens.hold(&self.uid, token.clone());
        token
    }

    /// Creates the identity with the first token of `entry`. The resource's UID is the
    /// identity's customId, so a create retried after a crash, or after a lost answer, returns
    /// the same identity.
    async fn create_identity(&self, entry: &TokenEntry<'_>, place: Place) -> Result<Issued, Halt> {
        let (acs, endpoint, connection) = self.acs_client(place).await?;
        // The finalizer and the create mark wait for the budget too: behind a burst a resource
        // writes only its place in the queue, and the rest once its create can go out (that
        // write also proves its cache current, which would otherwise take a read).
        acs.reserve(acs::Operation::CreateIdentity)
            .await
            .map_err(|error| self.failure_from_acs(&error, None))?;
        // Under a GA api-version (no customId) a create that an earlier attempt of this
        // resource sent and never saw answered may have made an identity nobody records.
        let unanswered_before = self.resource.create_attempted();
        self.prepare_for_acs(true, connection).await?;
        let created = self.create_in_acs(&acs, entry).await;
        let lost_now = matches!(&created, Err(error) if error.is_lost_answer());
        if !acs.creates_exactly_once() && (unanswered_before || lost_now) {
            self.note_possible_orphan(&acs).await;
        }
        let created = created.map_err(|error| self.failure_from_acs(&error, None))?;
        info!(identity = %created.id, existing = !created.created, "identity created");
        Ok(self.to_issued(created.id, created.token, endpoint)?)
    }

    async fn create_in_acs(
        &self,
        acs: &acs::AcsClient,
        entry: &TokenEntry<'_>,
    ) -> Result<acs::CreatedIdentity, acs::Error> {
        let minutes = entry.token_lifetime_minutes().unwrap_or_default() as u32;
        acs.create_identity_with_token(&self.uid, &entry.scope_names(), minutes)
            .await
    }

    /// A Warning that an identity may have been left in ACS without a resource recording it
    /// (the acs client counts the lost answers in a metric).
    async fn note_possible_orphan(&self, acs: &acs::AcsClient) {
        let text = format!(
            "ACS api-version {} has no customId, so creates are not exactly-once: an earlier \
             create of this resource got no answer (or was interrupted) and may have left an \
             identity in ACS that no resource records; find identities issued no token in the \
             ACS resource and delete them",
            acs.api_version()
        );
        self.publish(Note::warning(reason::POSSIBLE_ORPHAN_IDENTITY, text))
            .await;
    }

    /// Issues a new token of `identity_id` for each entry in `wanted`, revoking all its tokens
    /// first when asked to; tokens held from an earlier attempt stand in for their ACS calls.
    /// `just_created`: this pass created the identity, so the finalizers are in place already.
    /// Otherwise an identity not yet recorded in status is being adopted: it is checked first.
    async fn issue_tokens(
        &self,
        identity_id: &str,
        wanted: &[(String, IssueReason)],
        revoke_first: bool,
        just_created: bool,
        place: Place,
    ) -> Result<Vec<HeldToken>, Halt> {
        let held: Vec<Option<HeldToken>> = wanted.iter().map(|(name, _)| self.held(name)).collect();
        if held.iter().all(Option::is_some) {
            return Ok(held.into_iter().flatten().collect());
        }
        let (acs, endpoint, connection) = self.acs_client(place).await?;
        if !just_created {
            if self.status.identity_id.is_none() {
                self.check_adoption(&acs, identity_id).await?;
            }
            self.prepare_for_acs(false, connection).await?;
        }
        // A token held from an earlier attempt was issued after the revoke that attempt made.
        let revoke = revoke_first && held.iter().all(Option::is_none);
        if revoke {
            acs.revoke_tokens(identity_id)
                .await
                .map_err(|error| self.failure_from_acs(&error, Some(identity_id)))?;
            info!(identity = %identity_id, "all tokens revoked");
            let text = format!("Revoked every access token of ACS identity {identity_id}");
            self.publish(Note::normal(reason::TOKENS_REVOKED, text))
                .await;
        }
        let after_revoke = |failure| Halt::Failed {
            failure,
            tokens_revoked: revoke,
        };
        let entries = self.resource.spec.entries();
        let mut tokens = Vec::with_capacity(wanted.len());
        for ((name, reason), held) in wanted.iter().zip(held) {
            if let Some(token) = held {
                tokens.push(token);
                continue;
            }
            let Some(entry) = entries.iter().find(|entry| entry.name == name) else {
                continue;
            };
            let minutes = entry.token_lifetime_minutes().unwrap_or_default() as u32;
            let token = acs
                .issue_token(identity_id, &entry.scope_names(), minutes)
                .await
                .map_err(|error| after_revoke(self.failure_from_acs(&error, Some(identity_id))))?;
            let issued = self
                .to_issued(identity_id.to_owned(), token, endpoint.clone())
                .map_err(after_revoke)?;
            let issuance = Issuance::Issued {
                reason: *reason,
                revoked: revoke_first,
            };
            tokens.push(self.hold(entry, issued, issuance));
        }
        Ok(tokens)
    }

    /// An identity is adopted only if it exists and no other resource of this cluster holds it.
    async fn check_adoption(&self, acs: &acs::AcsClient, identity_id: &str) -> Result<(), Failure> {
        // Adoption is rare, so the cached resources are unpacked for it one at a time. One that
        // cannot be read back (never expected) might hold the identity: it counts as holding it.
        let known = self.ctx.identities.state();
        let mut unreadable = None;
        let others = known.iter().map_while(|cached| match cached.unpack() {
            Ok(other) => Some(other),
            Err(_) => {
                unreadable = Some(cached.clone());
                None
            }
        });
        let holder = claimed_by(identity_id, &self.resource, others)
            .map(|holder| (holder.namespace(), holder.name_any()))
            .or_else(|| unreadable.map(|holder| (holder.namespace(), holder.name_any())));
        if let Some((namespace, name)) = holder {
            return Err(Failure::IdentityInUse {
                identity_id: identity_id.to_owned(),
                holder: format!("{}/{name}", namespace.unwrap_or_default()),
            });
        }
        // Under a GA api-version there is no GET: the token issue that follows tells a missing
        // identity by its 404.
        acs.get_identity(identity_id)
            .await
            .map(drop)
            .map_err(|error| self.failure_from_acs(&error, Some(identity_id)))
    }

    /// The ACS client for the connection string, its requests queued in `place` (and this
    /// resource called back when its turn comes), its endpoint, and its own connection Secret
    /// (spec.connectionSecretRef) when it was read afresh (to hold before the first ACS call).
    async fn acs_client(
        &self,
        (class, deadline): Place,
    ) -> Result<(acs::AcsClient, String, Option<Arc<Secret>>), Halt> {
        let source = self.connection_source().await?;
        let (client, endpoint, own) = match &source.auth {
            SourceAuth::AccessKey { namespace, secret } => {
                self.key_client((namespace, secret), &source).await?
            }
            SourceAuth::WorkloadIdentity(identity) => {
                let via = source.via.as_deref().unwrap_or_default();
                let acs = (self.ctx).workload_identity_client(identity, source.api_version, via)?;
                (acs, identity.endpoint.clone(), None)
            }
        };
        let ticket = Ticket {
            class,
            deadline,
            tenant: self.namespace.clone(),
            key: self.uid.clone(),
            asked_at: self.now,
        };
        let client = client.with_ticket(ticket, self.ctx.turns.of(&self.resource));
        Ok((client, endpoint, own))
    }

    /// The client for the connection string in `secret` of `namespace` (named by the
    /// connection `via`), its endpoint, and the Secret when it is the resource's own
    /// (spec.connectionSecretRef) and was read afresh.
    async fn key_client(
        &self,
        (namespace, secret_ref): (&str, &ConnectionSecretRef),
        source: &ConnectionSource,
    ) -> Result<(acs::AcsClient, String, Option<Arc<Secret>>), Halt> {
        let (name, via) = (&secret_ref.name, source.via.as_ref());
        let recent = &self.ctx.connection_secrets;
        let remembered = recent.get(namespace, name);
        let read_afresh = remembered.is_none();
        let secret = match remembered {
            Some(secret) => Some(secret),
            None => {
                let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), namespace);
                let read = self
                    .kube("connection_secret_get", secrets.get_opt(name))
                    .await?
                    .map(Arc::new);
                // Held already (or a connection's, which is never held), it serves the next
                // passes too: a burst waiting in the queue never gets as far as holding it,
                // and would read it once each.
                let shared = |secret: &&Arc<Secret>| via.is_some() || holds_connection(secret);
                if let Some(secret) = read.as_ref().filter(shared) {
                    recent.remember(namespace, secret.clone());
                }
                read
            }
        };
        let (client, endpoint) =
            match self
                .ctx
                .acs
                .client_for_key((namespace, secret_ref), source, secret.as_deref())
            {
                Ok(client) => client,
                Err(failure) => {
                    recent.forget(namespace, name);
                    return Err(failure.into());
                }
            };
        let own = via.is_none() && read_afresh;
        Ok((client, endpoint, secret.filter(|_| own)))
    }

    /// Where the connection string is: the resource's own Secret, or the one its connection
    /// names (read afresh: a connection changed or deleted takes effect on the next ACS call).
    async fn connection_source(&self) -> Result<ConnectionSource, Halt> {
        let reference = match self.resource.spec.connection() {
            Ok(Connection::Secret(secret)) => {
                return Ok(ConnectionSource {
                    api_version: acs::ApiVersionPolicy::default(),
                    auth: SourceAuth::AccessKey {
                        namespace: self.namespace.clone(),
                        secret: secret.clone(),
                    },
                    via: None,
                });
            }
            Ok(Connection::Named(reference)) => reference,
            Err(invalid) => return Err(Failure::InvalidSpec(invalid).into()),
        };
        let client = self.ctx.client.clone();
        let not_found = || Failure::ConnectionNotFound {
            connection: connection::label(reference.kind, &reference.name),
        };
        match reference.kind {
            ConnectionKind::AcsConnection => {
                let api: Api<AcsConnection> = Api::namespaced(client, &self.namespace);
                let found = self.kube("connection_get", api.get_opt(&reference.name));
                Ok(found.await?.ok_or_else(not_found)?.source()?)
            }
            ConnectionKind::ClusterAcsConnection => {
                let api: Api<ClusterAcsConnection> = Api::all(client.clone());
                let found = self.kube("connection_get", api.get_opt(&reference.name));
                let connection = found.await?.ok_or_else(not_found)?;
                let labels = match connection.selects_by_labels() {
                    true => {
                        let namespaces: Api<Namespace> = Api::all(client);
                        let read = self.kube("namespace_get", namespaces.get(&self.namespace));
                        read.await?.metadata.labels.unwrap_or_default()
                    }
                    false => BTreeMap::new(),
                };
                let operator_namespace = self.ctx.acs.operator_namespace();
                Ok(connection.source_for(&self.namespace, &labels, operator_namespace)?)
            }
        }
    }

    /// Before an ACS call that leaves something in ACS: this resource's finalizer (so that
    /// nothing in ACS outlives it without cleanup) and, before a create, the mark that one was
    /// sent, in one patch guarded by resourceVersion; then the connection Secret's finalizer.
    async fn prepare_for_acs(
        &self,
        create: bool,
        connection: Option<Arc<Secret>>,
    ) -> Result<(), Halt> {
        let mark = create && !self.resource.create_attempted();
        if !self.has_finalizer() || mark {
            let mut finalizers = self.resource.finalizers().to_vec();
            if !self.has_finalizer() {
                finalizers.push(FINALIZER.to_owned());
            }
            let annotations = mark.then(|| json!({ CREATE_ATTEMPTED_ANNOTATION: "true" }));
            let metrics = &self.ctx.metrics;
            match patch_finalizers(metrics, &self.api, &*self.resource, finalizers, annotations)
                .await
            {
                Ok(patched) => self.ctx.own_writes.wrote(&self.uid, &patched),
                Err(Error::Kube {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 409 => return Err(Halt::Changed),
                Err(error) => return Err(error.into()),
            }
        }
        if let Some(secret) = connection {
            self.hold_connection_secret(secret).await?;
        }
        Ok(())
    }

    fn has_finalizer(&self) -> bool {
        self.resource.finalizers().iter().any(|f| f == FINALIZER)
    }

    /// Holds the connection Secret with a finalizer while this resource needs it. Only once its
    /// connection string was found usable: the finalizer must never pin a Secret that is not a
    /// connection Secret (a ServiceAccount token, another operator's Secret).
    async fn hold_connection_secret(&self, secret: Arc<Secret>) -> Result<(), Error> {
        if secret.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let (recent, name) = (&self.ctx.connection_secrets, secret.name_any());
        if holds_connection(&secret) {
            recent.remember(&self.namespace, secret);
            return Ok(());
        }
        // Behind the gate (or after its patience), a pass of this process that held it
        // meanwhile left it in `recent`.
        let _gate = recent.hold_gate(&self.namespace, &name).await;
        let held = match recent.get(&self.namespace, &name) {
            Some(held) if holds_connection(&held) => held,
            _ => Arc::new(self.add_connection_finalizer(&secret).await?),
        };
        recent.remember(&self.namespace, held);
        Ok(())
    }

    async fn add_connection_finalizer(&self, secret: &Secret) -> Result<Secret, Error> {
        match self
            .add_finalizer(&self.secrets, secret, CONNECTION_SECRET_FINALIZER)
            .await
        {
            // Changed since it was read (another process, or its owner, wrote it): read once
            // more instead of failing into a 5-s retry.
            Err(Error::Kube {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 409 => {
                let name = secret.name_any();
                let read = self.secrets.get(&name);
                let fresh = self.kube("connection_secret_get", read).await?;
                match holds_connection(&fresh) {
                    true => Ok(fresh),
                    false => {
                        self.add_finalizer(&self.secrets, &fresh, CONNECTION_SECRET_FINALIZER)
                            .await
                    }
                }
            }
            written => written,
        }
    }

    /// Writes the Secret with the new tokens (and the others as they were), then the status
    /// that describes them; the new tokens stay held until both are written.
    async fn record_issued(
        &self,
        tokens: Vec<HeldToken>,
        classified: &Classified,
        seen: &SecretSeen,
    ) -> Result<Action, Halt> {
        let first = &tokens[0].issued;
        let mut delivered: Vec<Delivered> = classified
            .carried
            .iter()
            .filter(|carried| tokens.iter().all(|token| token.name != carried.name))
            .cloned()
            .collect();
        delivered.extend(tokens.iter().map(|token| Delivered {
            name: token.name.clone(),
            token: token.issued.token.clone(),
            expires_on: token.issued.expires_on,
        }));
        let secret = render_secret(
            &self.resource,
            &first.identity_id,
            &first.endpoint,
            &delivered,
        )
        .map_err(|_| Error::MissingMetadata("uid"))?;
        let written = self
            .write_secret(&secret, seen, &classified.stale_keys)
            .await?;
        let (status, plans) = after_issue(&self.status, &self.resource, &tokens, self.now);
        if let Some(fingerprint) = self.fingerprint(&status) {
            let known = &self.ctx.known_secrets;
            known.verified(&self.uid, written.as_deref(), fingerprint);
        }
        self.patch_status(&status).await?;
        self.ctx.held_tokens.release(&self.uid);
        let adopted =
            self.status.identity_id.is_none() && self.resource.spec.adopted_identity_id().is_some();
        let mut notes = Vec::new();
        for token in &tokens {
            let why = match token.issuance {
                Issuance::Created => None,
                Issuance::Issued { reason, .. } => Some(reason),
            };
            let issued = &token.issued;
            info!(identity = %issued.identity_id, entry = %token.name, ?why, expires_on = %issued.expires_on, "token issued");
            if let Some((_, plan)) = plans.iter().find(|(name, _)| *name == token.name) {
                notes.extend(issue_notes(&self.resource, token, adopted, plan));
            }
        }
        for note in merged(notes) {
            self.publish(note).await;
        }
        let status = self.restart_targets_if_due(status).await?;
        Ok(self.requeue_for(&status))
    }

    /// Nothing to do in ACS: bring status up to date and wait for the next refresh.
    async fn settle(&self) -> Result<Action, Error> {
        let status = settled(&self.status, &self.resource, self.now);
        if status != self.status {
            self.patch_status(&status).await?;
        }
        let status = self.restart_targets_if_due(status).await?;
        Ok(self.requeue_for(&status))
    }

    /// When the restart `status` holds pending is due, if one is (and there is a target).
    fn restart_due_at(&self, status: &CommunicationIdentityStatus) -> Option<Timestamp> {
        if self.resource.spec.rollout_restart_targets.is_empty() {
            return None;
        }
        let interval = self.resource.spec.min_restart_interval();
        restart_due(
            status.rollout_restart.as_ref(),
            interval.unwrap_or(DEFAULT_MIN_RESTART_INTERVAL),
        )
    }

    fn restart_is_due(&self, status: &CommunicationIdentityStatus) -> bool {
        self.restart_due_at(status).is_some_and(|at| at <= self.now)
    }

    /// The next pass: at the next refresh, or the pending restart if that comes first.
    fn requeue_for(&self, status: &CommunicationIdentityStatus) -> Action {
        let restart = self.restart_due_at(status);
        let next = [status.next_refresh_time.as_ref().map(|t| t.0), restart]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = next else {
            return requeue(KUBE_ERROR_RETRY);
        };
        let wait = wait_until(self.now, at).clamp(MIN_REQUEUE, MAX_REQUEUE);
        let at = self.now + wait;
        if self.ctx.wakeups.set(&self.resource, at) {
            Action::await_change()
        } else {
            requeue(wait)
        }
    }

    /// Restarts spec.rolloutRestartTargets once a restart they are owed is due, then records it
    /// in `status`. A target that is missing or may not be patched is a Warning Event and a
    /// status entry; the tokens are delivered already.
    async fn restart_targets_if_due(
        &self,
        mut status: CommunicationIdentityStatus,
    ) -> Result<CommunicationIdentityStatus, Error> {
        if !self.restart_is_due(&status) {
            return Ok(status);
        }
        let secret_name = self.resource.secret_name();
        let mut outcomes = Vec::new();
        for target in &self.resource.spec.rollout_restart_targets {
            let outcome = self.restart_target(target).await?;
            let note = restart::note(target, &outcome, &secret_name, &self.namespace);
            info!(kind = target.kind.as_str(), name = %target.name, ?outcome, "restart target");
            self.publish(note).await;
            outcomes.push((target.clone(), outcome));
        }
        let restarted = after_restart(&outcomes, &secret_name, &self.namespace, self.now);
        status.rollout_restart = Some(restarted);
        self.patch_status(&status).await?;
        Ok(status)
    }

    /// Restarts one workload as `kubectl rollout restart` does: a new pod-template annotation.
    async fn restart_target(&self, target: &RestartTarget) -> Result<RestartOutcome, Error> {
        let resource = match target.kind {
            WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
            WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
            WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.ctx.client.clone(), &self.namespace, &resource);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let patch = Patch::Strategic(restart_patch(self.now));
        let request = api.patch(&target.name, &params, &patch);
        match self.kube("workload_restart", request).await {
            Ok(_) => Ok(RestartOutcome::Restarted),
            Err(Error::Kube {
                source: kube::Error::Api(status),
                ..
            }) => Ok(match status.code {
                404 => RestartOutcome::NotFound,
                403 => RestartOutcome::Forbidden,
                code if (400..500).contains(&code) && code != 429 => RestartOutcome::Refused(
                    bounded(format!("{code} {}: {}", status.reason, status.message)),
                ),
                _ => {
                    return Err(Error::Kube {
                        call: "workload_restart",
                        source: kube::Error::Api(status),
                    });
                }
            }),
            Err(error) => Err(error),
        }
    }

    /// Records a failure: status (with the backoff), a Warning event and a metric; a wait in
    /// the ACS queue only in the condition.
    async fn record_failure(
        &self,
        failure: Failure,
        during: FailedDuring,
    ) -> Result<Action, Error> {
        let (status, delay) =
            after_failure(&self.status, &self.resource, &failure, during, self.now);
        if let Failure::WaitingForAcs {
            since,
            circuit_open: false,
        } = failure
        {
            // Waiting for budget is no failure: said once in the condition (the time it waits
            // since does not change while it waits), without an Event, as a burst queues
            // thousands.
            if status != self.status {
                self.patch_status(&status).await?;
            }
            debug!(%since, "waiting in the ACS queue");
            return Ok(requeue(delay));
        }
        self.patch_status(&status).await?;
        let message = failure.message();
        warn!(reason = failure.reason(), %message, retry_in = ?delay, "reconcile failed");
        self.ctx.metrics.failure(failure.reason());
        self.publish(Note::warning(failure.reason(), message)).await;
        Ok(requeue(delay))
    }

    /// Deletion: clean up in ACS as decided, then release the resource and, when it was the
    /// last user, the connection Secret.
    async fn clean_up(&self) -> Result<Action, Error> {
        let policy = self.resource.spec.effective_deletion_policy();
        let deletion = Deletion {
            policy,
            skip_cleanup: self.resource.skip_cleanup_requested(),
            create_attempted: self.resource.create_attempted(),
        };
        let decision = decide(
            &self.observed(SecretState::TokenMissing, Vec::new(), Some(deletion)),
            self.now,
        );
        let Decision::CleanUp(cleanup) = decision else {
            unreachable!("a deletion decides a cleanup")
        };
        debug!(?cleanup, "decided");
        match self.clean_up_in_acs(cleanup).await {
            Ok(()) => {}
            Err(Halt::Failed { failure, .. }) => {
                return self
                    .record_failure(failure, FailedDuring::Cleanup(policy))
                    .await;
            }
            Err(Halt::Kube(error)) => return Err(error),
            Err(Halt::Changed) => return Ok(requeue(MIN_REQUEUE)),
        }
        self.ctx.held_tokens.release(&self.uid);
        self.remove_finalizer(&self.api, &self.resource, FINALIZER)
            .await?;
        // A Secret a connection names is that connection's to manage.
        if let Some(reference) = &self.resource.spec.connection_secret_ref {
            self.release_connection_secret(&reference.name).await?;
        }
        Ok(Action::await_change())
    }

    async fn clean_up_in_acs(&self, cleanup: Cleanup) -> Result<(), Halt> {
        let (delete, recorded) = match cleanup {
            Cleanup::NothingCreated => return Ok(()),
            Cleanup::Skip => {
                let left = self
                    .status
                    .identity_id
                    .as_deref()
                    .unwrap_or("(none recorded)");
                let text = format!(
                    "Released without cleanup in ACS (skip-cleanup annotation); identity {left} is left in ACS"
                );
                self.publish(Note::warning(reason::CLEANUP_SKIPPED, text))
                    .await;
                return Ok(());
            }
            Cleanup::Retain { identity_id } => {
                if let Some(identity_id) = identity_id {
                    let text =
                        format!("Left ACS identity {identity_id} in place (deletionPolicy Retain)");
                    self.publish(Note::normal(reason::IDENTITY_RETAINED, text))
                        .await;
                }
                return Ok(());
            }
            Cleanup::InAcs {
                delete,
                identity_id,
            } => (delete, identity_id),
        };
        let (acs, _, _) = self.acs_client((Class::New, self.now)).await?;
        let identity_id = match recorded {
            Some(identity_id) => identity_id,
            // Without customId a create cannot find the one whose answer was lost: it would
            // make another identity. What the first may have left is reported instead.
            None if !acs.creates_exactly_once() => {
                self.note_possible_orphan(&acs).await;
                return Ok(());
            }
            None => {
                let created = self
                    .create_in_acs(&acs, &self.resource.spec.entries()[0])
                    .await
                    .map_err(|error| self.failure_from_acs(&error, None))?;
                info!(identity = %created.id, "learned the identity of a create whose answer was lost");
                created.id
            }
        };
        let (result, event_reason, done) = match delete {
            true => (
                acs.delete_identity(&identity_id).await,
                reason::IDENTITY_DELETED,
                "Deleted ACS identity",
            ),
            false => (
                acs.revoke_tokens(&identity_id).await,
                reason::TOKENS_REVOKED,
                "Revoked every access token of ACS identity",
            ),
        };
        match result {
            // Already gone counts as done.
            Ok(()) | Err(acs::Error::NotFound(_)) => {
                info!(identity = %identity_id, delete, "cleaned up in ACS");
                let text = format!("{done} {identity_id}");
                self.publish(Note::normal(event_reason, text)).await;
                Ok(())
            }
            Err(error) => Err(self.failure_from_acs(&error, Some(&identity_id)).into()),
        }
    }

    /// Drops the connection Secret's finalizer once no other CommunicationIdentity still
    /// holding its own finalizer refers to it. Runs after this resource dropped its finalizer.
    /// The cache answers while another user lives on; otherwise the API server is asked
    /// (filtered by the Secret's name), so of two resources finishing at once the later one
    /// always sees the other gone.
    async fn release_connection_secret(&self, secret_name: &str) -> Result<(), Error> {
        let uses_it = |other: &ObjectMeta, reference: Option<&ConnectionSecretRef>| {
            other.uid.as_deref() != Some(self.uid.as_str())
                && reference.is_some_and(|reference| reference.name == secret_name)
                && other.finalizers.iter().flatten().any(|f| f == FINALIZER)
        };
        let live_user = self.ctx.identities.state().iter().any(|other| {
            other.namespace().as_deref() == Some(self.namespace.as_str())
                && other.meta().deletion_timestamp.is_none()
                && uses_it(other.meta(), other.connection_secret_ref())
        });
        let listed_user = |other: &CommunicationIdentity| {
            uses_it(&other.metadata, other.spec.connection_secret_ref.as_ref())
        };
        if live_user || self.any_user_left(secret_name, listed_user).await? {
            return Ok(());
        }
        let secret = self
            .kube("connection_secret_get", self.secrets.get_opt(secret_name))
            .await?;
        if let Some(secret) = secret {
            self.remove_finalizer(&self.secrets, &secret, CONNECTION_SECRET_FINALIZER)
                .await?;
        }
        self.ctx
            .connection_secrets
            .forget(&self.namespace, secret_name);
        self.ctx.acs.forget(&self.namespace, secret_name);
        Ok(())
    }

    /// Whether the API server knows another user of the connection Secret, page by page.
    async fn any_user_left(
        &self,
        secret_name: &str,
        uses_it: impl Fn(&CommunicationIdentity) -> bool,
    ) -> Result<bool, Error> {
        let selector = format!("spec.connectionSecretRef.name={secret_name}");
        let mut params = ListParams::default().fields(&selector).limit(50);
        loop {
            let page = self.kube("identity_list", self.api.list(&params)).await?;
            if page.items.iter().any(&uses_it) {
                return Ok(true);
            }
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => return Ok(false),
            }
        }
    }

    /// Creates the Secret if it was absent, or writes it with the resourceVersion it had when
    /// seen as ours: a Secret someone else created or changed in the meantime is never
    /// overwritten (the pass decides again instead). A refusal by the API server is a failure
    /// the user sees, with the token held for the retry. Returns the resourceVersion written.
    ///
    /// `stale_keys` (keys of tokens the spec no longer asks for) are then taken out with a
    /// merge patch guarded by the resourceVersion just written: server-side apply would leave
    /// them, as the create that first wrote them owns them too.
    async fn write_secret(
        &self,
        secret: &Secret,
        seen: &SecretSeen,
        stale_keys: &[String],
    ) -> Result<Option<String>, Halt> {
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        let written = match seen {
            SecretSeen::Absent => {
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PostParams::default()
                };
                let request = self.secrets.create(&params, secret);
                self.kube("secret_create", request).await
            }
            SecretSeen::Ours { resource_version } => {
                let mut manifest = serde_json::to_value(secret).expect("a Secret serialises");
                manifest["apiVersion"] = json!("v1");
                manifest["kind"] = json!("Secret");
                // A precondition: the apply fails (409) unless the Secret is still as seen.
                manifest["metadata"]["resourceVersion"] = json!(resource_version);
                let params = PatchParams::apply(FIELD_MANAGER).force();
                let patch = Patch::Apply(manifest);
                let request = self.secrets.patch(name, &params, &patch);
                self.kube("secret_apply", request).await
            }
        };
        let written = match written {
            Ok(written) if !stale_keys.is_empty() => {
                let removed: serde_json::Map<String, serde_json::Value> = stale_keys
                    .iter()
                    .map(|key| (key.clone(), serde_json::Value::Null))
                    .collect();
                let patch = Patch::Merge(json!({
                    "metadata": { "resourceVersion": written.resource_version() },
                    "data": removed,
                }));
                let params = PatchParams::default();
                let request = self.secrets.patch(name, &params, &patch);
                self.kube("secret_keys_remove", request).await
            }
            written => written,
        };
        if written.is_err() {
            self.ctx.known_secrets.forget(&self.uid);
        }
        match written {
            Ok(written) => Ok(written.resource_version()),
            Err(Error::Kube {
                call,
                source: kube::Error::Api(status),
            }) if matches!(status.code, 404 | 409) => {
                debug!(
                    call,
                    code = status.code,
                    "the Secret changed under the write"
                );
                Err(Halt::Changed)
            }
            Err(Error::Kube {
                source: kube::Error::Api(status),
                ..
            }) if (400..500).contains(&status.code) && status.code != 429 => {
                Err(Failure::SecretWriteFailed {
                    secret_name: name.to_owned(),
                    detail: format!("{} {}: {}", status.code, status.reason, status.message),
                }
                .into())
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn patch_status(&self, status: &CommunicationIdentityStatus) -> Result<(), Error> {
        let patch = json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let name = self.resource.name_any();
        let patch = Patch::Apply(patch);
        let request = self.api.patch_status(&name, &params, &patch);
        let patched = self.kube("status_patch", request).await?;
        self.ctx.own_writes.wrote(&self.uid, &patched);
        Ok(())
    }

    async fn publish(&self, note: Note) {
        let event = Event {
            type_: note.type_,
            reason: note.reason.to_owned(),
            note: Some(bounded(note.text)),
            action: note.reason.to_owned(),
            secondary: None,
        };
        let reference = self.resource.object_ref(&());
        let published = self
            .kube(
                "event_publish",
                self.ctx
                    .events
                    .recorder(note.type_)
                    .publish(&event, &reference),
            )
            .await;
        if let Err(error) = published {
            // An event is worth a log line, not a failed reconcile.
            warn!(%error, reason = note.reason, "could not publish event");
        }
    }

    /// A token as the rest of the pass uses it, checked: an `expiresOn` that is unreadable,
    /// already past or more than a day ahead, or an identity id no ACS would mint, is an
    /// unexpected answer retried with backoff. `expiresOn` is truncated to whole seconds, the
    /// precision status keeps, so the Secret and status always agree.
    fn to_issued(
        &self,
        identity_id: String,
        token: acs::wire::AccessToken,
        endpoint: String,
    ) -> Result<Issued, Failure> {
        let unexpected = |detail: String| Failure::AcsUnavailable { detail };
        if identity_id.len() > MAX_IDENTITY_ID_LEN || identity_id.chars().any(char::is_control) {
            return Err(unexpected(format!(
                "ACS returned an identity id that is not one ({} bytes)",
                identity_id.len()
            )));
        }
        let expires_on = acs::wire::parse_expires_on(&token.expires_on)
            .and_then(|t| Timestamp::from_second(t.as_second()).ok())
            .ok_or_else(|| {
                unexpected(format!(
                    "ACS returned an unreadable expiresOn for identity {identity_id}"
                ))
            })?;
        check_expiry(expires_on, self.now).map_err(unexpected)?;
        Ok(Issued {
            identity_id,
            token: token.token,
            expires_on,
            endpoint,
        })
    }

    fn failure_from_acs(&self, error: &acs::Error, identity_id: Option<&str>) -> Failure {
        let (credentials, connection) = match self.resource.spec.connection() {
            Ok(Connection::Secret(secret)) => {
                let secret = format!("Secret {:?}", secret.name);
                (secret.clone(), secret)
            }
            Ok(Connection::Named(via)) => {
                let connection = connection::label(via.kind, &via.name);
                (format!("the Secret {connection} names"), connection)
            }
            Err(_) => (
                "the connection Secret".to_owned(),
                "the connection".to_owned(),
            ),
        };
        Failure::from_acs(error, &credentials, &connection, identity_id)
    }

    async fn kube<T>(
        &self,
        call: &'static str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        kube_call(&self.ctx.metrics, call, request).await
    }

    /// Adds `finalizer` with a merge patch guarded by resourceVersion: a concurrent change makes
    /// it fail (and the reconcile retry) instead of dropping someone else's finalizer. Returns
    /// the object as patched.
    async fn add_finalizer<K>(&self, api: &Api<K>, object: &K, finalizer: &str) -> Result<K, Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut finalizers = object.meta().finalizers.clone().unwrap_or_default();
        finalizers.push(finalizer.to_owned());
        patch_finalizers(&self.ctx.metrics, api, object, finalizers, None).await
    }

    async fn remove_finalizer<K>(
        &self,
        api: &Api<K>,
        object: &K,
        finalizer: &str,
    ) -> Result<(), Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let before = object.meta().finalizers.clone().unwrap_or_default();
        let finalizers: Vec<String> = before.iter().filter(|f| *f != finalizer).cloned().collect();
        if finalizers.len() == before.len() {
            return Ok(());
        }
        patch_finalizers(&self.ctx.metrics, api, object, finalizers, None)
            .await
            .map(drop)
    }
}

/// Longer than any communication user id ACS mints (`8:acs:<guid>_<suffix>`), with room.
const MAX_IDENTITY_ID_LEN: usize = 256;
