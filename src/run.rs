//! `acs-identity-operator run`: serves the operations endpoints, waits for the leader election
//! Lease when asked to, and runs the controller until a signal or the loss of the Lease.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::{Controller, WatchStreamExt, controller, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::net::TcpListener;
use tokio::task::JoinError;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

/// Reconciles running at once. ACS allows ~33 creates or issues per second per resource, so 64
/// in flight keep that pace with room to spare.
const RECONCILE_CONCURRENCY: u16 = 64;

use crate::admin::{self, Health, Phase};
use crate::connection::{AcsConnection, ClusterAcsConnection};
use crate::connection_status::{self, ConnectionResource};
use crate::context::{AcsSettings, Context, Turns};
use crate::crd::{
    CREATE_ATTEMPTED_ANNOTATION, CommunicationIdentity, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    OPERATOR_ANNOTATION_PREFIX,
};
use crate::kube_call::{Error, KUBE_CALL_TIMEOUT};
use crate::launch::METRICS_LINE;
use crate::leader::{LeaderElection, LeaseSettings};
use crate::metrics::Metrics;
use crate::reconcile::{error_policy, reconcile};

/// What `run` needs from the command line.
pub struct RunConfig {
    /// Watch only this namespace (the Helm chart's namespaced mode); all namespaces otherwise.
    pub watch_namespace: Option<String>,
    pub acs: AcsSettings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Run the controller only while holding this Lease; always when `None`.
    pub leader_election: Option<LeaseSettings>,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let kube_config = kube::Config::infer().await.map_err(|error| {
        anyhow::anyhow!(
            "cannot reach Kubernetes: {error}; set KUBECONFIG or run inside the cluster"
        )
    })?;
    // Watches keep the client's default read timeout (they are quiet for minutes); every other
    // request goes through a client that gives up on a stalled API server.
    let watch_client = Client::try_from(kube_config.clone())?;
    let mut call_config = kube_config;
    call_config.read_timeout = Some(KUBE_CALL_TIMEOUT);
    call_config.write_timeout = Some(KUBE_CALL_TIMEOUT);
    call_config.connect_timeout = Some(KUBE_CALL_TIMEOUT);
    let client = Client::try_from(call_config)?;
    let metrics = Arc::new(Metrics::default());
    let election = config
        .leader_election
        .map(|settings| LeaderElection::new(client.clone(), settings));
    let health = Arc::new(Health::new(
        metrics.clone(),
        match election {
            Some(_) => Phase::Starting,
            None => Phase::Active {
                caches_synced: false,
            },
        },
    ));
    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot listen on --metrics-addr {}: {error}",
                config.metrics_addr
            )
        })?;
    // Tests that ask for port 0 read the port from this line (`launch::metrics_addr`).
    let serving = listener.local_addr()?;
    info!("{METRICS_LINE}{serving}");
    // Spawned: it serves while this replica stands by as well as while it leads.
    let mut admin = tokio::spawn(admin::serve(listener, health.clone()));

    let acquired_at = match &election {
        Some(election) => tokio::select! {
            acquired_at = election.acquire(&health) => acquired_at,
            () = shutdown_signal() => {
                info!("stopped while standing by");
                return Ok(());
            }
            ended = &mut admin => return Err(admin_ended(ended)),
        },
        None => Instant::now(),
    };
    health.set_phase(Phase::Active {
        caches_synced: false,
    });

    let reporter = Reporter {
        controller: "acs-identity-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let (identities, secrets): (Api<CommunicationIdentity>, Api<PartialObjectMeta<Secret>>) =
        match &config.watch_namespace {
            Some(namespace) => (
                Api::namespaced(watch_client.clone(), namespace),
                Api::namespaced(watch_client.clone(), namespace),
            ),
            None => (
                Api::all(watch_client.clone()),
                Api::all(watch_client.clone()),
            ),
        };
    let (store, writer) = reflector::store();
    let (turns, turn_triggers) = Turns::new();
    let context = Arc::new(Context::new(
        client,
        reporter,
        config.acs,
        metrics,
        store.clone(),
        turns,
    ));
    info!(
        namespace = config.watch_namespace.as_deref().unwrap_or("(all)"),
        "starting controller"
    );

    // Only the Secrets the operator labels are watched, as metadata only and without a cache,
    // so memory does not grow with the cluster's Secret count; each event is noted in
    // `known_secrets` (a resourceVersion per Secret) before it triggers its owner's pass.
    let owned_secrets =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    let secret_events = {
        let context = context.clone();
        watcher(secrets, owned_secrets)
            .default_backoff()
            .map_ok(move |event| {
                context.known_secrets.observe(&event);
                event
            })
            .touched_objects()
    };
    // The cache keeps CommunicationIdentities without what the reconcile never reads (kube.rs's
    // "pruning fields" advice; the stream API it needs is behind kube's unstable-runtime flag).
    // Each event is noted in `own_writes` once the cache holds it.
    // Each identity event also reconciles the connection it names (its count, its finalizer).
    let (namespaced_connections, namespaced_triggers) = futures::channel::mpsc::unbounded();
    let (cluster_connections, cluster_triggers) = futures::channel::mpsc::unbounded();
    let identity_events = {
        let context = context.clone();
        watcher(identities, watcher::Config::default())
            .default_backoff()
            .modify(trim_for_cache)
            .reflect(writer)
            .map_ok(move |event| {
                context.own_writes.observe(&event);
                if let watcher::Event::Apply(identity)
                | watcher::Event::InitApply(identity)
                | watcher::Event::Delete(identity) = &event
                {
                    if let Some(named) = AcsConnection::named_by(identity) {
                        let _ = namespaced_connections.unbounded_send(named);
                    }
                    if let Some(named) = ClusterAcsConnection::named_by(identity) {
                        let _ = cluster_connections.unbounded_send(named);
                    }
                }
                if let watcher::Event::Delete(gone) = &event {
                    // Its places in the ACS queues would be granted to nobody, and its
                    // refresh is not due any more.
                    if let Some(uid) = gone.uid() {
                        acs::RateLimits::withdraw_everywhere(&uid);
                        context.wakeups.cancel(&uid);
                    }
                }
                event
            })
            .applied_objects()
    };
    let controller = Controller::for_stream(identity_events, store)
        .owns_stream(secret_events)
        // A pass that waits for an ACS budget longer than a moment returns, and comes back
        // through here when its slot is granted (see `context::Turns`).
        .reconcile_on(turn_triggers)
        // Bounded, so that thousands of resources waiting on the ACS rate limiter queue as
        // cheap scheduler entries instead of thousands of live reconcile futures.
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
    let store = controller.store();
    let caches_synced = async {
        // The first list of CommunicationIdentities is in the cache.
        if store.wait_until_ready().await.is_ok() {
            info!("caches synced");
            health.set_phase(Phase::Active {
                caches_synced: true,
            });
        }
    };
    let wakeups = {
        let context = context.clone();
        async move {
            let clock = || context.now();
            context.wakeups.fire(&context.turns, clock).await;
        }
    };
    let controller = controller
        .shutdown_on_signal()
        .run(reconcile_measured, error_policy, context.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "reconcile error");
            }
        });
    let namespaced_connections = connection_status::run(
        context.clone(),
        match &config.watch_namespace {
            Some(namespace) => Api::<AcsConnection>::namespaced(watch_client.clone(), namespace),
            None => Api::all(watch_client.clone()),
        },
        namespaced_triggers,
    );
    // In namespaced mode several releases would each count only their own namespace's users
    // of a ClusterAcsConnection: its status is left to a cluster-wide operator.
    let cluster_connections = async {
        match &config.watch_namespace {
            Some(_) => std::future::pending().await,
            None => {
                let watched = Api::<ClusterAcsConnection>::all(watch_client.clone());
                connection_status::run(context.clone(), watched, cluster_triggers).await
            }
        }
    };
    // The wake-ups and the connections' controllers end with the controller (`fire` never
    // returns).
    let controller = async {
        tokio::select! {
            () = controller => {}
            () = wakeups => {}
            () = namespaced_connections => {}
            () = cluster_connections => {}
        }
    };
    let holding = async {
        match &election {
            Some(election) => election.hold(acquired_at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = futures::future::join(controller, caches_synced) => info!("controller stopped"),
        lost = holding => {
            // Dropping the controller here cancels every reconcile at its next await, and
            // exiting lets the Deployment restart this replica as a standby.
            anyhow::bail!("lost the leader election Lease ({lost}); exiting so that this replica stops acting at once");
        }
        ended = &mut admin => return Err(admin_ended(ended)),
    }
    if let Some(election) = &election {
        election.release().await;
    }
    Ok(())
}

/// Drops from a cached CommunicationIdentity what the reconcile never reads: managedFields
/// (most of an object's size), labels, owner references and every annotation but the
/// operator's own (kubectl's last-applied copy of the object, GitOps tools' bookkeeping). A
/// pass that writes works from the API server's answers, not from the cache, for anything it
/// sends back. The create mark goes too once status records the identity: it only tells a
/// deletion that a create of an unrecorded identity may have reached ACS, and a map of one
/// annotation costs ~600 bytes per resource.
fn trim_for_cache(resource: &mut CommunicationIdentity) {
    let recorded = resource
        .status
        .as_ref()
        .is_some_and(|status| status.identity_id.is_some());
    let metadata = &mut resource.metadata;
    metadata.managed_fields = None;
    metadata.labels = None;
    metadata.owner_references = None;
    if let Some(annotations) = &mut metadata.annotations {
        annotations.retain(|key, _| {
            key.starts_with(OPERATOR_ANNOTATION_PREFIX)
                && !(recorded && key == CREATE_ATTEMPTED_ANNOTATION)
        });
        if annotations.is_empty() {
            metadata.annotations = None;
        }
    }
    shrink_vectors(resource);
}

/// Gives back the spare room of the cached object's vectors. serde grows a vector from a JSON
/// array it cannot size ahead, so a single condition or finalizer is held in room for four:
/// ~0.4 KiB of nothing per cached resource.
fn shrink_vectors(resource: &mut CommunicationIdentity) {
    if let Some(finalizers) = &mut resource.metadata.finalizers {
        finalizers.shrink_to_fit();
    }
    let spec = &mut resource.spec;
    spec.scopes.shrink_to_fit();
    spec.rollout_restart_targets.shrink_to_fit();
    spec.tokens.shrink_to_fit();
    for token in &mut spec.tokens {
        token.scopes.shrink_to_fit();
    }
    if let Some(status) = &mut resource.status {
        status.token_scopes.shrink_to_fit();
        status.conditions.shrink_to_fit();
        status.tokens.shrink_to_fit();
        for token in &mut status.tokens {
            token.scopes.shrink_to_fit();
        }
        if let Some(restart) = &mut status.rollout_restart {
            restart.failed_targets.shrink_to_fit();
        }
    }
}

/// `reconcile` within a span naming the resource, and measured. kube-runtime's own span is
/// only entered while the future is created, not while it runs, so without this span the log
/// lines of a reconcile would not say which resource they are about.
async fn reconcile_measured(
    resource: Arc<CommunicationIdentity>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    // `resource`, not `name`: JSON logs put the span's own name under `name`.
    let span = info_span!(
        "reconcile",
        namespace = %resource.namespace().unwrap_or_default(),
        resource = %resource.name_any()
    );
    ctx.metrics.observe_resource(&resource);
    let started = Instant::now();
    let result = reconcile(resource, ctx.clone()).instrument(span).await;
    ctx.metrics.reconciled(
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

fn admin_ended(ended: Result<std::io::Result<()>, JoinError>) -> anyhow::Error {
    match ended {
        Ok(Ok(())) => anyhow::anyhow!("the metrics server stopped"),
        Ok(Err(error)) => anyhow::anyhow!("the metrics server failed: {error}"),
        Err(error) => anyhow::anyhow!("the metrics server task failed: {error}"),
    }
}

/// SIGTERM (Kubernetes stopping the Pod) or SIGINT.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_cache_keeps_what_the_reconcile_reads() {
        let mut resource: CommunicationIdentity = serde_json::from_value(json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": {
                "name": "alice",
                "namespace": "team",
                "uid": "u-1",
                "resourceVersion": "42",
                "generation": 3,
                "finalizers": ["acs-operator.io/cleanup"],
                "labels": { "team": "a" },
                "ownerReferences": [{ "apiVersion": "v1", "kind": "ConfigMap", "name": "app", "uid": "u-0" }],
                "annotations": {
                    "acs-operator.io/identity-create-attempted": "true",
                    "acs-operator.io/refresh-requested-at": "r1",
                    "argocd.argoproj.io/tracking-id": "app:acs-operator.io/CommunicationIdentity:team/alice",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{}}"
                },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}} }]
            },
            "spec": { "connectionSecretRef": { "name": "acs" }, "scopes": ["chat"] },
            "status": { "identityId": "8:acs:x" }
        }))
        .unwrap();
        let mut unrecorded = resource.clone();
        unrecorded.status = None;
        trim_for_cache(&mut unrecorded);
        assert!(
            unrecorded.create_attempted(),
            "needed while no identity is recorded"
        );
        let before = resource.clone();
        trim_for_cache(&mut resource);
        assert!(!resource.create_attempted());
        assert!(resource.managed_fields().is_empty());
        assert!(resource.labels().is_empty() && resource.owner_references().is_empty());
        assert_eq!(
            resource.annotations().keys().collect::<Vec<_>>(),
            ["acs-operator.io/refresh-requested-at"]
        );
        assert_eq!(resource.spec, before.spec);
        assert_eq!(resource.status, before.status);
        assert_eq!(resource.finalizers(), before.finalizers());
        let finalizers = resource.metadata.finalizers.as_ref().map(Vec::capacity);
        assert_eq!(finalizers, Some(1), "no room kept for more");
        assert_eq!(resource.resource_version(), before.resource_version());
        assert_eq!(resource.metadata.generation, before.metadata.generation);
        assert_eq!(resource.uid(), before.uid());
    }
}
