//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas only one
//! runs the controller (writes to ACS and the API server). kube-runtime has none and kubert does
//! not support kube 5, so this is the client-go / kubert algorithm, written out:
//!
//! - **Acquire:** read the Lease every [`RETRY_PERIOD`]; take it (create it, or replace it
//!   guarded by its resourceVersion) when it is free, already ours, or expired. Expiry is judged
//!   on this replica's monotonic clock, never by comparing the holder's `renewTime` with our
//!   wall clock, so clock skew between nodes cannot make a live lease look expired: a record
//!   seen unchanged for `lease duration - RETRY_PERIOD` has expired, because it was written at
//!   most one retry period before this replica first saw it. A standby thus takes over within
//!   the lease duration of the last renewal, and no sooner than one retry period before that.
//! - **Renew** every [`RETRY_PERIOD`]. A leader that has not renewed for two thirds of the lease
//!   duration (counted from the start of its last successful write), or finds another holder,
//!   has lost: `hold` returns and the caller exits the process, and the Deployment restarts it
//!   as a standby. With the default 15 s that is 10 s, 3 s before the earliest takeover.
//! - **Release** on a clean shutdown (empty holder), so a standby takes over at once.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::admin::{Health, Phase};

/// How often the leader renews and a standby looks at the Lease.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity`.
    pub identity: String,
    pub lease_duration: Duration,
}

/// `POD_NAME` (set from the downward API by the chart) or, outside a Pod, `<hostname>-<pid>`.
pub fn default_identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|_| "unknown-host".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Why a leader stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum LeaseLost {
    #[error("replica {0:?} holds the Lease now")]
    TakenBy(String),
    #[error("the Lease could not be renewed for {0:?}")]
    NotRenewed(Duration),
}

enum RenewError {
    TakenBy(String),
    Api(kube::Error),
}

pub struct LeaderElection {
    api: Api<Lease>,
    settings: LeaseSettings,
}

impl LeaderElection {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    fn renew_deadline(&self) -> Duration {
        self.settings.lease_duration * 2 / 3
    }

