//! Fixtures for the reconcile-level tests (`reconcile_tests.rs`), after kube-rs's
//! controller-rs: the kube `Client` talks to a `tower_test` mock, and a test steps through the
//! requests it expects a pass to make, checking each one's method, path, query (field manager,
//! `force`, selectors) and body, and answering from a small in-memory copy of the cluster. ACS
//! is the in-process emulator, reached over loopback HTTP; the operator and the emulator read
//! one manual clock.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use acs_emulator::{Clock, Emulator, Limits, ManualClock, SigningKey};
use futures::FutureExt;
use http::{Method, Request, Response, StatusCode};
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::core::{PartialObjectMeta, PartialObjectMetaExt};
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;

use crate::cached::CachedIdentity;
use crate::context::{AcsSettings, Context};
use crate::crd::{
    CONNECTION_SECRET_FINALIZER, CREATE_ATTEMPTED_ANNOTATION, CommunicationIdentity,
    CommunicationIdentityStatus, FIELD_MANAGER, FINALIZER, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
};
use crate::kube_call::Error;
use crate::reconcile::reconcile;
use crate::turns::Turns;
use futures::channel::mpsc::UnboundedReceiver;
use kube::runtime::reflector::ObjectRef;

pub const NAMESPACE: &str = "chat-app";
pub const NAME: &str = "alice";
/// The resource's UID, which is also its identity's customId in ACS.
pub const UID: &str = "7f9c2a4e-0000-4000-8000-000000000001";
pub const CONNECTION_SECRET: &str = "acs-connection";
/// The operator's own namespace, where a ClusterAcsConnection's Secret is by default.
pub const OPERATOR_NAMESPACE: &str = "acs-system";
/// The default Secret name, `<metadata.name>-acs-token`.
pub const TOKEN_SECRET: &str = "alice-acs-token";
pub const NORMAL: &str = "Normal";
pub const WARNING: &str = "Warning";

/// How long a test waits for the pass's next request, or for its end, before it fails: well
/// beyond the ACS client's own retries of a 5xx (at most 3.5 s of backoff).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The emulator's access key (base64 of 32 bytes), in the connection Secret.
const ACCESS_KEY: &str = "cmVjb25jaWxlLXRlc3RzLWVtdWxhdG9yLWtleS0zMmI=";
/// Another valid key, which the emulator rejects (401).
const WRONG_ACCESS_KEY: &str = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMzI=";

/// A CommunicationIdentity as a user just applied it (no finalizer, no status), with `spec`'s
/// fields on top of `scopes: [chat, voip]` and the connection Secret reference.
pub fn identity(spec: Value) -> CommunicationIdentity {
    let mut full = json!({
        "connectionSecretRef": { "name": CONNECTION_SECRET },
        "scopes": ["chat", "voip"],
    });
    full.as_object_mut()
        .expect("an object")
        .extend(spec.as_object().expect("spec fields").clone());
    serde_json::from_value(json!({
        "apiVersion": "acs-operator.io/v1alpha1",
        "kind": "CommunicationIdentity",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": UID,
            "resourceVersion": "1",
            "generation": 1,
        },
        "spec": full,
    }))
    .expect("a valid CommunicationIdentity")
}

/// As [`identity`], naming the connection `kind` `name` (spec.connectionRef) instead of the
/// connection Secret.
pub fn identity_via(kind: &str, name: &str) -> CommunicationIdentity {
    let mut identity = identity(json!({}));
    identity.spec.connection_secret_ref = None;
    let reference = json!({ "kind": kind, "name": name });
    identity.spec.connection_ref = Some(serde_json::from_value(reference).expect("a kind"));
    identity
}

/// As [`identity`], with named `tokens` (spec.tokens) instead of spec.scopes.
pub fn identity_with_tokens(tokens: Value) -> CommunicationIdentity {
    let mut identity = identity(json!({}));
    identity.spec.scopes.clear();
    identity.spec.tokens = serde_json::from_value(tokens).expect("valid spec.tokens");
    identity
}

/// Another CommunicationIdentity of the namespace, as the controller's cache holds it.
pub fn other_identity(name: &str, uid: &str, spec: Value) -> CommunicationIdentity {
    let mut other = identity(spec);
    other.metadata.name = Some(name.to_owned());
    other.metadata.uid = Some(uid.to_owned());
    other
        .finalizers_mut()
        .push(crate::crd::FINALIZER.to_owned());
    other
}

/// A Secret named like the resource's token Secret that someone else made: no ownerReference.
pub fn foreign_secret() -> Secret {
    let mut secret = secret_with(TOKEN_SECRET, &[("token", "someone else's")]);
    secret.metadata.resource_version = Some("7".into());
    secret
}

