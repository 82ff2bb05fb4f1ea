//! What every reconcile shares: the Kubernetes client, the Event recorders, the ACS clients,
//! the metrics and the clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acs::{AcsClient, ApiVersionPolicy, ClientOptions, ConnectionString, EndpointPolicy};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;

use crate::cached::CachedIdentity;
use crate::connection::{ConnectionSource, SourceAuth, WorkloadIdentitySource};
use crate::crd::ConnectionSecretRef;
use crate::held::HeldTokens;
use crate::known_secrets::KnownSecrets;
use crate::metrics::Metrics;
use crate::own_writes::OwnWrites;
use crate::status::Failure;
use crate::turns::Turns;
use crate::wakeups::Wakeups;

/// Settings from the command line that shape how ACS is reached.
#[derive(Clone, Default)]
pub struct AcsSettings {
    /// Extra CA certificates (PEM) to trust for ACS endpoints outside Azure's own domains.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Accept `http://` endpoints (local development against the emulator only).
    pub allow_http: bool,
    /// The endpoint hosts a connection string may name (`--acs-endpoint-suffixes`).
    pub endpoint_policy: EndpointPolicy,
    /// Requests per ACS resource the client-side rate limiter admits.
    pub quota: acs::Quota,
    /// The operator's own namespace: a ClusterAcsConnection's Secret is there unless it names
    /// another.
    pub operator_namespace: String,
}

pub struct Context {
    pub client: Client,
    pub events: Events,
    pub acs: AcsClients,
    pub connection_secrets: RecentSecrets,
    /// Tokens issued but not yet recorded (see [`HeldTokens`]).
    pub held_tokens: HeldTokens,
    /// What is known of the token Secrets without reading them.
    pub known_secrets: KnownSecrets,
    /// The operator's writes to CommunicationIdentities not yet in the cache.
    pub own_writes: OwnWrites,
    /// The controller's cache of CommunicationIdentities.
    pub identities: Store<CachedIdentity>,
    pub metrics: Arc<Metrics>,
    /// Calls a resource back when its turn for an ACS budget comes.
    pub turns: Turns,
    /// When each resource's next refresh is due.
    pub wakeups: Wakeups,
    clock: Box<dyn Fn() -> Timestamp + Send + Sync>,
}

impl Context {
    /// The client of a connection's workload identity (`via` names the connection), its
    /// federated token requested with the operator's own API client.
    pub fn workload_identity_client(
        &self,
        identity: &WorkloadIdentitySource,
        api_version: ApiVersionPolicy,
        via: &str,
    ) -> Result<AcsClient, Failure> {
        let federated_token = || {
            crate::federated_token::federated_token(
                identity,
                self.client.clone(),
                self.metrics.clone(),
            )
        };
        (self.acs).client_for_workload_identity((identity, api_version), via, federated_token)
    }

    pub fn new(
        client: Client,
        reporter: Reporter,
        settings: AcsSettings,
        metrics: Arc<Metrics>,
        identities: Store<CachedIdentity>,
        turns: Turns,
    ) -> Self {
        Self {
            events: Events::new(client.clone(), reporter),
            client,
            acs: AcsClients::new(settings, metrics.clone()),
            connection_secrets: RecentSecrets::default(),
            held_tokens: HeldTokens::default(),
            known_secrets: KnownSecrets::default(),
            own_writes: OwnWrites::default(),
            identities,
            metrics,
            turns,
            wakeups: Wakeups::default(),
            clock: Box::new(Timestamp::now),
        }
    }

    /// The same context reading time from `clock` (tests run the reconcile at chosen times).
    pub fn with_clock(mut self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }
}

