//! Prometheus metrics, served by `admin` on `/metrics`. Every label is bounded (operation,
//! status code, error kind, condition reason) except the per-resource token expiry gauge, which
//! is keyed by namespace and name like cert-manager's `certificate_expiration_timestamp_seconds`
//! and removed when its resource goes, and the ACS queue gauges, keyed by endpoint: tenants
//! name endpoints, so those carry the [`MAX_ENDPOINT_SERIES`] longest queues by name and fold
//! the rest into `endpoint="other"`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kube::ResourceExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::CommunicationIdentity;

/// Every metric name starts with this, followed by `_`.
pub const PREFIX: &str = "acs_identity_operator";

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Family<KindLabel, Counter>,
    reconcile_duration: Histogram,
    failures: Family<ReasonLabel, Counter>,
    token_expiration: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    acs_requests: Family<AcsRequestLabels, Counter>,
    acs_request_duration: Family<OperationLabel, Histogram>,
    acs_throttled: Family<OperationLabel, Counter>,
    acs_rate_limit_wait: Family<OperationLabel, Histogram>,
    acs_called_back_claim: Family<OperationLabel, Histogram>,
    acs_api_version_fallbacks: Family<ApiVersionFallbackLabels, Counter>,
    acs_possible_orphans: Counter,
    kube_requests: Family<KubeRequestLabels, Counter>,
    passes_waiting: Family<LaneLabel, Gauge>,
    leader: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabel {
    lane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiVersionFallbackLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KubeRequestLabels {
    call: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcsRequestLabels {
    operation: &'static str,
    status: String,
}

/// Seconds, from 5 ms to about 80 s: an ACS call, a reconcile of several calls, or a wait
/// for the rate limiter during a large provisioning run.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: seconds_histogram(),
            failures: Family::default(),
            token_expiration: Family::default(),
            acs_requests: Family::default(),
            acs_request_duration: Family::new_with_constructor(seconds_histogram),
            acs_throttled: Family::default(),
            acs_rate_limit_wait: Family::new_with_constructor(seconds_histogram),
            acs_called_back_claim: Family::new_with_constructor(seconds_histogram),
            acs_api_version_fallbacks: Family::default(),
            acs_possible_orphans: Counter::default(),
            kube_requests: Family::default(),
            passes_waiting: Family::default(),
            leader: Gauge::default(),
            registry: Registry::with_prefix(PREFIX),
        };
        // Zero series for every operation, so `rate()` over 429s works before the first one.
        for operation in acs::Operation::ALL {
            metrics.acs_throttled.get_or_create_owned(&OperationLabel {
                operation: operation.as_str(),
            });
        }
        let registry = &mut metrics.registry;
        registry.register(
            "reconciles",
            "Reconcile passes started",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed on the Kubernetes API, by error kind",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile pass took",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "failures",
            "Failures recorded in a resource's Ready condition (ACS or configuration), by condition reason",
            metrics.failures.clone(),
        );
        registry.register(
            "token_expiration_timestamp_seconds",
            "When the access token in the resource's Secret expires, in Unix seconds",
            metrics.token_expiration.clone(),
        );
        registry.register(
            "acs_requests",
            "HTTP requests to ACS (each retry counts), by operation and status code, timeout or connection",
            metrics.acs_requests.clone(),
        );
        registry.register(
            "acs_request_duration_seconds",
            "Time one HTTP request to ACS took, by operation",
            metrics.acs_request_duration.clone(),
        );
        registry.register(
            "acs_throttled",
            "429 Too Many Requests answers from ACS, by operation",
            metrics.acs_throttled.clone(),
        );
        registry.register(
            "acs_rate_limit_wait_seconds",
            "Time a request waited in the client-side rate limiter before it was sent, by operation",
            metrics.acs_rate_limit_wait.clone(),
        );
        registry.register(
            "acs_api_version_fallbacks",
            "Times ACS refused an api-version and a client fell back to another (from, to); from the preview to GA, creates are no longer exactly-once",
            metrics.acs_api_version_fallbacks.clone(),
        );
        registry.register(
            "acs_possible_orphan_identities",
            "Creates without customId (a GA api-version) whose answer was lost: each may have left an identity in ACS that no resource records",
            metrics.acs_possible_orphans.clone(),
        );
        registry.register(
            "acs_called_back_claim_seconds",
            "Time from a slot reserved for a queued resource until its pass, called back, came back for it, by operation",
            metrics.acs_called_back_claim.clone(),
        );
        registry.register(
            "kube_requests",
            "Kubernetes API requests of the reconciles, by call and outcome (success, client_error, server_error, transport, timeout)",
            metrics.kube_requests.clone(),
        );
        registry.register(
            "passes_waiting",
            "Reconcile passes wanted and not started yet, by lane (called: an ACS slot granted or a refresh due; changed: a watch event)",
            metrics.passes_waiting.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica runs the controller (holds the Lease, or leader election is off)",
            metrics.leader.clone(),
        );
        registry.register_collector(Box::new(AcsQueues));
        metrics
    }
}