fn secret_with(name: &str, data: &[(&str, &str)]) -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some(name.to_owned());
    secret.metadata.namespace = Some(NAMESPACE.to_owned());
    secret.data = Some(
        data.iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
            .collect(),
    );
    secret
}

/// The text under `key` in a Secret.
pub fn secret_value(secret: &Secret, key: &str) -> String {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .unwrap_or_else(|| panic!("the Secret has no key {key:?}"));
    String::from_utf8(bytes.0.clone()).expect("UTF-8")
}

/// The keys of a Secret's data, sorted.
pub fn secret_keys(secret: &Secret) -> Vec<String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect()
}

/// `secret` as a metadata watch delivers it.
fn secret_metadata(secret: &Secret) -> PartialObjectMeta<Secret> {
    secret.metadata.clone().into_response_partial()
}

/// What the mock API server holds: the objects a pass reads and writes. Every write gets the
/// next resourceVersion, as etcd's revision counter gives it.
pub struct Cluster {
    pub identity: CommunicationIdentity,
    pub connection_secret: Option<Secret>,
    pub token_secret: Option<Secret>,
    last_resource_version: u64,
}

impl Cluster {
    pub fn next_resource_version(&mut self) -> String {
        self.last_resource_version += 1;
        self.last_resource_version.to_string()
    }

    /// `kubectl delete`: the API server sets deletionTimestamp and keeps the object while it
    /// has finalizers.
    pub fn delete_identity(&mut self, at: Timestamp) {
        self.identity.metadata.deletion_timestamp = Some(Time(at));
        self.identity.metadata.resource_version = Some(self.next_resource_version());
    }

    /// `kubectl edit` of the spec: a new generation and resourceVersion.
    pub fn edit_spec(&mut self, edit: impl FnOnce(&mut crate::crd::CommunicationIdentitySpec)) {
        edit(&mut self.identity.spec);
        self.identity.metadata.generation = self.identity.metadata.generation.map(|g| g + 1);
        self.identity.metadata.resource_version = Some(self.next_resource_version());
    }

    /// `kubectl annotate`: a new resourceVersion, the generation unchanged.
    pub fn annotate(&mut self, key: &str, value: &str) {
        self.identity
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(key.to_owned(), value.to_owned());
        self.identity.metadata.resource_version = Some(self.next_resource_version());
    }

    /// Whether the API server still has the resource (a deleted one goes with its last finalizer).
    fn identity_exists(&self) -> bool {
        self.identity.metadata.deletion_timestamp.is_none()
            || !self.identity.finalizers().is_empty()
    }
}

/// The in-process ACS emulator, and what reached it.
pub struct Acs {
    emulator: Emulator,
    admin: reqwest::Client,
    /// The counts `calls` reported so far, so that each call reports only what is new.
    reported: BTreeMap<String, u64>,
}

impl Acs {
    async fn start(clock: Arc<ManualClock>, limits: Limits) -> Self {
        // Generating the RSA token-signing key takes a while; every test's emulator shares one.
        static SIGNING_KEY: OnceLock<SigningKey> = OnceLock::new();
        let key = SIGNING_KEY
            .get_or_init(|| SigningKey::generate().expect("a signing key"))
            .clone();
        let mut config =
            acs_emulator::Config::new(acs::AccessKey::from_base64(ACCESS_KEY).expect("a key"));
        config.admin = true;
        config.settings.limits = limits;
        config.signing_key = Some(key);
        config.clock = clock;
        let emulator = acs_emulator::start(config)
            .await
            .expect("the emulator starts");
        Self {
            emulator,
            admin: reqwest::Client::new(),
            reported: BTreeMap::new(),
        }
    }

    pub fn connection_string(&self) -> String {
        self.emulator.connection_string()
    }

    /// The connection string with a key the emulator does not know.
    pub fn connection_string_with_wrong_key(&self) -> String {
        format!(
            "endpoint={}/;accesskey={WRONG_ACCESS_KEY}",
            self.emulator.endpoint()
        )
    }

    /// The endpoint as the Secret's `endpoint` key holds it.
    pub fn endpoint(&self) -> String {
        self.emulator.endpoint()
    }

    fn admin_url(&self, path: &str) -> String {
        format!("{}/_emulator/{path}", self.emulator.endpoint())
    }