/// Where the reconcile's Events go: kube's `Recorder`, in two ways. A Warning goes through one
/// shared Recorder, which folds a warning repeated within 6 minutes (a failure retried with
/// backoff) into one Event series, and so keeps every Event it posted for those 6 minutes. A
/// Normal Event (an identity created, a token refreshed) reports a change that does not repeat,
/// so it goes through a Recorder of its own, dropped once it has posted: a burst of 10,000
/// creations would otherwise keep 10,000 Events in memory for 6 minutes.
pub struct Events {
    client: Client,
    reporter: Reporter,
    warnings: Recorder,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            warnings: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
        }
    }

    /// The Recorder to publish an Event of `type_` with.
    pub fn recorder(&self, type_: EventType) -> Recorder {
        match type_ {
            EventType::Warning => self.warnings.clone(),
            EventType::Normal => Recorder::new(self.client.clone(), self.reporter.clone()),
        }
    }
}

/// Connection Secrets as read from the API server in the last [`RecentSecrets::FOR`]: a burst
/// of creations in one namespace shares one read instead of one each (an API request is most of
/// what an identity costs). Shorter than the shortest retry after a connection failure (15 s),
/// so a fixed Secret is always read afresh by that retry. Only Secrets carrying the operator's
/// finalizer are kept, and releasing one forgets it.
#[derive(Default)]
pub struct RecentSecrets {
    by_name: Mutex<HashMap<NamespacedName, (Instant, Arc<Secret>)>>,
    /// One gate per connection Secret a pass is holding right now (see [`Self::hold_gate`]).
    hold_gates: Mutex<HashMap<NamespacedName, Arc<tokio::sync::Mutex<()>>>>,
}

/// namespace, name.
type NamespacedName = (String, String);

impl RecentSecrets {
    pub const FOR: Duration = Duration::from_secs(5);

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        let by_name = self.by_name.lock().expect("connection Secret cache lock");
        let (read_at, secret) = by_name.get(&(namespace.to_owned(), name.to_owned()))?;
        (read_at.elapsed() < Self::FOR).then(|| secret.clone())
    }

    pub fn remember(&self, namespace: &str, secret: Arc<Secret>) {
        let mut by_name = self.by_name.lock().expect("connection Secret cache lock");
        // Expired entries go on every write, so the map holds at most what was read lately.
        by_name.retain(|_, (read_at, _)| read_at.elapsed() < Self::FOR);
        let name = secret.metadata.name.clone().unwrap_or_default();
        by_name.insert((namespace.to_owned(), name), (Instant::now(), secret));
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        let mut by_name = self.by_name.lock().expect("connection Secret cache lock");
        by_name.remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// How long a pass waits at [`Self::hold_gate`]: a patch takes far less, and one that stalls
    /// (up to the 30-s timeout of every Kubernetes call) must not hold the passes behind it one
    /// after another. After this a pass patches on its own: at worst refused with 409, it then
    /// reads the Secret again.
    pub const GATE_PATIENCE: Duration = Duration::from_secs(2);

    /// Waits until no other pass of this process is putting the finalizer on this Secret, for at
    /// most [`Self::GATE_PATIENCE`] (then `None`): the first passes of a burst read it before any
    /// of them held it, and would each patch it (all but one refused with 409). Behind the gate,
    /// the Secret the first one remembered serves.
    pub async fn hold_gate(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let gate = {
            let mut gates = self.hold_gates.lock().expect("connection Secret gate lock");
            // A gate nobody waits on or holds is only its map entry: at most the Secrets being
            // held at this moment stay.
            gates.retain(|_, gate| Arc::strong_count(gate) > 1);
            let key = (namespace.to_owned(), name.to_owned());
            gates.entry(key).or_default().clone()
        };
        tokio::time::timeout(Self::GATE_PATIENCE, gate.lock_owned())
            .await
            .ok()
    }
}