    /// Waits until this replica holds the Lease, reporting standby to `/readyz` meanwhile.
    /// Returns when the successful write started, from which the lease is counted.
    pub async fn acquire(&self, health: &Health) -> Instant {
        let me = &self.settings.identity;
        // The Lease's resourceVersion and when this replica first saw it.
        let mut seen: Option<(Option<String>, Instant)> = None;
        let mut reported_leader = None;
        loop {
            let started = Instant::now();
            let wait = match self.api.get_opt(&self.settings.name).await {
                Err(error) => {
                    warn!(%error, "cannot read the leader election Lease; retrying");
                    RETRY_PERIOD
                }
                Ok(None) => match self
                    .api
                    .create(&PostParams::default(), &self.claim(None))
                    .await
                {
                    Ok(_) => return self.acquired(started),
                    Err(error) => retry_after(&error),
                },
                Ok(Some(lease)) => {
                    let read_at = Instant::now();
                    let version = lease.resource_version();
                    let since = match &seen {
                        Some((seen_version, since)) if *seen_version == version => *since,
                        _ => read_at,
                    };
                    seen = Some((version, since));
                    let holder = holder_of(&lease);
                    let duration = lease
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.lease_duration_seconds)
                        .and_then(|s| u64::try_from(s).ok())
                        .map_or(self.settings.lease_duration, Duration::from_secs);
                    // Expired when seen unchanged this long (see the module documentation).
                    let expires_after = duration.saturating_sub(RETRY_PERIOD);
                    let unchanged_for = read_at - since;
                    if may_take(holder.as_deref(), me, unchanged_for, expires_after) {
                        match self
                            .api
                            .replace(
                                &self.settings.name,
                                &PostParams::default(),
                                &self.claim(Some(&lease)),
                            )
                            .await
                        {
                            Ok(_) => return self.acquired(started),
                            Err(error) => retry_after(&error),
                        }
                    } else {
                        if reported_leader != holder {
                            info!(leader = holder.as_deref().unwrap_or("(none)"), identity = %me, "standing by for the leader election Lease");
                            reported_leader.clone_from(&holder);
                        }
                        health.set_phase(Phase::Standby { leader: holder });
                        // Look again when the record would expire, if that comes sooner, so a
                        // takeover after a crash takes the lease duration and no more.
                        RETRY_PERIOD.min(expires_after.saturating_sub(unchanged_for))
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn acquired(&self, started: Instant) -> Instant {
        info!(
            lease = %format!("{}/{}", self.settings.namespace, self.settings.name),
            identity = %self.settings.identity,
            "acquired the leader election Lease; running the controller"
        );
        started
    }

    /// Renews the Lease until it is lost, which is the only way this returns.
    pub async fn hold(&self, acquired_at: Instant) -> LeaseLost {
        let mut renewed_at = acquired_at;
        loop {
            let deadline = renewed_at + self.renew_deadline();
            tokio::time::sleep_until((Instant::now() + RETRY_PERIOD).min(deadline)).await;
            let started = Instant::now();
            match tokio::time::timeout_at(deadline, self.renew()).await {
                Err(_) => return LeaseLost::NotRenewed(self.renew_deadline()),
                Ok(Ok(())) => renewed_at = started,
                Ok(Err(RenewError::TakenBy(holder))) => return LeaseLost::TakenBy(holder),
                Ok(Err(RenewError::Api(error))) => {
                    warn!(%error, "cannot renew the leader election Lease; retrying");
                }
            }
        }
    }

    async fn renew(&self) -> Result<(), RenewError> {
        let lease = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(RenewError::Api)?
            .ok_or_else(|| RenewError::TakenBy("(none: the Lease was deleted)".into()))?;
        let holder = holder_of(&lease);
        if holder.as_deref() != Some(self.settings.identity.as_str()) {
            return Err(RenewError::TakenBy(
                holder.unwrap_or_else(|| "(none)".into()),
            ));
        }
        // Guarded by the resourceVersion just read: a concurrent writer makes this fail, and
        // the next round sees who it was.
        self.api
            .replace(
                &self.settings.name,
                &PostParams::default(),
                &self.claim(Some(&lease)),
            )
            .await
            .map_err(RenewError::Api)?;
        Ok(())
    }

    /// Gives the Lease up, if still held, so that a standby need not wait for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
            return;
        };
        if holder_of(&lease).as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        let spec = lease.spec.get_or_insert_default();
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!("released the leader election Lease"),
            Err(error) => {
                warn!(%error, "could not release the leader election Lease; it expires by itself")
            }
        }
    }

    /// The Lease as this replica holds it, from the `current` one (whose resourceVersion guards
    /// the write) or new.
    fn claim(&self, current: Option<&Lease>) -> Lease {
        let now = MicroTime(Timestamp::now());
        let previous = current
            .and_then(|lease| lease.spec.clone())
            .unwrap_or_default();
        let renewal = holder_of_spec(&previous).as_deref() == Some(self.settings.identity.as_str());
        let transitions = previous.lease_transitions.unwrap_or(0);
        Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                resource_version: current.and_then(|lease| lease.resource_version()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.settings.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.settings.lease_duration.as_secs()).unwrap_or(i32::MAX),
                ),
                acquire_time: if renewal {
                    previous.acquire_time
                } else {
                    Some(now.clone())
                },
                renew_time: Some(now),
                lease_transitions: Some(match (current, renewal) {
                    (Some(_), false) => transitions + 1,
                    _ => transitions,
                }),
                ..LeaseSpec::default()
            }),
        }
    }
}

fn holder_of(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(holder_of_spec)
}

fn holder_of_spec(spec: &LeaseSpec) -> Option<String> {
    spec.holder_identity.clone().filter(|h| !h.is_empty())
}

/// A lost race (409) is retried at once, with a fresh read; anything else is worth a line and
/// a pause.
fn retry_after(error: &kube::Error) -> Duration {
    if matches!(error, kube::Error::Api(status) if status.code == 409) {
        return Duration::ZERO;
    }
    warn!(%error, "cannot take the leader election Lease; retrying");
    RETRY_PERIOD
}

/// Whether replica `me` may take a Lease held by `holder` whose record it has seen unchanged
/// for `unchanged_for`, when records expire after `expires_after`.
fn may_take(
    holder: Option<&str>,
    me: &str,
    unchanged_for: Duration,
    expires_after: Duration,
) -> bool {
    match holder {
        None => true,
        Some(holder) => holder == me || unchanged_for >= expires_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_take_the_lease() {
        let expires_after = Duration::from_secs(13);
        let cases = [
            ("free", None, Duration::ZERO, true),
            (
                "already ours (restarted in the same Pod)",
                Some("me"),
                Duration::ZERO,
                true,
            ),
            (
                "another holder renewing",
                Some("other"),
                Duration::from_secs(12),
                false,
            ),
            (
                "another holder silent until expiry",
                Some("other"),
                expires_after,
                true,
            ),
            (
                "another holder silent for longer",
                Some("other"),
                Duration::from_secs(60),
                true,
            ),
        ];
        for (name, holder, unchanged_for, expected) in cases {
            assert_eq!(
                may_take(holder, "me", unchanged_for, expires_after),
                expected,
                "{name}"
            );
        }
    }
}
