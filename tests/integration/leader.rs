//! Leader election: operator processes contending for one Lease. Only the leader acts; after a
//! `kill -9` a standby takes over within the lease duration, with no identity created twice and
//! no token issued twice; after a clean stop it takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use crate::support::{
    Emulator, Operator, TestNamespace, basic_spec, create_connection_secret, create_identity,
    ensure_crd, wait_for, wait_ready,
};
use acs_identity_operator::crd::CommunicationIdentity;
use acs_identity_operator::metrics::PREFIX;

/// The default lease duration.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The default `--leader-election-lease-name`.
const LEASE_NAME: &str = "acs-identity-operator";
const STARTUP: Duration = Duration::from_secs(30);

/// A namespace with a connection Secret and an emulator; the Lease lives in the namespace too,
/// so tests running side by side contend for leases of their own.
struct Contest {
    ns: TestNamespace,
    emulator: Emulator,
    identities: Api<CommunicationIdentity>,
}

impl Contest {
    async fn new(prefix: &str) -> Self {
        ensure_crd().await;
        let ns = TestNamespace::new(prefix).await;
        let emulator = Emulator::start(&[]);
        create_connection_secret(&ns.api(), "acs-connection", &emulator.connection_string).await;
        Self {
            identities: ns.api(),
            ns,
            emulator,
        }
    }

    fn start_replica(&self) -> Operator {
        Operator::start(
            &self.ns.name,
            &self.emulator,
            &[
                "--leader-elect",
                "--leader-election-namespace",
                &self.ns.name,
            ],
        )
    }

    /// Two replicas, started one after the other: the first leads, the second stands by.
    async fn start_leader_and_standby(&self) -> (Operator, Operator) {
        let leader = self.start_replica();
        wait_leading(&leader, "the first replica to lead", STARTUP).await;
        let standby = self.start_replica();
        wait_readyz(&standby, "standing by").await;
        (leader, standby)
    }

    /// Who holds the Lease.
    async fn lease_holder(&self) -> Option<String> {
        let lease: Lease = self.ns.api().get(LEASE_NAME).await.unwrap();
        lease.spec.and_then(|spec| spec.holder_identity)
    }

    async fn create(&self, name: &str) {
        create_identity(&self.identities, name, basic_spec()).await;
    }

    async fn wait_ready(&self, name: &str) {
        wait_ready(&self.identities, name, STARTUP).await;
    }

    /// (identitiesAlive, tokensIssued) at the emulator.
    async fn acs_counts(&self) -> (u64, u64) {
        let stats = self.emulator.stats().await;
        (
            stats["identitiesAlive"].as_u64().unwrap(),
            stats["tokensIssued"].as_u64().unwrap(),
        )
    }
}

/// Waits until `operator` runs the controller, as its leader gauge tells.
async fn wait_leading(operator: &Operator, what: &str, deadline: Duration) {
    let series = format!("{PREFIX}_leader");
    wait_for(what, deadline, || async {
        (operator.metric(&series).await == Some(1.0)).then_some(())
    })
    .await;
}

/// The tokens `operator` got from ACS: with each identity it created, and issued on their own.
async fn tokens_issued(operator: &Operator) -> u64 {
    let mut tokens = 0.0;
    for (operation, status) in [
        (acs::Operation::CreateIdentity, 201),
        (acs::Operation::IssueToken, 200),
    ] {
        let series = format!(
            "{PREFIX}_acs_requests_total{{operation=\"{}\",status=\"{status}\"}}",
            operation.as_str()
        );
        tokens += operator.metric(&series).await.unwrap_or(0.0);
    }
    tokens as u64
}

/// Waits until `/readyz` answers 200 with a body that contains `body`.
async fn wait_readyz(operator: &Operator, body: &str) {
    let url = format!("{}/readyz", operator.admin_url().await);
    wait_for(&format!("/readyz to say {body:?}"), STARTUP, || async {
        let response = reqwest::get(&url).await.ok()?;
        let ok = response.status() == reqwest::StatusCode::OK;
        (ok && response.text().await.ok()?.contains(body)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_the_leader_acts_and_a_standby_takes_over_after_kill_9() {
    let contest = Contest::new("leader").await;
    let (mut leader, standby) = contest.start_leader_and_standby().await;
    // Both are ready: a standby must not hold up a rollout.
    wait_readyz(&leader, "running the controller").await;
    wait_readyz(&standby, "standing by").await;

    for name in ["alpha", "beta", "gamma"] {
        contest.create(name).await;
    }
    for name in ["alpha", "beta", "gamma"] {
        contest.wait_ready(name).await;
    }
    assert_eq!(tokens_issued(&leader).await, 3);
    assert_eq!(standby.reconciles().await, 0, "the standby reconciled");
    assert_eq!(contest.acs_counts().await, (3, 3));

    leader.kill();
    let killed = Instant::now();
    contest.create("delta").await;
    // The standby reads the Lease every 2 s and counts expiry from its own observations, so
    // it takes over within the lease duration of the leader's last renewal; a second is
    // allowed for this test's own polling.
    wait_leading(
        &standby,
        "the standby to take over",
        LEASE_DURATION + Duration::from_secs(1),
    )
    .await;
    eprintln!("takeover {:?} after kill -9", killed.elapsed());
    contest.wait_ready("delta").await;
    wait_readyz(&standby, "running the controller").await;

    // The new leader issued only delta's token; the others were current already.
    assert_eq!(tokens_issued(&standby).await, 1);
    assert_eq!(contest.acs_counts().await, (4, 4));
}

#[tokio::test]
async fn a_leader_that_stops_cleanly_hands_over_at_once() {
    let contest = Contest::new("handover").await;
    let (mut leader, standby) = contest.start_leader_and_standby().await;

    let leading = contest.lease_holder().await;
    assert!(leading.is_some(), "the leader holds the Lease");
    leader.terminate();
    // Released, the Lease no longer names the leader (the standby may have taken it already).
    assert_ne!(
        contest.lease_holder().await,
        leading,
        "the stopped leader did not release the Lease"
    );
    // Released, the Lease is free: the standby takes it at its next look, every 2 s.
    wait_leading(
        &standby,
        "the standby to take over the released Lease",
        Duration::from_secs(4),
    )
    .await;
    contest.create("alpha").await;
    contest.wait_ready("alpha").await;
    assert_eq!(contest.acs_counts().await, (1, 1));
}