    /// The ACS requests that reached the emulator since the last look, as `"operation status"`,
    /// one entry per request (sorted by operation, then status).
    pub async fn calls(&mut self) -> Vec<String> {
        let stats: Value = self
            .admin
            .get(self.admin_url("stats"))
            .send()
            .await
            .expect("the emulator's stats")
            .json()
            .await
            .expect("stats are JSON");
        let mut calls = Vec::new();
        for (operation, by_status) in stats["requests"].as_object().expect("requests") {
            for (status, count) in by_status.as_object().expect("counts by status") {
                let key = format!("{operation} {status}");
                let count = count.as_u64().expect("a count");
                let new = count - self.reported.get(&key).copied().unwrap_or(0);
                calls.extend(std::iter::repeat_n(key.clone(), new as usize));
                self.reported.insert(key, count);
            }
        }
        calls
    }

    /// What the emulator says of a token: `valid`, `revoked`, `deleted`, `expired`, ...
    pub async fn token_status(&self, token: &str) -> String {
        let verdict: Value = self
            .admin
            .post(self.admin_url("validate"))
            .json(&json!({ "token": token }))
            .send()
            .await
            .expect("the emulator validates")
            .json()
            .await
            .expect("a verdict");
        verdict["status"].as_str().expect("a status").to_owned()
    }

    /// Injects failures (`PATCH /_emulator/config {"faults": ...}`).
    pub async fn set_faults(&self, faults: Value) {
        let answer = self
            .admin
            .patch(self.admin_url("config"))
            .json(&json!({ "faults": faults }))
            .send()
            .await
            .expect("the emulator takes the config");
        assert!(answer.status().is_success(), "faults refused: {answer:?}");
    }

    /// A client of the test's own (no retries), for what happens in ACS outside the operator.
    pub fn client(&self) -> acs::AcsClient {
        let connection = acs::ConnectionString::parse(&self.connection_string(), true)
            .expect("the emulator's connection string");
        acs::AcsClient::new(
            connection,
            acs::ClientOptions {
                allow_http: true,
                endpoint_policy: loopback_only(),
                retry: acs::RetryPolicy::NEVER,
                ..acs::ClientOptions::default()
            },
        )
        .expect("a client")
    }
}

/// The emulator's address is the only endpoint the operator's (and the test's) clients accept.
fn loopback_only() -> acs::EndpointPolicy {
    acs::EndpointPolicy::from_list("127.0.0.1").expect("a suffix list")
}

type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Respond = tower_test::mock::SendResponse<Response<Body>>;

/// What one operator process holds: its Context (ACS clients, recent connection Secrets, held
/// tokens, the event recorder's cache) and the far end of its API connection.
struct Operator {
    ctx: Arc<Context>,
    api: ApiHandle,
    cache: Writer<CachedIdentity>,
    /// The passes the ACS queues called back, as the controller would run them.
    turn_triggers: UnboundedReceiver<ObjectRef<CachedIdentity>>,
}

impl Operator {
    fn start(clock: &Arc<ManualClock>) -> Self {
        let (service, api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NAMESPACE);
        let reporter = Reporter {
            controller: "acs-identity-operator".into(),
            instance: None,
        };
        let (store, cache) = reflector::store();
        let settings = AcsSettings {
            allow_http: true,
            endpoint_policy: loopback_only(),
            operator_namespace: OPERATOR_NAMESPACE.into(),
            ..AcsSettings::default()
        };
        let clock = clock.clone();
        let (turns, turn_triggers) = Turns::new();
        let ctx = Context::new(client, reporter, settings, Arc::default(), store, turns)
            .with_clock(move || clock.now());
        Self {
            ctx: Arc::new(ctx),
            api,
            cache,
            turn_triggers,
        }
    }
}

/// One request the pass made, read whole, and the means to answer it.
struct Call {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    /// The JSON body; `Null` when there is none.
    body: Value,
    respond: Respond,
}

impl Call {
    async fn read(request: Request<Body>, respond: Respond) -> Self {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("the request body");
        Self {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().expect("ASCII").to_owned()),
            body: match bytes.is_empty() {
                true => Value::Null,
                false => serde_json::from_slice(&bytes).expect("a JSON body"),
            },
            respond,
        }
    }

    fn describe(&self) -> String {
        format!("{} {} {:?}", self.method, self.path, self.query)
    }

    /// Checks the request line: method, path and the whole query.
    fn assert_is(&self, what: &str, method: Method, path: &str, query: &[(&str, &str)]) {
        let query: BTreeMap<String, String> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert!(
            self.method == method && self.path == path && self.query == query,
            "expected the {what} ({method} {path} {query:?}), got {}",
            self.describe()
        );
    }

    fn reply(self, code: StatusCode, body: &impl Serialize) {
        let body = serde_json::to_vec(body).expect("a JSON answer");
        let response = Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("a response");
        self.respond.send_response(response);
    }

    /// Answers with a metav1 Status, as the API server refuses a request.
    fn refuse(self, code: StatusCode, reason: &str, message: &str) {
        let status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        });
        self.reply(code, &status);
    }
}

