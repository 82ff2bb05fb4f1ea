//! `acs-identity-operator run`: wires the controller to the cluster and runs it until a signal.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::context::{AcsSettings, Context};
use crate::crd::{CommunicationIdentity, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::reconcile::{error_policy, reconcile};

/// What `run` needs from the command line.
pub struct RunConfig {
    /// Watch only this namespace (the Helm chart's namespaced mode); all namespaces otherwise.
    pub watch_namespace: Option<String>,
    pub acs: AcsSettings,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|error| {
        anyhow::anyhow!(
            "cannot reach Kubernetes: {error}; set KUBECONFIG or run inside the cluster"
        )
    })?;
    let (identities, secrets): (Api<CommunicationIdentity>, Api<Secret>) =
        match &config.watch_namespace {
            Some(namespace) => (
                Api::namespaced(client.clone(), namespace),
                Api::namespaced(client.clone(), namespace),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let reporter = Reporter {
        controller: "acs-identity-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let context = Arc::new(Context::new(client, recorder, config.acs));
    info!(
        namespace = config.watch_namespace.as_deref().unwrap_or("(all)"),
        "starting controller"
    );

    // Only the Secrets the operator labels are watched, so memory does not grow with the
    // cluster's Secret count.
    let owned_secrets =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    Controller::new(identities, watcher::Config::default())
        .owns(secrets, owned_secrets)
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "reconcile error");
            }
        })
        .await;
    info!("controller stopped");
    Ok(())
}
