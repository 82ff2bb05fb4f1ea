//! The operations endpoints: `/metrics`, `/healthz` (the process serves HTTP) and `/readyz`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What `/readyz` reports, moved along by `run` and the leader election.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Phase {
    /// Leader election is on and the Lease has not been read yet.
    #[default]
    Starting,
    /// Another replica holds the Lease (`None`: it is free and about to be taken). A standby
    /// is ready: it has nothing to sync, and a rollout must not wait for it to lead.
    Standby { leader: Option<String> },
    /// This replica runs the controller.
    Active { caches_synced: bool },
}

impl Phase {
    fn readiness(&self) -> (StatusCode, String) {
        match self {
            Phase::Starting => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: reading the leader election Lease".into(),
            ),
            Phase::Standby { leader } => (
                StatusCode::OK,
                format!(
                    "ready: standing by; leader is {}",
                    leader.as_deref().unwrap_or("(none)")
                ),
            ),
            Phase::Active {
                caches_synced: false,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: controller caches are syncing".into(),
            ),
            Phase::Active {
                caches_synced: true,
            } => (
                StatusCode::OK,
                "ready: running the controller, caches synced".into(),
            ),
        }
    }
}

/// The state the endpoints read.
pub struct Health {
    metrics: Arc<Metrics>,
    phase: Mutex<Phase>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>, phase: Phase) -> Self {
        metrics.set_leader(matches!(phase, Phase::Active { .. }));
        Self {
            metrics,
            phase: Mutex::new(phase),
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.metrics
            .set_leader(matches!(phase, Phase::Active { .. }));
        *self.phase.lock().expect("phase lock") = phase;
    }

    fn phase(&self) -> Phase {
        self.phase.lock().expect("phase lock").clone()
    }
}

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(listener: TcpListener, health: Arc<Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    axum::serve(listener, app).await
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health.phase().readiness()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_by_phase() {
        let cases = [
            ("lease not read yet", Phase::Starting, false),
            (
                "standby behind another leader",
                Phase::Standby {
                    leader: Some("operator-0".into()),
                },
                true,
            ),
            ("standby, lease free", Phase::Standby { leader: None }, true),
            (
                "leading, caches syncing",
                Phase::Active {
                    caches_synced: false,
                },
                false,
            ),
            (
                "leading, caches synced",
                Phase::Active {
                    caches_synced: true,
                },
                true,
            ),
        ];
        for (name, phase, ready) in cases {
            let (status, _) = phase.readiness();
            assert_eq!(status == StatusCode::OK, ready, "{name}");
        }
    }
}