/// Endpoints with a series of their own in the ACS queue gauges; the others are summed up
/// under `endpoint="other"`.
pub const MAX_ENDPOINT_SERIES: usize = 10;
/// The longest endpoint label, in bytes.
const MAX_ENDPOINT_LABEL: usize = 128;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

/// The ACS queues as they are at scrape time (`acs::RateLimits::snapshots`).
#[derive(Debug)]
struct AcsQueues;

impl Collector for AcsQueues {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let waiting = Family::<EndpointLabel, Gauge>::default();
        let oldest = Family::<EndpointLabel, Gauge<f64, AtomicU64>>::default();
        let open = Family::<EndpointLabel, Gauge>::default();
        for queue in bounded_series(acs::RateLimits::snapshots()) {
            let label = EndpointLabel {
                endpoint: queue.endpoint,
            };
            waiting.get_or_create(&label).set(queue.waiting as i64);
            if let Some(deadline) = queue.oldest_deadline {
                oldest
                    .get_or_create(&label)
                    .set(deadline.as_second() as f64);
            }
            open.get_or_create(&label).set(queue.open as i64);
        }
        let metric = encoder.encode_descriptor(
            "acs_queue_length",
            "Requests waiting for an ACS endpoint's budget or for its circuit to close, by endpoint",
            None,
            waiting.metric_type(),
        )?;
        waiting.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "acs_queue_oldest_deadline_timestamp_seconds",
            "The earliest deadline waiting in an ACS endpoint's queue, in Unix seconds, by endpoint",
            None,
            oldest.metric_type(),
        )?;
        oldest.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "acs_circuit_open",
            "Endpoints whose circuit is open (failing: one probe at a time), by endpoint",
            None,
            open.metric_type(),
        )?;
        open.encode(metric)
    }
}

/// One series of the ACS queue gauges.
#[derive(Debug, PartialEq)]
struct QueueSeries {
    endpoint: String,
    waiting: usize,
    oldest_deadline: Option<jiff::Timestamp>,
    /// Endpoints with an open circuit.
    open: usize,
}

/// The [`MAX_ENDPOINT_SERIES`] longest queues (open circuits first among equals) by endpoint,
/// and the rest summed up as `other`: however many endpoints tenants name, at most
/// `MAX_ENDPOINT_SERIES + 1` series.
fn bounded_series(mut queues: Vec<acs::ratelimit::QueueSnapshot>) -> Vec<QueueSeries> {
    queues.sort_by(|a, b| {
        (b.waiting, b.circuit_open, &a.endpoint).cmp(&(a.waiting, a.circuit_open, &b.endpoint))
    });
    let rest = queues.split_off(queues.len().min(MAX_ENDPOINT_SERIES));
    let mut series: Vec<QueueSeries> = queues
        .into_iter()
        .map(|queue| QueueSeries {
            endpoint: crate::status::truncated(queue.endpoint, MAX_ENDPOINT_LABEL),
            waiting: queue.waiting,
            oldest_deadline: queue.oldest_deadline,
            open: usize::from(queue.circuit_open),
        })
        .collect();
    if !rest.is_empty() {
        series.push(QueueSeries {
            endpoint: "other".into(),
            waiting: rest.iter().map(|queue| queue.waiting).sum(),
            oldest_deadline: rest.iter().filter_map(|queue| queue.oldest_deadline).min(),
            open: rest.iter().filter(|queue| queue.circuit_open).count(),
        });
    }
    series
}