/// The query of every server-side apply the operator makes.
const APPLY_QUERY: [(&str, &str); 2] = [("fieldManager", FIELD_MANAGER), ("force", "true")];
const APPLY_CONTENT_TYPE: &str = "application/apply-patch+yaml";
const MERGE_PATCH_CONTENT_TYPE: &str = "application/merge-patch+json";

fn identity_path() -> String {
    format!("/apis/acs-operator.io/v1alpha1/namespaces/{NAMESPACE}/communicationidentities/{NAME}")
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/secrets/{name}")
}

/// A test's world: the mock API server and its cluster, the emulator, the clock, the operator,
/// and the pass under way.
pub struct Harness {
    pub cluster: Cluster,
    pub acs: Acs,
    clock: Arc<ManualClock>,
    operator: Operator,
    pass: Option<JoinHandle<Result<Action, Error>>>,
}

impl Harness {
    /// `identity` in a namespace whose connection Secret holds the emulator's connection
    /// string; the emulator with its documented limits, the clock at the current second.
    pub async fn new(identity: CommunicationIdentity) -> Self {
        Self::start(identity, Limits::default(), whole_second(Timestamp::now())).await
    }

    /// As [`Harness::new`], with the emulator's `limits` and the clock at `clock_start`. The
    /// emulator checks the signature's date (the real time) against this clock: keep it within
    /// 15 minutes of real time.
    pub async fn start(
        identity: CommunicationIdentity,
        limits: Limits,
        clock_start: Timestamp,
    ) -> Self {
        let clock = Arc::new(ManualClock::new(clock_start));
        let acs = Acs::start(clock.clone(), limits).await;
        let mut connection_secret = secret_with(
            CONNECTION_SECRET,
            &[("connectionString", &acs.connection_string())],
        );
        connection_secret.metadata.resource_version = Some("1".into());
        Self {
            cluster: Cluster {
                identity,
                connection_secret: Some(connection_secret),
                token_secret: None,
                last_resource_version: 1,
            },
            acs,
            operator: Operator::start(&clock),
            clock,
            pass: None,
        }
    }

