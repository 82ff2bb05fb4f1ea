//! `acs-identity-operator run`: serves the operations endpoints, waits for the leader election
//! Lease when asked to, and runs the controller until a signal or the loss of the Lease.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, controller, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::net::TcpListener;
use tokio::task::JoinError;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

/// Reconciles running at once. ACS allows ~33 creates or issues per second per resource, so 64
/// in flight keep that pace with room to spare.
const RECONCILE_CONCURRENCY: u16 = 64;

/// Objects per page of a watch's (re)list, against kube's 500: a page is read whole and
/// decoded at once, managed fields and all, and the cache's small long-lived entries made
/// meanwhile pin the pages the allocator took for it (docs/benchmarks.md, eleventh round).
const LIST_PAGE_SIZE: u32 = 100;

use crate::admin::{self, Health, Phase};
use crate::cached::CachedIdentity;
use crate::connection::{AcsConnection, ClusterAcsConnection};
use crate::connection_status::{self, ConnectionResource};
use crate::context::{AcsSettings, Context};
use crate::crd::{CommunicationIdentity, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::kube_call::{Error, KUBE_CALL_TIMEOUT};
use crate::launch::METRICS_LINE;
use crate::leader::{LeaderElection, LeaseSettings};
use crate::metrics::Metrics;
use crate::pass_queue::{Lane, PassQueue};
use crate::reconcile::{error_policy, reconcile};
use crate::turns::Turns;

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

    // Every trigger goes through `passes`, which decides the order passes start in (see
    // `pass_queue`); the controller only runs what it hands out, and the retries it schedules.
    let (passes, handed_out) =
        PassQueue::new(RECONCILE_CONCURRENCY.into(), context.metrics.clone());
    let passes = Arc::new(passes);

    // Only the Secrets the operator labels are watched, as metadata only and without a cache,
    // so memory does not grow with the cluster's Secret count; each event is noted in
    // `known_secrets` (a resourceVersion per Secret) before it triggers its owner's pass.
    let owned_secrets = watcher::Config::default()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
        .page_size(LIST_PAGE_SIZE);
    let secret_events = {
        let (context, noting, passes) = (context.clone(), context.clone(), passes.clone());
        watcher(secrets, owned_secrets)
            .default_backoff()
            .map_ok(move |event| {
                noting.known_secrets.observe(&event);
                event
            })
            .touched_objects()
            .for_each(move |secret| {
                match secret {
                    // An owner the cache does not hold is none of this operator's (another
                    // namespace in namespaced mode, or already gone).
                    Ok(secret) => owners(&secret)
                        .into_iter()
                        .filter(|owner| context.identities.get(owner).is_some())
                        .for_each(|owner| passes.push(owner, Lane::Changed)),
                    Err(error) => warn!(%error, "watching the operator's Secrets failed; retrying"),
                }
                std::future::ready(())
            })
    };
    // The cache keeps CommunicationIdentities packed (`CachedIdentity`; the stream API it needs
    // is behind kube's unstable-runtime flag). Each event is noted in `own_writes` once the
    // cache holds it, and reconciles the connection it names (its count, its finalizer).
    let (namespaced_connections, namespaced_triggers) = futures::channel::mpsc::unbounded();
    let (cluster_connections, cluster_triggers) = futures::channel::mpsc::unbounded();
    let identity_events = {
        let (context, passes) = (context.clone(), passes.clone());
        watcher(
            identities,
            watcher::Config::default().page_size(LIST_PAGE_SIZE),
        )
        .default_backoff()
        .map_ok(packed)
        .reflect(writer)
        .for_each(move |event| {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    warn!(%error, "watching CommunicationIdentities failed; retrying");
                    return std::future::ready(());
                }
            };
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
            match &event {
                watcher::Event::Apply(identity) | watcher::Event::InitApply(identity) => {
                    passes.push(ObjectRef::from_obj(identity), Lane::Changed);
                }
                watcher::Event::Delete(gone) => {
                    // Its places in the ACS queues would be granted to nobody, and its
                    // refresh is not due any more.
                    passes.forget(&ObjectRef::from_obj(gone));
                    if let Some(uid) = gone.uid() {
                        acs::RateLimits::withdraw_everywhere(&uid);
                        context.wakeups.cancel(&uid);
                    }
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
            std::future::ready(())
        })
    };
    let called = {
        let passes = passes.clone();
        turn_triggers.for_each(move |resource| {
            passes.push(resource, Lane::Called);
            std::future::ready(())
        })
    };
    // The watches are driven above, not by the controller: it takes no trigger of its own.
    let no_triggers = futures::stream::pending::<Result<CachedIdentity, watcher::Error>>();
    let controller = Controller::for_stream(no_triggers, store)
        // A pass that waits for an ACS budget longer than a moment returns, and comes back
        // through `passes` when its slot is granted (see `turns::Turns`).
        .reconcile_on(handed_out)
        // Unbounded here: `passes` bounds what runs, and a bound here too would leave the
        // controller's scheduler to hold, in no order, what `passes` ordered.
        .with_config(controller::Config::default().concurrency(0));
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
    let controller = {
        let running = passes.clone();
        let reconcile = move |cached: Arc<CachedIdentity>, ctx: Arc<Context>| {
            let passes = running.clone();
            let resource = ObjectRef::from_obj(&*cached);
            passes.started(&resource);
            async move {
                let result = reconcile_measured(cached, ctx).await;
                passes.finished(&resource);
                result
            }
        };
        let passes = passes.clone();
        controller
            .shutdown_on_signal()
            .run(reconcile, error_policy, context.clone())
            .for_each(move |result| {
                match result {
                    Err(controller::Error::ObjectNotFound(gone)) => {
                        // Handed out, and deleted before it started.
                        passes.finished(
                            &ObjectRef::new(&gone.name)
                                .within(gone.namespace.as_deref().unwrap_or_default()),
                        );
                    }
                    Err(error) => warn!(%error, "reconcile error"),
                    Ok(_) => {}
                }
                std::future::ready(())
            })
    };
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
            () = identity_events => {}
            () = secret_events => {}
            () = called => {}
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

/// The CommunicationIdentities that own `secret`.
fn owners(secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<CachedIdentity>> {
    let namespace = secret.namespace().unwrap_or_default();
    secret
        .owner_references()
        .iter()
        .filter(|owner| {
            owner.kind == CommunicationIdentity::kind(&())
                && owner.api_version == CommunicationIdentity::api_version(&())
        })
        .map(|owner| ObjectRef::new(&owner.name).within(&namespace))
        .collect()
}

/// The event with its resource packed for the cache.
fn packed(event: watcher::Event<CommunicationIdentity>) -> watcher::Event<CachedIdentity> {
    match event {
        watcher::Event::Apply(resource) => watcher::Event::Apply(resource.into()),
        watcher::Event::InitApply(resource) => watcher::Event::InitApply(resource.into()),
        watcher::Event::Delete(resource) => watcher::Event::Delete(resource.into()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// `reconcile` within a span naming the resource, and measured. kube-runtime's own span is
/// only entered while the future is created, not while it runs, so without this span the log
/// lines of a reconcile would not say which resource they are about.
async fn reconcile_measured(
    cached: Arc<CachedIdentity>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    // `resource`, not `name`: JSON logs put the span's own name under `name`.
    let span = info_span!(
        "reconcile",
        namespace = %cached.namespace().unwrap_or_default(),
        resource = %cached.name_any()
    );
    let started = Instant::now();
    let result = match cached.unpack() {
        Ok(resource) => {
            ctx.metrics.observe_resource(&resource);
            reconcile(Arc::new(resource), ctx.clone())
                .instrument(span)
                .await
        }
        Err(error) => Err(error.into()),
    };
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