impl Metrics {
    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// One reconcile pass ended after `took`; `error_kind` is the error's metric label.
    pub fn reconciled(&self, took: Duration, error_kind: Option<&'static str>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
        if let Some(kind) = error_kind {
            self.reconcile_errors
                .get_or_create(&KindLabel { kind })
                .inc();
        }
    }

    /// A failure was recorded in status under the condition reason `reason`.
    pub fn failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Mirrors `status.tokenExpiresOn` of `resource` into the expiry gauge; a resource being
    /// deleted, or without a token, has no series.
    pub fn observe_resource(&self, resource: &CommunicationIdentity) {
        let labels = ResourceLabels {
            namespace: resource.namespace().unwrap_or_default(),
            name: resource.name_any(),
        };
        let expires_on = resource
            .status
            .as_ref()
            .and_then(|status| status.token_expires_on.as_ref())
            .filter(|_| resource.metadata.deletion_timestamp.is_none());
        match expires_on {
            Some(time) => {
                self.token_expiration
                    .get_or_create(&labels)
                    .set(time.0.as_second() as f64);
            }
            None => {
                self.token_expiration.remove(&labels);
            }
        }
    }

    /// One Kubernetes API request of a reconcile ended; `call` and `outcome` are bounded.
    pub fn kube_request(&self, call: &'static str, outcome: &'static str) {
        self.kube_requests
            .get_or_create(&KubeRequestLabels { call, outcome })
            .inc();
    }