    /// The time the operator and the emulator read.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn set_clock(&self, to: Timestamp) {
        self.clock.set(to);
    }

    /// A new operator process: nothing kept in memory (held tokens, recent connection Secrets,
    /// ACS clients, the event recorder's cache) survives. A later pass of a real operator comes
    /// hours after the previous one, when the 5-second cache of connection Secrets is long
    /// gone; a restart gives the test that state whatever its own speed.
    pub fn restart(&mut self) {
        assert!(self.pass.is_none(), "restart between passes only");
        self.operator = Operator::start(&self.clock);
    }

    /// Puts `text` into the connection Secret, under the default key.
    pub fn set_connection_string(&mut self, text: &str) {
        let secret = self
            .cluster
            .connection_secret
            .as_mut()
            .expect("a connection Secret");
        secret.data.get_or_insert_default().insert(
            "connectionString".into(),
            ByteString(text.as_bytes().to_vec()),
        );
    }

    /// How many passes the ACS queues called back since the last look.
    pub fn turns_called(&mut self) -> usize {
        std::iter::from_fn(|| self.operator.turn_triggers.try_recv().ok()).count()
    }

    /// Puts `other` into the controller's cache of CommunicationIdentities.
    pub fn cache(&mut self, other: CommunicationIdentity) {
        self.operator
            .cache
            .apply_watcher_event(&watcher::Event::Apply(other.into()));
    }

    /// The operator's metadata watch of its Secrets lists what the API server holds.
    pub fn watch_lists_secrets(&self) {
        let known = &self.operator.ctx.known_secrets;
        known.observe(&watcher::Event::Init);
        if let Some(secret) = &self.cluster.token_secret {
            known.observe(&watcher::Event::InitApply(secret_metadata(secret)));
        }
        known.observe(&watcher::Event::InitDone);
    }

    /// The watch delivers the token Secret as the API server holds it now.
    pub fn watch_delivers_token_secret(&self) {
        let secret = self.cluster.token_secret.as_ref().expect("the Secret");
        let event = watcher::Event::Apply(secret_metadata(secret));
        self.operator.ctx.known_secrets.observe(&event);
    }

    /// The watch relists (after a break, or in a replica that just took over): what the
    /// operator knew of its own writes in flight is gone.
    pub fn watch_relists_identities(&self) {
        let writes = &self.operator.ctx.own_writes;
        writes.observe(&watcher::Event::<CachedIdentity>::Init);
    }

    /// When the resource's next pass is due, as its last pass set it.
    pub fn wakeup(&self) -> Option<Timestamp> {
        self.operator.ctx.wakeups.due(UID)
    }

    /// Starts a pass on the resource as the API server has it now (as the watch delivered it).
    pub fn start_pass(&mut self) {
        self.start_pass_from(self.cluster.identity.clone());
    }

    /// Starts a pass on `seen`, the resource as the controller's cache has it.
    pub fn start_pass_from(&mut self, seen: CommunicationIdentity) {
        assert!(self.pass.is_none(), "one pass at a time");
        self.cache(seen.clone());
        let ctx = self.operator.ctx.clone();
        self.pass = Some(tokio::spawn(reconcile(Arc::new(seen), ctx)));
    }

    /// Waits for the pass to end, failing on any request it makes meanwhile; then checks that
    /// no request is left unanswered.
    pub async fn finish_pass(&mut self) -> Action {
        let mut pass = self.pass.take().expect("a pass under way");
        let ended = tokio::select! {
            ended = &mut pass => ended.expect("the pass panicked"),
            request = self.operator.api.next_request() => {
                let (request, respond) = request.expect("the API connection is open");
                let call = Call::read(request, respond).await;
                panic!("unexpected request after the expected ones: {}", call.describe());
            }
            () = tokio::time::sleep(STEP_TIMEOUT) => panic!("the pass did not end within {STEP_TIMEOUT:?}"),
        };
        if let Some(Some((request, _))) = self.operator.api.next_request().now_or_never() {
            panic!("unexpected request: {} {}", request.method(), request.uri());
        }
        ended.unwrap_or_else(|error| panic!("the pass failed: {error}"))
    }

    /// The pass's next request; fails the test if the pass ends first or makes none in time.
    async fn next(&mut self, what: &str) -> Call {
        let pass = self.pass.as_mut().expect("a pass under way");
        tokio::select! {
            request = self.operator.api.next_request() => {
                let (request, respond) = request.expect("the API connection is open");
                Call::read(request, respond).await
            }
            ended = pass => panic!("the pass ended ({ended:?}) before the {what}"),
            () = tokio::time::sleep(STEP_TIMEOUT) => panic!("no {what} within {STEP_TIMEOUT:?}"),
        }
    }

    /// The merge patch that sets the resource's finalizers to `expected`, guarded by its
    /// resourceVersion.
    pub async fn expect_identity_finalizer_patch(&mut self, expected: &[&str]) {
        self.expect_identity_patch(expected, false).await;
    }

    /// The patch before the first ACS create: the finalizer and the create-attempted mark,
    /// guarded by the resourceVersion.
    pub async fn expect_finalizer_and_create_mark(&mut self) {
        self.expect_identity_patch(&[FINALIZER], true).await;
    }

    async fn expect_identity_patch(&mut self, expected: &[&str], create_mark: bool) {
        let call = self.next("finalizer patch of the resource").await;
        call.assert_is("finalizer patch", Method::PATCH, &identity_path(), &[]);
        let rv = self.cluster.next_resource_version();
        let identity = &mut self.cluster.identity;
        let mut body = call.body.clone();
        let annotations = body["metadata"]
            .as_object_mut()
            .and_then(|metadata| metadata.remove("annotations"));
        let marked = annotations
            .as_ref()
            .and_then(|a| a.get(CREATE_ATTEMPTED_ANNOTATION))
            .is_some_and(|v| v == "true");
        assert_eq!(marked, create_mark, "the create mark in {:?}", call.body);
        let bare = Call { body, ..call };
        assert_finalizer_patch(&bare, identity.resource_version(), expected);
        let call = bare;
        if create_mark {
            identity
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(CREATE_ATTEMPTED_ANNOTATION.to_owned(), "true".to_owned());
        }
        identity.metadata.finalizers = Some(expected.iter().map(|f| (*f).to_owned()).collect());
        identity.metadata.resource_version = Some(rv);
        let answer = identity.clone();
        call.reply(StatusCode::OK, &answer);
    }

    /// The merge patch that sets the connection Secret's finalizers to `expected`, guarded by
    /// its resourceVersion.
    async fn next_connection_secret_finalizer_patch(&mut self) -> Call {
        let call = self.next("finalizer patch of the connection Secret").await;
        call.assert_is(
            "finalizer patch",
            Method::PATCH,
            &secret_path(CONNECTION_SECRET),
            &[],
        );
        call
    }

    pub async fn expect_connection_secret_finalizer_patch(&mut self, expected: &[&str]) {
        let call = self.next_connection_secret_finalizer_patch().await;
        let rv = self.cluster.next_resource_version();
        let secret = self
            .cluster
            .connection_secret
            .as_mut()
            .expect("a connection Secret to patch");
        assert_finalizer_patch(&call, secret.resource_version(), expected);
        secret.metadata.finalizers = Some(expected.iter().map(|f| (*f).to_owned()).collect());
        secret.metadata.resource_version = Some(rv);
        let answer = secret.clone();
        call.reply(StatusCode::OK, &answer);
    }

    /// The finalizer patch of the connection Secret, refused with 409: another pass held the
    /// Secret first (its finalizer and a new resourceVersion are on it now).
    pub async fn refuse_connection_secret_finalizer_patch_held_meanwhile(&mut self) {
        let call = self.next_connection_secret_finalizer_patch().await;
        self.connection_secret_held_elsewhere();
        call.refuse(
            StatusCode::CONFLICT,
            "Conflict",
            "Operation cannot be fulfilled on secrets: the object has been modified",
        );
    }

    /// Another pass of this process starts putting its finalizer on the connection Secret:
    /// until the gate is handed to [`Harness::other_pass_held_connection_secret`], a pass that
    /// would hold it waits.
    pub async fn other_pass_holds_connection_secret(&self) -> OwnedMutexGuard<()> {
        let recent = &self.operator.ctx.connection_secrets;
        let gate = recent.hold_gate(NAMESPACE, CONNECTION_SECRET).await;
        gate.expect("no pass holds the gate yet")
    }

    /// That other pass held the connection Secret (its finalizer and a new resourceVersion are
    /// on it, as the operator remembers it) and lets the gate go.
    pub fn other_pass_held_connection_secret(&mut self, gate: OwnedMutexGuard<()>) {
        let held = self.connection_secret_held_elsewhere();
        let recent = &self.operator.ctx.connection_secrets;
        recent.remember(NAMESPACE, Arc::new(held));
        drop(gate);
    }

    /// Another pass put the operator's finalizer on the connection Secret (with a new
    /// resourceVersion); returns the Secret as it is now.
    fn connection_secret_held_elsewhere(&mut self) -> Secret {
        let rv = self.cluster.next_resource_version();
        let secret = (self.cluster.connection_secret.as_mut()).expect("a connection Secret");
        secret.metadata.finalizers = Some(vec![CONNECTION_SECRET_FINALIZER.to_owned()]);
        secret.metadata.resource_version = Some(rv);
        secret.clone()
    }

    pub async fn expect_token_secret_get(&mut self) {
        let answer = self.cluster.token_secret.clone();
        self.expect_secret_get(TOKEN_SECRET, answer).await;
    }

    pub async fn expect_connection_secret_get(&mut self) {
        let answer = self.cluster.connection_secret.clone();
        self.expect_secret_get(CONNECTION_SECRET, answer).await;
    }

    async fn expect_secret_get(&mut self, name: &str, answer: Option<Secret>) {
        let call = self.next(&format!("GET of Secret {name}")).await;
        call.assert_is("Secret GET", Method::GET, &secret_path(name), &[]);
        match answer {
            Some(secret) => call.reply(StatusCode::OK, &secret),
            None => call.refuse(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("secrets \"{name}\" not found"),
            ),
        }
    }

    /// A GET of `path` (the `what` of a message), answered with `answer`, or 404 without one.
    pub async fn expect_get(&mut self, what: &str, path: &str, answer: Option<Value>) {
        let call = self.next(&format!("GET of {what}")).await;
        call.assert_is(what, Method::GET, path, &[]);
        match answer {
            Some(object) => call.reply(StatusCode::OK, &object),
            None => call.refuse(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{what} not found"),
            ),
        }
    }

    /// A fresh read of the resource (the cache may be behind).
    pub async fn expect_identity_get(&mut self) {
        let call = self.next("GET of the resource").await;
        call.assert_is("resource GET", Method::GET, &identity_path(), &[]);
        call.reply(StatusCode::OK, &self.cluster.identity);
    }

    /// The server-side apply of the resource's status; returns the status applied.
    pub async fn expect_status_apply(&mut self) -> CommunicationIdentityStatus {
        let call = self.next("status apply").await;
        call.assert_is(
            "status apply",
            Method::PATCH,
            &format!("{}/status", identity_path()),
            &APPLY_QUERY,
        );
        assert_eq!(call.content_type.as_deref(), Some(APPLY_CONTENT_TYPE));
        assert_eq!(call.body["apiVersion"], "acs-operator.io/v1alpha1");
        assert_eq!(call.body["kind"], "CommunicationIdentity");
        let status: CommunicationIdentityStatus =
            serde_json::from_value(call.body["status"].clone()).expect("a status");
        // Only the operator writes status, so its apply is the whole status.
        self.cluster.identity.status = Some(status.clone());
        self.cluster.identity.metadata.resource_version =
            Some(self.cluster.next_resource_version());
        call.reply(StatusCode::OK, &self.cluster.identity);
        status
    }

    /// The create of the token Secret (which fails if one exists by then); returns it.
    pub async fn expect_secret_create(&mut self) -> Secret {
        let (call, mut secret) = self.secret_create_request().await;
        assert!(
            self.cluster.token_secret.is_none(),
            "a create while the Secret exists"
        );
        secret.metadata.resource_version = Some(self.cluster.next_resource_version());
        secret.metadata.uid = Some("secret-uid".into());
        self.cluster.token_secret = Some(secret.clone());
        call.reply(StatusCode::CREATED, &secret);
        secret
    }

    /// The create of the token Secret, refused (`code`, `reason`, `message`); returns what was
    /// sent.
    pub async fn refuse_secret_create(
        &mut self,
        code: StatusCode,
        reason: &str,
        message: &str,
    ) -> Secret {
        let (call, secret) = self.secret_create_request().await;
        call.refuse(code, reason, message);
        secret
    }

    async fn secret_create_request(&mut self) -> (Call, Secret) {
        let call = self.next("create of the token Secret").await;
        call.assert_is(
            "Secret create",
            Method::POST,
            &format!("/api/v1/namespaces/{NAMESPACE}/secrets"),
            &[("fieldManager", FIELD_MANAGER)],
        );
        let secret: Secret = serde_json::from_value(call.body.clone()).expect("a Secret");
        assert_is_token_secret(&secret);
        (call, secret)
    }

    /// The server-side apply of the token Secret, with the resourceVersion it had when read as
    /// ours as a precondition; returns what was applied.
    pub async fn expect_secret_apply(&mut self) -> Secret {
        let call = self.next("apply of the token Secret").await;
        call.assert_is(
            "Secret apply",
            Method::PATCH,
            &secret_path(TOKEN_SECRET),
            &APPLY_QUERY,
        );
        assert_eq!(call.content_type.as_deref(), Some(APPLY_CONTENT_TYPE));
        assert_eq!(
            (&call.body["apiVersion"], &call.body["kind"]),
            (&json!("v1"), &json!("Secret"))
        );
        let applied: Secret = serde_json::from_value(call.body.clone()).expect("a Secret");
        assert_is_token_secret(&applied);
        let rv = self.cluster.next_resource_version();
        let stored = self
            .cluster
            .token_secret
            .as_mut()
            .expect("a Secret to apply to");
        assert_eq!(
            applied.metadata.resource_version, stored.metadata.resource_version,
            "the apply's resourceVersion precondition is the Secret as read"
        );
        // What server-side apply does with the fields the operator sets; others' stay.
        stored
            .data
            .get_or_insert_default()
            .extend(applied.data.clone().unwrap_or_default());
        stored
            .metadata
            .labels
            .get_or_insert_default()
            .extend(applied.metadata.labels.clone().unwrap_or_default());
        stored.metadata.owner_references = applied.metadata.owner_references.clone();
        stored.metadata.resource_version = Some(rv);
        let answer = stored.clone();
        call.reply(StatusCode::OK, &answer);
        applied
    }

    /// The merge patch that takes `keys` out of the token Secret, guarded by the
    /// resourceVersion the write before it left.
    pub async fn expect_secret_keys_removed(&mut self, keys: &[&str]) {
        let call = self.next("removal of keys from the token Secret").await;
        call.assert_is(
            "Secret key removal",
            Method::PATCH,
            &secret_path(TOKEN_SECRET),
            &[],
        );
        assert_eq!(call.content_type.as_deref(), Some(MERGE_PATCH_CONTENT_TYPE));
        let rv = self.cluster.next_resource_version();
        let stored = self
            .cluster
            .token_secret
            .as_mut()
            .expect("a Secret to patch");
        let removed: serde_json::Map<String, Value> = keys
            .iter()
            .map(|k| ((*k).to_owned(), Value::Null))
            .collect();
        assert_eq!(
            call.body,
            json!({
                "metadata": { "resourceVersion": stored.metadata.resource_version },
                "data": removed,
            }),
            "key removal"
        );
        let data = stored.data.get_or_insert_default();
        for key in keys {
            data.remove(*key);
        }
        stored.metadata.resource_version = Some(rv);
        let answer = stored.clone();
        call.reply(StatusCode::OK, &answer);
    }

    /// The restart of the workload `plural`/`name` (`deployments`, `statefulsets`,
    /// `daemonsets`) as `kubectl rollout restart` makes it, answered with `code`; returns the
    /// restartedAt value it set.
    pub async fn expect_workload_restart(
        &mut self,
        plural: &str,
        name: &str,
        code: StatusCode,
    ) -> String {
        let call = self.next(&format!("restart of {plural}/{name}")).await;
        call.assert_is(
            "workload restart",
            Method::PATCH,
            &format!("/apis/apps/v1/namespaces/{NAMESPACE}/{plural}/{name}"),
            &[("fieldManager", FIELD_MANAGER)],
        );
        assert_eq!(
            call.content_type.as_deref(),
            Some("application/strategic-merge-patch+json")
        );
        let annotations = &call.body["spec"]["template"]["metadata"]["annotations"];
        let restarted_at = annotations["kubectl.kubernetes.io/restartedAt"]
            .as_str()
            .unwrap_or_else(|| panic!("a restartedAt annotation in {}", call.body))
            .to_owned();
        match code {
            StatusCode::OK => {
                let answer = json!({
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": { "name": name, "namespace": NAMESPACE },
                });
                call.reply(code, &answer);
            }
            code => call.refuse(code, "Refused", &format!("{plural} \"{name}\" refused")),
        }
        restarted_at
    }

    /// An Event about the resource (events.k8s.io/v1, as kube-runtime's Recorder posts it) of
    /// `type_` and `reason`; returns it.
    pub async fn expect_event(&mut self, type_: &str, reason: &str) -> Value {
        let call = self.next(&format!("{reason} event")).await;
        call.assert_is(
            "event",
            Method::POST,
            &format!("/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"),
            &[],
        );
        let event = call.body.clone();
        assert_eq!(
            (event["type"].as_str(), event["reason"].as_str()),
            (Some(type_), Some(reason)),
            "event: {event}"
        );
        assert_eq!(
            event["regarding"]["uid"], UID,
            "the event is about the resource"
        );
        call.reply(StatusCode::CREATED, &event);
        event
    }

    /// The list of the CommunicationIdentities that use the connection Secret, by field
    /// selector, in pages of 50; answered with the resource while the API server still has it.
    pub async fn expect_identity_list(&mut self) {
        let call = self.next("list of the connection Secret's users").await;
        let selector = format!("spec.connectionSecretRef.name={CONNECTION_SECRET}");
        call.assert_is(
            "list",
            Method::GET,
            &format!(
                "/apis/acs-operator.io/v1alpha1/namespaces/{NAMESPACE}/communicationidentities"
            ),
            &[("fieldSelector", &selector), ("limit", "50")],
        );
        let items: Vec<&CommunicationIdentity> = Some(&self.cluster.identity)
            .filter(|_| self.cluster.identity_exists())
            .into_iter()
            .collect();
        let list = json!({
            "apiVersion": "acs-operator.io/v1alpha1",
            "kind": "CommunicationIdentityList",
            "metadata": { "resourceVersion": self.cluster.last_resource_version.to_string() },
            "items": items,
        });
        call.reply(StatusCode::OK, &list);
    }
}

/// The operator's finalizer patches: a merge patch of the whole list, with the
/// resourceVersion read as a precondition (a concurrent change makes it fail).
fn assert_finalizer_patch(call: &Call, read_version: Option<String>, expected: &[&str]) {
    assert_eq!(call.content_type.as_deref(), Some(MERGE_PATCH_CONTENT_TYPE));
    assert_eq!(
        call.body,
        json!({ "metadata": { "finalizers": expected, "resourceVersion": read_version } }),
        "finalizer patch"
    );
}

/// What every token Secret the operator writes carries: its name, the managed-by label and a
/// controller ownerReference to the resource.
fn assert_is_token_secret(secret: &Secret) {
    assert_eq!(secret.metadata.name.as_deref(), Some(TOKEN_SECRET));
    assert_eq!(
        secret.labels().get(MANAGED_BY_LABEL).map(String::as_str),
        Some(MANAGED_BY_VALUE)
    );
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (UID, Some(true)),
        "owned by the resource"
    );
}

/// `at` without its fraction of a second, the precision status keeps.
pub fn whole_second(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).expect("in range")
}
