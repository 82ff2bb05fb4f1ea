//! The operations endpoints and logs of a running operator: `/healthz`, `/readyz`, `/metrics`
//! after a create and a delete, and `--log-format json` lines that name the resource and never
//! hold the access key or a token.

use kube::api::DeleteParams;
use serde_json::Value;

use crate::support::{
    Emulator, PROMPTLY, Setup, basic_spec, create_identity, secret_strings, wait_for,
};
use acs_identity_operator::crd::{reason, secret_key};

async fn get(url: &str) -> Option<(reqwest::StatusCode, String)> {
    let response = reqwest::get(url).await.ok()?;
    Some((response.status(), response.text().await.ok()?))
}

#[tokio::test]
async fn metrics_health_readiness_and_json_logs() {
    let setup = Setup::start(
        "operations",
        Emulator::start(&[]),
        &["--log-format", "json"],
    )
    .await;
    let (ns, emulator, operator, identities, secrets) = (
        &setup.ns,
        &setup.emulator,
        &setup.operator,
        &setup.identities,
        &setup.secrets,
    );
    let base = operator.admin_url().await;

    wait_for("/readyz to answer 200", PROMPTLY, || async {
        let (status, _) = get(&format!("{base}/readyz")).await?;
        (status == reqwest::StatusCode::OK).then_some(())
    })
    .await;
    let (status, _) = get(&format!("{base}/healthz")).await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK);

    create_identity(identities, "ops", basic_spec()).await;
    let resource = setup.wait_ready("ops").await;
    let expires_on = resource
        .status
        .as_ref()
        .unwrap()
        .token_expires_on
        .as_ref()
        .unwrap()
        .0;

    let expiry = format!(
        "acs_identity_operator_token_expiration_timestamp_seconds{{namespace=\"{}\",name=\"ops\"}}",
        ns.name
    );
    let metrics = wait_for("the expiry gauge of ops", PROMPTLY, || async {
        let (_, text) = get(&format!("{base}/metrics")).await?;
        text.contains(&expiry).then_some(text)
    })
    .await;
    assert!(
        metrics.contains(&format!("{expiry} {}.0", expires_on.as_second())),
        "{metrics}"
    );
    for series in [
        "acs_identity_operator_reconciles_total ",
        "acs_identity_operator_reconcile_duration_seconds_bucket{",
        "acs_identity_operator_acs_requests_total{operation=\"create_identity\",status=\"201\"} 1",
        "acs_identity_operator_acs_request_duration_seconds_count{operation=\"create_identity\"} 1",
        "acs_identity_operator_acs_rate_limit_wait_seconds_count{operation=\"create_identity\"} 1",
        "acs_identity_operator_acs_throttled_total{operation=\"issue_token\"} 0",
        "acs_identity_operator_leader 1",
    ] {
        assert!(
            metrics.contains(series),
            "{series:?} missing from\n{metrics}"
        );
    }

    // A failure is counted by its condition reason.
    let mut orphan = basic_spec();
    orphan["connectionSecretRef"]["name"] = "missing".into();
    create_identity(identities, "orphan", orphan).await;
    wait_for("a failure counted by reason", PROMPTLY, || async {
        let (_, text) = get(&format!("{base}/metrics")).await?;
        text.contains(&format!(
            "acs_identity_operator_failures_total{{reason=\"{}\"}}",
            reason::CONNECTION_SECRET_NOT_FOUND
        ))
        .then_some(())
    })
    .await;

    let secret = secrets.get(&resource.secret_name()).await.unwrap();
    let token = secret_strings(&secret)[secret_key::TOKEN].clone();
    identities
        .delete("ops", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the expiry gauge of ops to go", PROMPTLY, || async {
        let (_, text) = get(&format!("{base}/metrics")).await?;
        (!text.contains(&expiry)).then_some(())
    })
    .await;

    let logs = operator.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let issued = lines
        .iter()
        .find(|line| line["fields"]["message"] == "token issued")
        .expect("a token issued line");
    assert_eq!(issued["span"]["namespace"], ns.name.as_str(), "{issued}");
    assert_eq!(issued["span"]["resource"], "ops", "{issued}");
    assert!(
        issued["fields"]["identity"]
            .as_str()
            .is_some_and(|id| id.starts_with("8:acs:")),
        "{issued}"
    );
    assert!(!logs.contains(&emulator.key), "the access key was logged");
    assert!(!logs.contains(&token), "the token was logged");
}