    pub fn set_passes_waiting(&self, lane: &'static str, waiting: usize) {
        self.passes_waiting
            .get_or_create(&LaneLabel { lane })
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

impl acs::Observer for Metrics {
    fn on_request(&self, operation: acs::Operation, outcome: acs::RequestOutcome, took: Duration) {
        let operation = operation.as_str();
        self.acs_requests
            .get_or_create(&AcsRequestLabels {
                operation,
                status: outcome.to_string(),
            })
            .inc();
        self.acs_request_duration
            .get_or_create(&OperationLabel { operation })
            .observe(took.as_secs_f64());
    }

    fn on_throttled(&self, operation: acs::Operation) {
        self.acs_throttled
            .get_or_create(&OperationLabel {
                operation: operation.as_str(),
            })
            .inc();
    }

    fn on_rate_limit_wait(&self, operation: acs::Operation, waited: Duration) {
        self.acs_rate_limit_wait
            .get_or_create(&OperationLabel {
                operation: operation.as_str(),
            })
            .observe(waited.as_secs_f64());
    }

    fn on_api_version_fallback(&self, from: &'static str, to: &'static str) {
        let labels = ApiVersionFallbackLabels { from, to };
        self.acs_api_version_fallbacks.get_or_create(&labels).inc();
    }

    fn on_possible_orphan(&self) {
        self.acs_possible_orphans.inc();
    }

    fn on_called_back(&self, operation: acs::Operation, came_back_after: Duration) {
        self.acs_called_back_claim
            .get_or_create(&OperationLabel {
                operation: operation.as_str(),
            })
            .observe(came_back_after.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use acs::Observer as _;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::crd::CommunicationIdentityStatus;

    fn resource(expires_on: Option<i64>, deleting: bool) -> CommunicationIdentity {
        let mut resource: CommunicationIdentity = serde_json::from_value(serde_json::json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentity",
            "metadata": { "name": "chat", "namespace": "team-a" },
            "spec": { "connectionSecretRef": { "name": "acs" }, "scopes": ["chat"] },
        }))
        .unwrap();
        resource.status = Some(CommunicationIdentityStatus {
            token_expires_on: expires_on.map(|s| Time(jiff::Timestamp::from_second(s).unwrap())),
            ..Default::default()
        });
        if deleting {
            resource.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        }
        resource
    }

    const EXPIRY_SERIES: &str = "acs_identity_operator_token_expiration_timestamp_seconds{namespace=\"team-a\",name=\"chat\"}";

    #[test]
    fn expiry_gauge_follows_status_and_goes_with_deletion() {
        let metrics = Metrics::default();
        metrics.observe_resource(&resource(Some(1_800_000_000), false));
        assert!(
            metrics
                .encode()
                .contains(&format!("{EXPIRY_SERIES} 1800000000.0"))
        );
        metrics.observe_resource(&resource(Some(1_800_000_000), true));
        assert!(!metrics.encode().contains(EXPIRY_SERIES));
        metrics.observe_resource(&resource(Some(1_800_000_000), false));
        metrics.observe_resource(&resource(None, false));
        assert!(!metrics.encode().contains(EXPIRY_SERIES));
    }

    #[test]
    fn queue_series_stay_bounded_however_many_endpoints() {
        let at = |second| jiff::Timestamp::from_second(1_800_000_000 + second).unwrap();
        let queues: Vec<acs::ratelimit::QueueSnapshot> = (0..25)
            .map(|i| acs::ratelimit::QueueSnapshot {
                endpoint: format!("https://r{i:02}.communication.azure.com"),
                waiting: i,
                oldest_deadline: Some(at(-(i as i64))),
                circuit_open: i % 2 == 0,
            })
            .collect();
        let series = bounded_series(queues);
        assert_eq!(series.len(), MAX_ENDPOINT_SERIES + 1);
        assert_eq!(series[0].endpoint, "https://r24.communication.azure.com");
        assert_eq!(series[0].waiting, 24);
        let other = series.last().unwrap();
        // r00..=r14 folded: 0 + 1 + … + 14 waiting, r14's deadline the earliest, 8 open.
        assert_eq!(
            *other,
            QueueSeries {
                endpoint: "other".into(),
                waiting: 105,
                oldest_deadline: Some(at(-14)),
                open: 8,
            }
        );
        let long = acs::ratelimit::QueueSnapshot {
            endpoint: format!("https://{}.example", "a".repeat(500)),
            waiting: 1,
            oldest_deadline: None,
            circuit_open: false,
        };
        assert!(bounded_series(vec![long])[0].endpoint.len() <= MAX_ENDPOINT_LABEL + 4);
    }

    #[test]
    fn counters_carry_bounded_labels() {
        let metrics = Metrics::default();
        metrics.reconciled(Duration::from_millis(20), None);
        metrics.reconciled(Duration::from_millis(20), Some("kube"));
        metrics.failure("AuthenticationFailed");
        metrics.on_request(
            acs::Operation::IssueToken,
            acs::RequestOutcome::Status(429),
            Duration::from_millis(3),
        );
        metrics.on_throttled(acs::Operation::IssueToken);
        metrics.on_rate_limit_wait(acs::Operation::IssueToken, Duration::from_millis(40));
        let text = metrics.encode();
        for line in [
            "acs_identity_operator_reconciles_total 2",
            "acs_identity_operator_reconcile_errors_total{kind=\"kube\"} 1",
            "acs_identity_operator_reconcile_duration_seconds_count 2",
            "acs_identity_operator_failures_total{reason=\"AuthenticationFailed\"} 1",
            "acs_identity_operator_acs_requests_total{operation=\"issue_token\",status=\"429\"} 1",
            "acs_identity_operator_acs_request_duration_seconds_count{operation=\"issue_token\"} 1",
            "acs_identity_operator_acs_throttled_total{operation=\"issue_token\"} 1",
            "acs_identity_operator_acs_throttled_total{operation=\"create_identity\"} 0",
            "acs_identity_operator_acs_rate_limit_wait_seconds_count{operation=\"issue_token\"} 1",
            "acs_identity_operator_leader 0",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
    }
}
