//! The circuit of an ACS endpoint (issue 12): while the endpoint fails, one probe at a time
//! goes out, always the most urgent request waiting; once one succeeds, everything waiting
//! drains.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{PROMPTLY, Setup, basic_spec, ready, ready_message, wait_for};
use acs_identity_operator::crd::{
    REFRESH_REQUESTED_ANNOTATION, REVOKE_REQUESTED_ANNOTATION, reason, secret_key,
};

/// 503 answers the emulator sent, by operation (both create routes count as `create`).
fn unavailable(stats: &Value, operation: &str) -> u64 {
    let Some(operations) = stats["requests"].as_object() else {
        return 0;
    };
    operations
        .iter()
        .filter(|(name, _)| name.starts_with(operation))
        .filter_map(|(_, by_status)| by_status["503"].as_u64())
        .sum()
}

#[tokio::test]
async fn an_outage_sends_one_probe_at_a_time_most_urgent_first_then_everything_drains() {
    let setup = Setup::new("circuit").await;
    for name in ["due", "leaky"] {
        setup.apply(name, basic_spec()).await;
    }
    for name in ["due", "leaky"] {
        setup.wait_ready(name).await;
    }
    let leaked = setup.secret_data("leaky-acs-token").await[secret_key::TOKEN].clone();
    let endpoint = setup
        .emulator
        .endpoint
        .trim_end_matches('/')
        .to_ascii_lowercase();
    let series =
        |metric: &str| format!("acs_identity_operator_{metric}{{endpoint=\"{endpoint}\"}}");

    setup
        .emulator
        .admin_post("outage", json!({ "mode": "unavailable", "seconds": 600 }))
        .await;
    // A due refresh meets the outage: its failures open the circuit.
    setup
        .annotate("due", REFRESH_REQUESTED_ANNOTATION, "during-outage")
        .await;
    wait_for("the circuit to open", PROMPTLY, || async {
        (setup.operator.metric(&series("acs_circuit_open")).await == Some(1.0)).then_some(())
    })
    .await;
    // Then a new identity and a leaked token's revoke join the queue.
    setup.apply("fresh", basic_spec()).await;
    setup
        .annotate("leaky", REVOKE_REQUESTED_ANNOTATION, "leaked")
        .await;
    let waiting = setup
        .wait_resource("fresh", "fresh waiting for the endpoint", |resource| {
            ready(resource).is_some_and(|(_, r)| r == reason::ACS_UNAVAILABLE)
                && ready_message(resource).contains("waiting for the endpoint to recover since")
        })
        .await;
    assert_eq!(ready(&waiting).unwrap().0, "False", "it has no token yet");
    wait_for("three requests in the queue", PROMPTLY, || async {
        let length = setup.operator.metric(&series("acs_queue_length")).await;
        (length >= Some(2.0)).then_some(())
    })
    .await;
    let oldest = setup
        .operator
        .metric(&series("acs_queue_oldest_deadline_timestamp_seconds"))
        .await
        .expect("the oldest deadline of a queue that holds requests");
    assert!(oldest <= jiff::Timestamp::now().as_second() as f64);

    // From now on every probe is the revoke, one at a time: the refresh and the create wait
    // (one of theirs may still have been out, as the probe before).
    let before = setup.emulator.stats().await;
    let probes = wait_for("three probes", Duration::from_secs(20), || async {
        let stats = setup.emulator.stats().await;
        let probes =
            unavailable(&stats, "revokeAccessTokens") - unavailable(&before, "revokeAccessTokens");
        (probes >= 3).then_some(stats)
    })
    .await;
    for operation in ["issueAccessToken", "createIdentity"] {
        let spent = unavailable(&probes, operation) - unavailable(&before, operation);
        assert!(
            spent <= 1,
            "{spent} {operation} requests went out behind the probe"
        );
    }

    // The endpoint answers again: the queue drains, the revoke first.
    setup.emulator.admin_delete("outage").await;
    setup.wait_refresh_handled("due", "during-outage").await;
    for name in ["due", "leaky", "fresh"] {
        setup.wait_reason(name, reason::TOKEN_ISSUED).await;
    }
    assert_eq!(setup.emulator.validate(&leaked).await["valid"], false);
    wait_for(
        "the circuit closed and the queue empty",
        PROMPTLY,
        || async {
            let open = setup.operator.metric(&series("acs_circuit_open")).await;
            let length = setup.operator.metric(&series("acs_queue_length")).await;
            (open.is_none() && length.is_none()).then_some(())
        },
    )
    .await;
}
