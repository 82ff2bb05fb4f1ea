//! spec.rolloutRestartTargets on the real control plane: a Deployment's pod template is
//! annotated as `kubectl rollout restart` does, once per token change and never for an
//! operator restart or an unchanged pass; a storm of changes within minRestartInterval gives
//! one restart; a missing target is reported while the Secret is still written.

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::json;

use crate::support::{
    Operator, PROMPTLY, Setup, basic_spec, create_deployment, next_second_after, wait_for,
    wait_identity,
};
use acs_identity_operator::crd::{
    CommunicationIdentity, REFRESH_REQUESTED_ANNOTATION, reason, secret_key,
};
use acs_identity_operator::restart::RESTARTED_AT_ANNOTATION;

/// The Deployment's generation (each pod-template change adds one) and restartedAt value.
async fn restarts(deployments: &Api<Deployment>, name: &str) -> (i64, Option<String>) {
    let deployment = deployments.get(name).await.unwrap();
    let annotation = deployment
        .spec
        .template
        .metadata
        .and_then(|metadata| metadata.annotations)
        .and_then(|annotations| annotations.get(RESTARTED_AT_ANNOTATION).cloned());
    (
        deployment.metadata.generation.unwrap_or_default(),
        annotation,
    )
}

fn last_restart(resource: &CommunicationIdentity) -> Option<jiff::Timestamp> {
    let restart = resource.status.as_ref()?.rollout_restart.as_ref()?;
    restart.last_restart_time.as_ref().map(|t| t.0)
}

#[tokio::test]
async fn a_deployment_is_restarted_once_per_token_change_and_a_storm_gives_one_restart() {
    let mut setup = Setup::new("restarts").await;
    let deployments: Api<Deployment> = setup.ns.api();
    create_deployment(&deployments, "frontend").await;
    let mut spec = basic_spec();
    spec["rolloutRestartTargets"] = json!([
        { "kind": "Deployment", "name": "frontend" },
        { "kind": "Deployment", "name": "gone" },
    ]);
    // The shortest interval, so the restart a storm is owed comes within the test.
    spec["minRestartInterval"] = json!("1m");
    setup.apply("web", spec).await;
    setup.wait_ready("web").await;
    let (generation, annotation) = restarts(&deployments, "frontend").await;
    assert_eq!(annotation, None, "the first token restarts nothing");

    // A refresh: one restart, and the missing target reported while the token is delivered.
    let before = setup.secret_data("web-acs-token").await[secret_key::TOKEN].clone();
    next_second_after(jiff::Timestamp::now()).await;
    setup
        .annotate("web", REFRESH_REQUESTED_ANNOTATION, "1")
        .await;
    let restarted = setup
        .wait_resource("web", "the targets restarted", |r| {
            last_restart(r).is_some()
        })
        .await;
    let after = setup.secret_data("web-acs-token").await[secret_key::TOKEN].clone();
    assert_ne!(after, before, "the Secret holds the new token");
    let (restarted_generation, annotation) = restarts(&deployments, "frontend").await;
    assert_eq!(
        restarted_generation,
        generation + 1,
        "one pod-template change"
    );
    assert_eq!(
        annotation,
        Some(last_restart(&restarted).unwrap().to_string())
    );
    let failed = &restarted
        .status
        .as_ref()
        .unwrap()
        .rollout_restart
        .as_ref()
        .unwrap()
        .failed_targets;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        (failed[0].name.as_str(), failed[0].reason.as_str()),
        ("gone", reason::RESTART_TARGET_NOT_FOUND)
    );
    setup.wait_event(reason::RESTART_TARGET_NOT_FOUND).await;
    setup.wait_event(reason::WORKLOAD_RESTARTED).await;

    // Neither an operator restart nor the passes after it restart anything.
    setup.operator.kill();
    setup.operator = Operator::start(&setup.ns.name, &setup.emulator, &[]);
    wait_for("the restarted operator to reconcile", PROMPTLY, || async {
        (setup.operator.reconciles().await > 0).then_some(())
    })
    .await;
    setup.operator.settled_reconciles().await;
    assert_eq!(
        restarts(&deployments, "frontend").await.0,
        restarted_generation
    );

    // A storm of refreshes within minRestartInterval: each token delivered, no restart yet;
    // the one restart they are owed is pending.
    for value in ["2", "3", "4"] {
        next_second_after(jiff::Timestamp::now()).await;
        setup
            .annotate("web", REFRESH_REQUESTED_ANNOTATION, value)
            .await;
        setup.wait_refresh_handled("web", value).await;
    }
    let stormed = setup
        .wait_resource("web", "a restart pending", |r| {
            r.status
                .as_ref()
                .and_then(|s| s.rollout_restart.as_ref())
                .is_some_and(|restart| restart.pending_since.is_some())
        })
        .await;
    setup.operator.settled_reconciles().await;
    assert_eq!(
        restarts(&deployments, "frontend").await.0,
        restarted_generation,
        "no restart within the interval"
    );
    assert_eq!(last_restart(&stormed), last_restart(&restarted));

    // When the interval is over: one restart for the whole storm, and no more after it.
    let first = last_restart(&restarted).unwrap();
    let again = wait_identity(
        &setup.identities,
        "web",
        "the storm's one restart",
        std::time::Duration::from_secs(120),
        |r| last_restart(r).is_some_and(|at| at > first),
    )
    .await;
    assert!(last_restart(&again).unwrap() >= first + jiff::SignedDuration::from_mins(1));
    setup.operator.settled_reconciles().await;
    let (generation, annotation) = restarts(&deployments, "frontend").await;
    assert_eq!(
        generation,
        restarted_generation + 1,
        "one restart for the storm"
    );
    assert_eq!(annotation, Some(last_restart(&again).unwrap().to_string()));
}