/// The longest one ACS call of a reconcile may take, retries included: an endpoint that stalls
/// or asks for long waits holds a reconcile worker no longer (the failure is recorded and
/// retried with backoff instead).
const ACS_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// ACS clients by connection Secret, rebuilt when the Secret's connection string changes, so a
/// fixed or rotated key takes effect on the next ACS call without a restart. All clients of
/// one endpoint share that endpoint's rate limiter (see `acs::RateLimits::for_endpoint`).
/// Clients unused for [`AcsClients::IDLE`] are dropped, so connection strings a tenant cycles
/// through do not pile up.
pub struct AcsClients {
    settings: AcsSettings,
    /// Counts every client's requests, throttling and rate-limiter waits.
    observer: Arc<dyn acs::Observer>,
    by_secret: Mutex<HashMap<SecretKey, CachedClient>>,
    /// Workload-identity clients by everything they are built from; each holds its Entra
    /// token, renewed before it expires.
    by_identity: Mutex<HashMap<(WorkloadIdentitySource, ApiVersionPolicy), (AcsClient, Instant)>>,
}

/// namespace, Secret name, key in the Secret.
type SecretKey = (String, String, String);

struct CachedClient {
    connection_text: String,
    api_version: ApiVersionPolicy,
    endpoint: String,
    client: AcsClient,
    used_at: Instant,
}

impl AcsClients {
    /// Longer than the longest wait between two ACS calls of one resource that is not failing
    /// for good (a refresh is planned at most a day ahead, but calls of one Secret's users come
    /// far more often); a client dropped too early only costs a rebuild.
    pub const IDLE: Duration = Duration::from_secs(30 * 60);

    fn new(settings: AcsSettings, observer: Arc<dyn acs::Observer>) -> Self {
        Self {
            settings,
            observer,
            by_secret: Mutex::default(),
            by_identity: Mutex::default(),
        }
    }

    fn client_options(&self, api_version: ApiVersionPolicy) -> ClientOptions {
        ClientOptions {
            api_version,
            extra_ca_pem: self.settings.extra_ca_pem.clone(),
            allow_http: self.settings.allow_http,
            endpoint_policy: self.settings.endpoint_policy.clone(),
            observer: self.observer.clone(),
            quota: self.settings.quota,
            retry: acs::RetryPolicy {
                deadline: Some(ACS_CALL_DEADLINE),
                ..acs::RetryPolicy::default()
            },
            ..ClientOptions::default()
        }
    }

    /// The client for the connection string in `secret` (already read by the caller from
    /// `reference` in `namespace`, named by the connection `via`). Failures name the Secret
    /// and key, never the key's value.
    pub fn client_for_key(
        &self,
        (namespace, reference): (&str, &ConnectionSecretRef),
        source: &ConnectionSource,
        secret: Option<&Secret>,
    ) -> Result<(AcsClient, String), Failure> {
        let via = source.via.as_ref();
        let not_found = || Failure::ConnectionSecretNotFound {
            secret: reference.name.clone(),
            key: reference.key.clone(),
            via: via.cloned(),
        };
        let secret = secret.ok_or_else(not_found)?;
        let text = secret
            .data
            .as_ref()
            .and_then(|data| data.get(&reference.key))
            .and_then(|value| String::from_utf8(value.0.clone()).ok())
            .ok_or_else(|| Failure::ConnectionSecretKeyMissing {
                secret: reference.name.clone(),
                key: reference.key.clone(),
                via: via.cloned(),
            })?;
        let cache_key = (
            namespace.to_owned(),
            reference.name.clone(),
            reference.key.clone(),
        );
        let mut cache = self.by_secret.lock().expect("ACS client cache lock");
        if let Some(cached) = cache.get_mut(&cache_key)
            && cached.connection_text == text
            && cached.api_version == source.api_version
        {
            cached.used_at = Instant::now();
            return Ok((cached.client.clone(), cached.endpoint.clone()));
        }
        let connection =
            ConnectionString::parse(&text, self.settings.allow_http).map_err(|error| {
                Failure::InvalidConnectionString {
                    secret: reference.name.clone(),
                    key: reference.key.clone(),
                    error,
                }
            })?;
        let endpoint = connection.endpoint.clone();
        let options = self.client_options(source.api_version);
        let client = AcsClient::new(connection, options).map_err(|error| match error {
            acs::BuildError::EndpointNotAllowed { host } => Failure::EndpointNotAllowed {
                named_by: format!("the connection string in Secret {:?}", reference.name),
                host,
            },
            other => Failure::AcsUnavailable {
                detail: other.to_string(),
            },
        })?;
        cache.retain(|_, cached| cached.used_at.elapsed() < Self::IDLE);
        cache.insert(
            cache_key,
            CachedClient {
                connection_text: text,
                api_version: source.api_version,
                endpoint: endpoint.clone(),
                client: client.clone(),
                used_at: Instant::now(),
            },
        );
        Ok((client, endpoint))
    }

    /// The client of `source`, the connection `via` names; `federated_token` is called only
    /// when no client of `source` is cached.
    pub fn client_for_workload_identity(
        &self,
        (source, api_version): (&WorkloadIdentitySource, ApiVersionPolicy),
        via: &str,
        federated_token: impl FnOnce() -> Arc<dyn acs::FederatedToken>,
    ) -> Result<AcsClient, Failure> {
        let key = (source.clone(), api_version);
        let mut cache = self.by_identity.lock().expect("ACS client cache lock");
        if let Some((client, used_at)) = cache.get_mut(&key) {
            *used_at = Instant::now();
            return Ok(client.clone());
        }
        let identity = acs::WorkloadIdentity {
            tenant_id: source.tenant_id.clone(),
            client_id: source.client_id.clone(),
            authority_host: source.authority_host.clone(),
            federated_token: federated_token(),
        };
        let credential = acs::Credential::WorkloadIdentity(identity);
        let client = AcsClient::with_credential(
            &source.endpoint,
            credential,
            self.client_options(api_version),
        )
        .map_err(|error| match error {
            acs::BuildError::EndpointNotAllowed { host } => Failure::EndpointNotAllowed {
                named_by: format!("spec.endpoint of {via}"),
                host,
            },
            other => Failure::WorkloadIdentityUnusable {
                connection: via.to_owned(),
                detail: other.to_string(),
            },
        })?;
        cache.retain(|_, (_, used_at)| used_at.elapsed() < Self::IDLE);
        cache.insert(key, (client.clone(), Instant::now()));
        Ok(client)
    }

    /// The api-version of the cached client of `source`, if there is one.
    pub fn cached_api_version(&self, source: &ConnectionSource) -> Option<&'static str> {
        match &source.auth {
            SourceAuth::AccessKey { namespace, secret } => {
                let key = (namespace.clone(), secret.name.clone(), secret.key.clone());
                let cache = self.by_secret.lock().expect("ACS client cache lock");
                let cached = cache.get(&key)?;
                Some(cached.client.api_version())
                    .filter(|_| cached.api_version == source.api_version)
            }
            SourceAuth::WorkloadIdentity(identity) => {
                let key = (identity.clone(), source.api_version);
                let cache = self.by_identity.lock().expect("ACS client cache lock");
                cache.get(&key).map(|(client, _)| client.api_version())
            }
        }
    }

    /// Where a ClusterAcsConnection's Secret is unless it names a namespace.
    pub fn operator_namespace(&self) -> &str {
        &self.settings.operator_namespace
    }

    /// Drops the clients of a connection Secret no resource uses any more.
    pub fn forget(&self, namespace: &str, secret_name: &str) {
        let mut cache = self.by_secret.lock().expect("ACS client cache lock");
        cache.retain(|(ns, name, _), _| ns != namespace || name != secret_name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str) -> Arc<Secret> {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.to_owned());
        Arc::new(secret)
    }

    #[test]
    fn a_connection_secret_is_remembered_per_namespace_until_forgotten() {
        let recent = RecentSecrets::default();
        assert!(recent.get("team-a", "acs").is_none());
        recent.remember("team-a", secret("acs"));
        assert!(recent.get("team-a", "acs").is_some());
        assert!(recent.get("team-b", "acs").is_none());
        assert!(recent.get("team-a", "other").is_none());
        recent.forget("team-a", "acs");
        assert!(recent.get("team-a", "acs").is_none());
    }
}
