//! Reconcile-level scenarios: passes of the real `reconcile` against a mock API server that
//! checks every request (see `fixtures.rs`), the in-process ACS emulator and a manual clock.
//! Each test names the behaviour of docs/operator.md it pins down, asserts the Kubernetes
//! requests of the pass in order, the ACS requests that reached the emulator, and that no
//! request is left over.

use std::time::Duration;

use http::StatusCode;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use serde_json::json;

use crate::crd::{
    CONNECTION_SECRET_FINALIZER, CommunicationIdentityStatus, FINALIZER, MANAGED_BY_LABEL,
    READY_CONDITION, Scope, reason,
};
use crate::fixtures::*;
use crate::refresh::{FailureKind, retry_delay};

const HOUR: SignedDuration = SignedDuration::from_hours(1);
const MINUTE: SignedDuration = SignedDuration::from_mins(1);
/// The first retry after a failure the user must fix (docs/operator.md, Errors).
const USER_ERROR_RETRY: Duration = Duration::from_secs(15);

/// What a pass that issued a token wrote.
struct Issued {
    status: CommunicationIdentityStatus,
    secret: Secret,
    action: Action,
}

impl Issued {
    fn token(&self) -> String {
        secret_value(&self.secret, "token")
    }
}

/// The opening of the first pass of a new resource: its Secret is absent, so ACS is needed:
/// the connection Secret is read; once its connection string proves usable, and before
/// anything exists in ACS, the resource gets its finalizer and the mark that a create is sent
/// (one patch, which also proves the cache current), and the connection Secret its finalizer.
async fn start_first_pass(h: &mut Harness) {
    h.start_pass();
    h.expect_token_secret_get().await;
    prepare_first_create(h).await;
}

/// The first pass of a new resource once the operator's watch has listed its Secrets: it
/// knows the token Secret absent without reading it.
async fn start_first_pass_listed(h: &mut Harness) {
    h.watch_lists_secrets();
    h.start_pass();
    prepare_first_create(h).await;
}

/// What comes before the first create in ACS: the connection Secret read, the resource's
/// finalizer with the create mark, the connection Secret's finalizer.
async fn prepare_first_create(h: &mut Harness) {
    h.expect_connection_secret_get().await;
    h.expect_finalizer_and_create_mark().await;
    h.expect_connection_secret_finalizer_patch(&[CONNECTION_SECRET_FINALIZER])
        .await;
}

/// As [`start_first_pass`] for a resource adopting an identity: the finalizer, no create mark.
async fn start_adoption_pass(h: &mut Harness) {
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_connection_secret_get().await;
    h.expect_identity_finalizer_patch(&[FINALIZER]).await;
    h.expect_connection_secret_finalizer_patch(&[CONNECTION_SECRET_FINALIZER])
        .await;
}

/// The first pass of a new resource: after [`start_first_pass`], the identity is created with
/// its token in one ACS call, the Secret is created, then the status written, then one event
/// sent: four writes.
async fn first_pass(h: &mut Harness) -> Issued {
    start_first_pass(h).await;
    finish_first_pass(h).await
}

/// The rest of [`first_pass`], after its start.
async fn finish_first_pass(h: &mut Harness) -> Issued {
    assert!(h.cluster.identity.create_attempted());
    let secret = h.expect_secret_create().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::IDENTITY_CREATED).await;
    let action = h.finish_pass().await;
    Issued {
        status,
        secret,
        action,
    }
}

/// The first pass of a resource adopting an existing identity: as [`first_pass`], but nothing
/// is created (no create marker); the identity is checked in ACS, then given a token.
async fn adoption_pass(h: &mut Harness) -> Issued {
    start_adoption_pass(h).await;
    let secret = h.expect_secret_create().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::IDENTITY_ADOPTED).await;
    let action = h.finish_pass().await;
    Issued {
        status,
        secret,
        action,
    }
}

/// A first pass whose create fails (the finalizer and the create mark are on): the failure is
/// written to status and sent as a Warning event.
async fn failed_first_pass(
    h: &mut Harness,
    failure_reason: &str,
) -> (CommunicationIdentityStatus, Action) {
    start_first_pass(h).await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, failure_reason).await;
    (status, h.finish_pass().await)
}

/// The Ready condition's status and reason.
fn ready(status: &CommunicationIdentityStatus) -> (&str, &str) {
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == READY_CONDITION)
        .expect("a Ready condition");
    (ready.status.as_str(), ready.reason.as_str())
}

/// The Ready condition's message.
fn ready_message(status: &CommunicationIdentityStatus) -> &str {
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == READY_CONDITION);
    &ready.expect("a Ready condition").message
}

fn next_refresh(status: &CommunicationIdentityStatus) -> Timestamp {
    status
        .next_refresh_time
        .as_ref()
        .expect("nextRefreshTime")
        .0
}

/// Asserts that the pass ended waiting until `at`: nothing requeued, the resource's wake-up
/// set for that second.
fn assert_waits_until(h: &Harness, action: &Action, at: Timestamp) {
    assert_eq!(*action, Action::await_change());
    assert_eq!(h.wakeup(), Some(whole_second(at)), "the next pass");
}

/// Asserts a failure recorded by the first pass: one failed attempt, Ready=False with
/// `failure_reason`, the next attempt `backoff` from now (in whole seconds, as status keeps
/// times), and the pass requeued for then.
fn assert_first_failure(
    h: &Harness,
    status: &CommunicationIdentityStatus,
    action: &Action,
    failure_reason: &str,
    backoff: Duration,
) {
    assert_eq!(status.failed_attempts, 1, "{failure_reason}");
    assert_eq!(ready(status), ("False", failure_reason));
    let retry_at = whole_second(h.now() + SignedDuration::try_from(backoff).expect("short"));
    assert_eq!(next_refresh(status), retry_at, "{failure_reason}");
    assert_eq!(*action, Action::requeue(backoff), "{failure_reason}");
}

#[tokio::test]
async fn a_new_resource_gets_an_identity_its_token_secret_and_ready_in_one_pass() {
    let mut h = Harness::new(identity(json!({}))).await;
    let created = first_pass(&mut h).await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);

    let (now, status, secret) = (h.now(), &created.status, &created.secret);
    let identity_id = status.identity_id.clone().expect("identityId recorded");
    let expires_on = now + 24 * HOUR;
    assert_eq!(
        secret_keys(secret),
        ["endpoint", "expiresOn", "identityId", "scopes", "token"]
    );
    assert_eq!(secret_value(secret, "identityId"), identity_id);
    assert_eq!(secret_value(secret, "scopes"), "chat,voip");
    assert_eq!(secret_value(secret, "endpoint"), h.acs.endpoint());
    assert_eq!(secret_value(secret, "expiresOn"), expires_on.to_string());
    assert_eq!(h.acs.token_status(&created.token()).await, "valid");

    assert_eq!(status.secret_name.as_deref(), Some(TOKEN_SECRET));
    assert_eq!(status.token_expires_on, Some(Time(expires_on)));
    assert_eq!(status.last_refresh_time, Some(Time(now)));
    // refreshBefore defaults to a third of the lifetime; the jitter is at most 10 minutes.
    let planned = expires_on - 8 * HOUR;
    let next = next_refresh(status);
    assert!(
        next <= planned && next >= planned - 10 * MINUTE,
        "next refresh {next}"
    );
    assert_eq!(status.token_scopes, [Scope::Chat, Scope::Voip]);
    assert_eq!(status.token_lifetime_minutes, Some(1440));
    assert!(h.cluster.identity.create_attempted());
    assert_eq!(status.failed_attempts, 0);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(ready(status), ("True", reason::TOKEN_ISSUED));
    assert_waits_until(&h, &created.action, next);
}

#[tokio::test]
async fn a_first_pass_that_loses_the_race_for_the_connection_secret_reads_it_again_and_goes_on() {
    let mut h = Harness::new(identity(json!({}))).await;
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_connection_secret_get().await;
    h.expect_finalizer_and_create_mark().await;
    // Another first pass of a burst held it a moment before: read again, already held, so no
    // second patch, and no 5-s retry.
    h.refuse_connection_secret_finalizer_patch_held_meanwhile()
        .await;
    h.expect_connection_secret_get().await;
    let created = finish_first_pass(&mut h).await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);
    assert_eq!(ready(&created.status), ("True", reason::TOKEN_ISSUED));
}

#[tokio::test]
async fn first_passes_of_a_burst_put_the_finalizer_on_their_connection_secret_once() {
    let mut h = Harness::new(identity(json!({}))).await;
    let gate = h.other_pass_holds_connection_secret().await;
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_connection_secret_get().await;
    h.expect_finalizer_and_create_mark().await;
    // It waits for the other pass, then takes the Secret that pass held: no patch, no read.
    h.other_pass_held_connection_secret(gate);
    let created = finish_first_pass(&mut h).await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);
    assert_eq!(ready(&created.status), ("True", reason::TOKEN_ISSUED));
}

#[tokio::test]
async fn a_pass_that_waits_too_long_for_another_to_hold_the_connection_secret_holds_it_itself() {
    let mut h = Harness::new(identity(json!({}))).await;
    // The other pass's patch stalls; after the gate's patience this one patches on its own.
    let _stalled = h.other_pass_holds_connection_secret().await;
    h.start_pass();
    h.expect_token_secret_get().await;
    prepare_first_create(&mut h).await;
    let created = finish_first_pass(&mut h).await;
    assert_eq!(ready(&created.status), ("True", reason::TOKEN_ISSUED));
}

/// The resource as the first pass's finalizer patch left it, before its status writes.
fn before_status_writes(h: &Harness) -> crate::crd::CommunicationIdentity {
    let mut stale = h.cluster.identity.clone();
    stale.status = None;
    stale.metadata.resource_version = Some("2".into());
    stale
}

#[tokio::test]
async fn a_pass_from_a_cache_behind_the_operators_own_write_makes_no_request() {
    let mut h = Harness::new(identity(json!({}))).await;
    first_pass(&mut h).await;
    h.acs.calls().await;
    // A Secret event can trigger a pass before the status write reaches the watch; that
    // write's own event triggers the pass that matters.
    h.start_pass_from(before_status_writes(&h));
    let action = h.finish_pass().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert_eq!(h.acs.calls().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_pass_from_a_stale_cache_decides_again_from_a_fresh_read_and_issues_nothing() {
    let mut h = Harness::new(identity(json!({}))).await;
    let created = first_pass(&mut h).await;
    h.acs.calls().await;
    // The cache still shows the resource before the first pass's status writes, and the
    // operator no longer knows of them (its watch relisted in between): from that, an
    // identity is still to be created.
    h.watch_relists_identities();
    h.start_pass_from(before_status_writes(&h));
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_token_secret_get().await;
    let action = h.finish_pass().await;

    assert_eq!(
        h.acs.calls().await,
        Vec::<String>::new(),
        "no second create"
    );
    assert_waits_until(&h, &action, next_refresh(&created.status));
}

#[tokio::test]
async fn a_due_refresh_issues_one_token_and_applies_the_secret_at_the_version_read() {
    // A 1-hour token refreshed 44 minutes before expiry is due about 16 minutes after its
    // issue. The clock starts 14 minutes back, so that the emulator's clock stays within the
    // 15 minutes of real time its signature check allows.
    let start = whole_second(Timestamp::now()) - 14 * MINUTE;
    let spec = json!({ "tokenLifetime": "1h", "refreshBefore": "44m" });
    let mut h = Harness::start(identity(spec), Default::default(), start).await;
    let created = first_pass(&mut h).await;
    h.acs.calls().await;
    let due = next_refresh(&created.status);
    h.set_clock(due);
    h.restart();

    h.start_pass();
    h.expect_token_secret_get().await;
    // About to call ACS on what the cache showed: read afresh first.
    h.expect_identity_get().await;
    // Pinned by the first pass already: no finalizer patch.
    h.expect_connection_secret_get().await;
    let applied = h.expect_secret_apply().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::TOKEN_REFRESHED).await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, ["issueAccessToken 200"]);
    let token = secret_value(&applied, "token");
    assert_ne!(token, created.token());
    assert_eq!(h.acs.token_status(&token).await, "valid");
    assert_eq!(
        h.acs.token_status(&created.token()).await,
        "valid",
        "a refresh never revokes"
    );
    assert_eq!(
        secret_value(&applied, "expiresOn"),
        (due + HOUR).to_string()
    );
    assert_eq!(status.last_refresh_time, Some(Time(due)));
    assert_eq!(status.token_expires_on, Some(Time(due + HOUR)));
    assert_eq!(status.identity_id, created.status.identity_id);
    assert_eq!(ready(&status), ("True", reason::TOKEN_ISSUED));
    assert_waits_until(&h, &action, next_refresh(&status));
}

#[tokio::test]
async fn an_edited_secret_with_its_token_intact_is_restored_without_acs() {
    let mut h = Harness::new(identity(json!({}))).await;
    let created = first_pass(&mut h).await;
    h.acs.calls().await;
    h.restart();
    // Someone changed a key and removed the managed-by label; the token is untouched.
    let secret = h.cluster.token_secret.as_mut().expect("the Secret");
    secret
        .data
        .as_mut()
        .expect("data")
        .insert("scopes".into(), ByteString(b"chat,voip,admin".to_vec()));
    secret.labels_mut().remove(MANAGED_BY_LABEL);

    h.start_pass();
    h.expect_token_secret_get().await;
    let applied = h.expect_secret_apply().await;
    h.expect_event(NORMAL, reason::SECRET_RESTORED).await;
    // The status already describes that token: no status write.
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_eq!(applied.data, created.secret.data, "written back as it was");
    assert_waits_until(&h, &action, next_refresh(&created.status));
}

#[tokio::test]
async fn a_deleted_secret_is_created_again_with_a_new_token() {
    let mut h = Harness::new(identity(json!({}))).await;
    let created = first_pass(&mut h).await;
    h.acs.calls().await;
    h.restart();
    // A minute later (the emulator mints the same token for the same second).
    h.set_clock(h.now() + MINUTE);
    h.cluster.token_secret = None;

    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_connection_secret_get().await;
    let secret = h.expect_secret_create().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::TOKEN_ISSUED).await;
    h.finish_pass().await;

    assert_eq!(h.acs.calls().await, ["issueAccessToken 200"]);
    let token = secret_value(&secret, "token");
    assert_ne!(token, created.token());
    assert_eq!(h.acs.token_status(&token).await, "valid");
    assert_eq!(status.identity_id, created.status.identity_id);
    assert_eq!(ready(&status), ("True", reason::TOKEN_ISSUED));
}

#[tokio::test]
async fn a_deleted_secret_that_cannot_be_replaced_leaves_the_resource_not_ready() {
    let mut h = Harness::new(identity(json!({}))).await;
    first_pass(&mut h).await;
    h.acs.calls().await;
    h.restart();
    h.cluster.token_secret = None;
    h.acs.set_faults(json!({ "fail503": 1.0 })).await;

    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_connection_secret_get().await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::ACS_UNAVAILABLE).await;
    h.finish_pass().await;

    let attempts = 1 + acs::RetryPolicy::default().max_retries as usize;
    assert_eq!(h.acs.calls().await, vec!["issueAccessToken 503"; attempts]);
    assert_eq!(ready(&status), ("False", reason::ACS_UNAVAILABLE));
}

#[tokio::test]
async fn a_foreign_secret_of_that_name_is_left_alone_and_reported_as_secret_conflict() {
    let mut h = Harness::new(identity(json!({}))).await;
    h.cluster.token_secret = Some(foreign_secret());

    h.start_pass();
    h.expect_token_secret_get().await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::SECRET_CONFLICT).await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_eq!(
        h.cluster.token_secret,
        Some(foreign_secret()),
        "never written"
    );
    assert_first_failure(
        &h,
        &status,
        &action,
        reason::SECRET_CONFLICT,
        USER_ERROR_RETRY,
    );
}

/// How ACS fails a create in [`acs_failures_are_recorded_with_their_reason_and_backoff`].
enum AcsFault {
    /// The create budget is spent for the next hour: 429 with `Retry-After: 3600`.
    ThrottledForAnHour,
    /// Every request answered 503.
    Unavailable,
    /// The connection Secret holds a key ACS does not know: 401.
    WrongKey,
}

#[tokio::test]
async fn acs_failures_are_recorded_with_their_reason_and_backoff() {
    struct Case {
        name: &'static str,
        fault: AcsFault,
        calls: Vec<&'static str>,
        reason: &'static str,
        backoff: Duration,
    }
    let now = whole_second(Timestamp::now());
    // 5 s less a jitter of up to 20% that the resource's UID fixes.
    let transient = retry_delay(1, FailureKind::Transient, now, None, UID);
    assert!((Duration::from_secs(4)..=Duration::from_secs(5)).contains(&transient));
    // The ACS client retries a 5xx itself, three times, before the pass sees it.
    let attempts = 1 + acs::RetryPolicy::default().max_retries as usize;
    let cases = [
        Case {
            name: "429 waits for ACS's Retry-After",
            fault: AcsFault::ThrottledForAnHour,
            calls: vec!["createIdentityWithToken 429"],
            reason: reason::THROTTLED,
            backoff: Duration::from_secs(3600),
        },
        Case {
            name: "503 backs off 5 s, less up to 20% jitter",
            fault: AcsFault::Unavailable,
            calls: vec!["createIdentity 503"; attempts],
            reason: reason::ACS_UNAVAILABLE,
            backoff: transient,
        },
        Case {
            name: "401 is retried after 15 s, so a fixed key is taken up soon",
            fault: AcsFault::WrongKey,
            calls: vec!["createIdentity 401"],
            reason: reason::AUTHENTICATION_FAILED,
            backoff: USER_ERROR_RETRY,
        },
    ];
    for case in cases {
        let limits = acs_emulator::Limits {
            create_identity_with_token: 1,
            window_seconds: 3600,
            ..Default::default()
        };
        let mut h = Harness::start(identity(json!({})), limits, now).await;
        match case.fault {
            AcsFault::ThrottledForAnHour => {
                let scopes = ["chat".to_owned()];
                h.acs
                    .client()
                    .create_identity_with_token("someone-else", &scopes, 60)
                    .await
                    .expect("the hour's one create");
                h.acs.calls().await;
            }
            AcsFault::Unavailable => h.acs.set_faults(json!({ "fail503": 1.0 })).await,
            AcsFault::WrongKey => {
                let wrong = h.acs.connection_string_with_wrong_key();
                h.set_connection_string(&wrong);
            }
        }

        let (status, action) = failed_first_pass(&mut h, case.reason).await;

        assert_eq!(h.acs.calls().await, case.calls, "{}", case.name);
        assert_first_failure(&h, &status, &action, case.reason, case.backoff);
        assert!(
            h.cluster.identity.create_attempted(),
            "{}: the create mark stays (the answer may have been lost)",
            case.name
        );
    }
}

#[tokio::test]
async fn a_missing_connection_secret_is_reported_before_anything_reaches_acs() {
    let mut h = Harness::new(identity(json!({}))).await;
    h.cluster.connection_secret = None;

    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_connection_secret_get().await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::CONNECTION_SECRET_NOT_FOUND)
        .await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert!(
        !h.cluster.identity.create_attempted() && h.cluster.identity.finalizers().is_empty(),
        "nothing was sent to ACS, so nothing is held"
    );
    assert_first_failure(
        &h,
        &status,
        &action,
        reason::CONNECTION_SECRET_NOT_FOUND,
        USER_ERROR_RETRY,
    );
}

#[tokio::test]
async fn a_restart_with_valid_tokens_reads_the_secret_and_writes_nothing() {
    let mut h = Harness::new(identity(json!({}))).await;
    let created = first_pass(&mut h).await;
    h.acs.calls().await;
    h.restart();

    h.start_pass();
    h.expect_token_secret_get().await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_waits_until(&h, &action, next_refresh(&created.status));
}

#[tokio::test]
async fn a_refused_secret_write_is_secret_write_failed_and_the_retry_reuses_the_token() {
    let mut h = Harness::new(identity(json!({}))).await;
    start_first_pass(&mut h).await;
    let refused = h
        .refuse_secret_create(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "secrets \"alice-acs-token\" is forbidden: exceeded quota: secrets",
        )
        .await;
    let failed = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::SECRET_WRITE_FAILED).await;
    let action = h.finish_pass().await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);
    assert_first_failure(
        &h,
        &failed,
        &action,
        reason::SECRET_WRITE_FAILED,
        USER_ERROR_RETRY,
    );
    let message = &failed.conditions[0].message;
    assert!(message.contains("exceeded quota"), "quoted: {message}");

    // The retry after the backoff, in the same process: the token ACS issued is held.
    h.set_clock(next_refresh(&failed));
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    let written = h.expect_secret_create().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::IDENTITY_CREATED).await;
    h.finish_pass().await;

    assert_eq!(
        h.acs.calls().await,
        Vec::<String>::new(),
        "no second ACS call"
    );
    assert_eq!(written.data, refused.data, "the held token");
    assert_eq!(ready(&status), ("True", reason::TOKEN_ISSUED));
    assert_eq!(status.failed_attempts, 0);
}

#[tokio::test]
async fn a_secret_created_by_someone_else_during_the_pass_makes_it_decide_again() {
    let mut h = Harness::new(identity(json!({}))).await;
    start_first_pass(&mut h).await;
    // Between the pass's read and its create, someone else created a Secret of that name.
    h.refuse_secret_create(
        StatusCode::CONFLICT,
        "AlreadyExists",
        "secrets \"alice-acs-token\" already exists",
    )
    .await;
    h.cluster.token_secret = Some(foreign_secret());
    // Deciding again from a fresh read of the resource (with the mark) and of the Secret:
    // not ours.
    h.expect_identity_get().await;
    h.expect_token_secret_get().await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::SECRET_CONFLICT).await;
    h.finish_pass().await;

    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);
    assert_eq!(
        h.cluster.token_secret,
        Some(foreign_secret()),
        "never written"
    );
    assert_eq!(ready(&status), ("False", reason::SECRET_CONFLICT));
    assert!(
        h.cluster.identity.create_attempted(),
        "the identity was created in ACS: the mark must stay for deletion to clean it up"
    );
}

#[tokio::test]
async fn passes_its_own_writes_trigger_read_nothing_once_the_secrets_are_listed() {
    let mut h = Harness::new(identity(json!({}))).await;
    start_first_pass_listed(&mut h).await;
    let created = finish_first_pass(&mut h).await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);

    // The passes the Secret's create and the status write trigger: nothing to read or write.
    h.watch_delivers_token_secret();
    h.start_pass();
    let action = h.finish_pass().await;
    assert_waits_until(&h, &action, next_refresh(&created.status));
    h.start_pass();
    h.finish_pass().await;
    assert_eq!(h.acs.calls().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_secret_edit_the_watch_delivers_is_read_and_restored() {
    let mut h = Harness::new(identity(json!({}))).await;
    start_first_pass_listed(&mut h).await;
    let created = finish_first_pass(&mut h).await;
    h.acs.calls().await;
    let edited_at = h.cluster.next_resource_version();
    let secret = h.cluster.token_secret.as_mut().expect("the Secret");
    secret.labels_mut().remove(MANAGED_BY_LABEL);
    secret.metadata.resource_version = Some(edited_at);
    h.watch_delivers_token_secret();

    h.start_pass();
    h.expect_token_secret_get().await;
    let applied = h.expect_secret_apply().await;
    h.expect_event(NORMAL, reason::SECRET_RESTORED).await;
    h.finish_pass().await;
    assert_eq!(applied.data, created.secret.data);
    assert_eq!(h.acs.calls().await, Vec::<String>::new());

    // Restored, and known so: the pass its write triggers reads nothing.
    h.watch_delivers_token_secret();
    h.start_pass();
    h.finish_pass().await;
}

#[tokio::test]
async fn a_secret_the_watch_cannot_see_is_read_when_creating_it_fails() {
    let mut h = Harness::new(identity(json!({}))).await;
    // Unlabelled, so not in the watch's listing.
    h.cluster.token_secret = Some(foreign_secret());
    start_first_pass_listed(&mut h).await;
    h.refuse_secret_create(
        StatusCode::CONFLICT,
        "AlreadyExists",
        "secrets \"alice-acs-token\" already exists",
    )
    .await;
    h.expect_identity_get().await;
    h.expect_token_secret_get().await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::SECRET_CONFLICT).await;
    h.finish_pass().await;

    assert_eq!(ready(&status), ("False", reason::SECRET_CONFLICT));
    assert_eq!(
        h.cluster.token_secret,
        Some(foreign_secret()),
        "never written"
    );
}

#[tokio::test]
async fn an_existing_identity_is_adopted_once_acs_confirms_it_exists() {
    let mut h = Harness::new(identity(json!({}))).await;
    let existing = h
        .acs
        .client()
        .create_identity_with_token("made-elsewhere", &["chat".to_owned()], 60)
        .await
        .expect("an identity to adopt")
        .id;
    h.acs.calls().await;
    h.cluster.identity.spec.identity_id = Some(existing.clone());

    let adopted = adoption_pass(&mut h).await;

    assert_eq!(
        h.acs.calls().await,
        ["getIdentity 200", "issueAccessToken 200"]
    );
    assert_eq!(adopted.status.identity_id, Some(existing.clone()));
    assert_eq!(secret_value(&adopted.secret, "identityId"), existing);
    assert!(
        !h.cluster.identity.create_attempted(),
        "nothing was created"
    );
    assert_eq!(ready(&adopted.status), ("True", reason::TOKEN_ISSUED));
    assert_waits_until(&h, &adopted.action, next_refresh(&adopted.status));
}

#[tokio::test]
async fn an_identity_another_resource_holds_is_not_adopted() {
    let mut h = Harness::new(identity(json!({}))).await;
    let scopes = ["chat".to_owned()];
    let taken = h
        .acs
        .client()
        .create_identity_with_token("bob's", &scopes, 60)
        .await
        .expect("an identity")
        .id;
    h.acs.calls().await;
    h.cluster.identity.spec.identity_id = Some(taken.clone());
    let mut bob = other_identity("bob", "bob-uid", json!({}));
    bob.status = Some(CommunicationIdentityStatus {
        identity_id: Some(taken),
        ..Default::default()
    });
    h.cache(bob);

    // Refused before anything reaches ACS, so before the finalizer too.
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_connection_secret_get().await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::IDENTITY_IN_USE).await;
    h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_eq!(ready(&status), ("False", reason::IDENTITY_IN_USE));
    assert_eq!(status.identity_id, None);
}

#[tokio::test]
async fn deletion_follows_the_deletion_policy_then_releases_the_connection_secret() {
    struct Case {
        name: &'static str,
        spec: serde_json::Value,
        /// `spec.identityId` names an identity created outside the operator.
        adopted: bool,
        calls: Vec<&'static str>,
        event: &'static str,
        /// What the emulator says of the last token afterwards.
        token_after: &'static str,
    }
    let cases = [
        Case {
            name: "Delete deletes the identity",
            spec: json!({ "deletionPolicy": "Delete" }),
            adopted: false,
            calls: vec!["deleteIdentity 204"],
            event: reason::IDENTITY_DELETED,
            token_after: "deleted",
        },
        Case {
            name: "RevokeTokens revokes every token and keeps the identity",
            spec: json!({ "deletionPolicy": "RevokeTokens" }),
            adopted: false,
            calls: vec!["revokeAccessTokens 204"],
            event: reason::TOKENS_REVOKED,
            token_after: "revoked",
        },
        Case {
            name: "Retain leaves ACS alone",
            spec: json!({ "deletionPolicy": "Retain" }),
            adopted: false,
            calls: vec![],
            event: reason::IDENTITY_RETAINED,
            token_after: "valid",
        },
        Case {
            name: "an adopted identity defaults to RevokeTokens",
            spec: json!({}),
            adopted: true,
            calls: vec!["revokeAccessTokens 204"],
            event: reason::TOKENS_REVOKED,
            token_after: "revoked",
        },
    ];
    for case in cases {
        let mut h = Harness::new(identity(case.spec)).await;
        let provisioned = if case.adopted {
            let scopes = ["chat".to_owned()];
            let created = h
                .acs
                .client()
                .create_identity_with_token("made-elsewhere", &scopes, 60)
                .await
                .expect("an identity to adopt");
            h.cluster.identity.spec.identity_id = Some(created.id);
            adoption_pass(&mut h).await
        } else {
            first_pass(&mut h).await
        };
        h.acs.calls().await;
        h.restart();
        h.cluster.delete_identity(h.now());

        h.start_pass();
        if !case.calls.is_empty() {
            // Only a cleanup in ACS needs the connection string.
            h.expect_connection_secret_get().await;
        }
        h.expect_event(NORMAL, case.event).await;
        h.expect_identity_finalizer_patch(&[]).await;
        // The cache knows no other user: the API server is asked, then the last user unpins
        // the connection Secret.
        h.expect_identity_list().await;
        h.expect_connection_secret_get().await;
        h.expect_connection_secret_finalizer_patch(&[]).await;
        let action = h.finish_pass().await;

        assert_eq!(h.acs.calls().await, case.calls, "{}", case.name);
        assert_eq!(
            h.acs.token_status(&provisioned.token()).await,
            case.token_after,
            "{}",
            case.name
        );
        assert_eq!(action, Action::await_change(), "{}", case.name);
    }
}

#[tokio::test]
async fn the_connection_secret_stays_pinned_while_another_resource_uses_it() {
    let mut h = Harness::new(identity(json!({}))).await;
    first_pass(&mut h).await;
    h.acs.calls().await;
    h.restart();
    h.cache(other_identity("bob", "bob-uid", json!({})));
    h.cluster.delete_identity(h.now());

    h.start_pass();
    h.expect_connection_secret_get().await;
    h.expect_event(NORMAL, reason::IDENTITY_DELETED).await;
    h.expect_identity_finalizer_patch(&[]).await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, ["deleteIdentity 204"]);
    let connection = h.cluster.connection_secret.as_ref().expect("the Secret");
    assert_eq!(connection.finalizers(), [CONNECTION_SECRET_FINALIZER]);
    assert_eq!(action, Action::await_change());
}

/// The quickstart's two tokens for one identity: a 1-hour `voip` one and a `chat` one.
fn two_tokens() -> serde_json::Value {
    json!([
        { "name": "voip", "scopes": ["voip"], "tokenLifetime": "1h" },
        { "name": "chat", "scopes": ["chat"] },
    ])
}

/// The first pass of a resource with two named tokens: the identity is created with the first
/// token, the second is issued in the same pass, and one Secret holds both.
async fn first_pass_of_two(h: &mut Harness) -> Issued {
    start_first_pass(h).await;
    let secret = h.expect_secret_create().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::IDENTITY_CREATED).await;
    h.expect_event(NORMAL, reason::TOKEN_ISSUED).await;
    let action = h.finish_pass().await;
    Issued {
        status,
        secret,
        action,
    }
}

#[tokio::test]
async fn two_named_tokens_are_issued_for_one_identity_in_one_pass() {
    let mut h = Harness::new(identity_with_tokens(two_tokens())).await;
    let created = first_pass_of_two(&mut h).await;
    assert_eq!(
        h.acs.calls().await,
        ["createIdentityWithToken 201", "issueAccessToken 200"]
    );
    let (now, status, secret) = (h.now(), &created.status, &created.secret);
    assert_eq!(
        secret_keys(secret),
        [
            "chat.expiresOn",
            "chat.scopes",
            "chat.token",
            "endpoint",
            "identityId",
            "voip.expiresOn",
            "voip.scopes",
            "voip.token",
        ]
    );
    assert_eq!(secret_value(secret, "voip.scopes"), "voip");
    assert_eq!(secret_value(secret, "chat.scopes"), "chat");
    assert_eq!(
        secret_value(secret, "voip.expiresOn"),
        (now + HOUR).to_string()
    );
    assert_eq!(
        secret_value(secret, "chat.expiresOn"),
        (now + 24 * HOUR).to_string()
    );
    for key in ["voip.token", "chat.token"] {
        assert_eq!(
            h.acs.token_status(&secret_value(secret, key)).await,
            "valid"
        );
    }
    let tokens: Vec<(&str, Vec<Scope>, Option<i32>)> = status
        .tokens
        .iter()
        .map(|t| (t.name.as_str(), t.scopes.clone(), t.token_lifetime_minutes))
        .collect();
    assert_eq!(
        tokens,
        [
            ("voip", vec![Scope::Voip], Some(60)),
            ("chat", vec![Scope::Chat], Some(1440)),
        ]
    );
    // The printer columns tell the first expiry and the first refresh.
    assert_eq!(status.token_expires_on, Some(Time(now + HOUR)));
    assert_eq!(status.next_refresh_time, status.tokens[0].next_refresh_time);
    assert!(status.token_scopes.is_empty());
    assert_eq!(ready(status), ("True", reason::TOKEN_ISSUED));
    assert_waits_until(&h, &created.action, next_refresh(status));

    // A restart with both tokens in place writes nothing and calls nothing.
    h.restart();
    h.start_pass();
    h.expect_token_secret_get().await;
    h.finish_pass().await;
    assert!(h.acs.calls().await.is_empty());
}

#[tokio::test]
async fn a_changed_entry_reissues_only_its_token_and_a_removed_one_leaves_the_secret() {
    let mut h = Harness::new(identity_with_tokens(two_tokens())).await;
    let created = first_pass_of_two(&mut h).await;
    h.acs.calls().await;
    h.restart();
    h.cluster
        .edit_spec(|spec| spec.tokens[1].scopes.push(Scope::ChatJoin));

    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_connection_secret_get().await;
    let applied = h.expect_secret_apply().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::TOKEN_ISSUED).await;
    h.finish_pass().await;
    assert_eq!(h.acs.calls().await, ["issueAccessToken 200"]);
    let before = &created.secret;
    assert_eq!(
        secret_value(&applied, "voip.token"),
        secret_value(before, "voip.token"),
        "the unchanged entry keeps its token"
    );
    assert_ne!(
        secret_value(&applied, "chat.token"),
        secret_value(before, "chat.token")
    );
    assert_eq!(secret_value(&applied, "chat.scopes"), "chat,chat.join");
    assert_eq!(status.tokens[0], created.status.tokens[0]);
    assert_eq!(status.tokens[1].scopes, [Scope::Chat, Scope::ChatJoin]);

    // Removing an entry takes its keys out, with no ACS call.
    h.restart();
    h.cluster.edit_spec(|spec| {
        spec.tokens.pop();
    });
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_secret_apply().await;
    h.expect_secret_keys_removed(&["chat.token", "chat.expiresOn", "chat.scopes"])
        .await;
    h.expect_event(NORMAL, reason::TOKENS_REMOVED).await;
    let status = h.expect_status_apply().await;
    h.finish_pass().await;
    assert!(h.acs.calls().await.is_empty());
    let names: Vec<&str> = status.tokens.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["voip"]);
    let secret = h.cluster.token_secret.as_ref().expect("the Secret");
    assert_eq!(
        secret_keys(secret),
        [
            "endpoint",
            "identityId",
            "voip.expiresOn",
            "voip.scopes",
            "voip.token"
        ]
    );
}

/// A minute on (tokens carry whole seconds), after an operator restart: a pass on the revoke
/// request `leak-1`, up to the revoke.
async fn start_revoke_pass(h: &mut Harness) {
    h.set_clock(h.now() + MINUTE);
    h.restart();
    h.cluster
        .annotate(crate::crd::REVOKE_REQUESTED_ANNOTATION, "leak-1");
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_connection_secret_get().await;
    h.expect_event(NORMAL, reason::TOKENS_REVOKED).await;
}

#[tokio::test]
async fn a_revoke_replaces_every_named_token() {
    let mut h = Harness::new(identity_with_tokens(two_tokens())).await;
    let created = first_pass_of_two(&mut h).await;
    h.acs.calls().await;
    start_revoke_pass(&mut h).await;
    let applied = h.expect_secret_apply().await;
    let status = h.expect_status_apply().await;
    let issued = h.expect_event(NORMAL, reason::TOKEN_ISSUED).await;
    h.finish_pass().await;
    let note = issued["note"].as_str().expect("a note");
    assert!(
        note.contains("token \"voip\"") && note.contains("token \"chat\""),
        "one Event tells both: {note}"
    );
    assert_eq!(
        h.acs.calls().await,
        [
            "issueAccessToken 200",
            "issueAccessToken 200",
            "revokeAccessTokens 204"
        ]
    );
    for key in ["voip.token", "chat.token"] {
        let (old, new) = (
            secret_value(&created.secret, key),
            secret_value(&applied, key),
        );
        assert_eq!(h.acs.token_status(&old).await, "revoked", "{key}");
        assert_eq!(h.acs.token_status(&new).await, "valid", "{key}");
    }
    assert_eq!(status.handled_revoke_request.as_deref(), Some("leak-1"));
    assert_eq!(ready(&status), ("True", reason::TOKEN_ISSUED));
}

/// A resource whose Deployment `web` is restarted when its tokens change (the default
/// minRestartInterval of 5 minutes), on top of `spec`.
fn with_web_target(spec: serde_json::Value) -> crate::crd::CommunicationIdentity {
    let mut full = json!({ "rolloutRestartTargets": [{ "kind": "Deployment", "name": "web" }] });
    full.as_object_mut()
        .expect("an object")
        .extend(spec.as_object().expect("spec fields").clone());
    identity(full)
}

/// A pass on a new refresh request: the token is reissued and written, status records it.
async fn requested_refresh(h: &mut Harness, value: &str) -> CommunicationIdentityStatus {
    h.restart();
    h.cluster
        .annotate(crate::crd::REFRESH_REQUESTED_ANNOTATION, value);
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_connection_secret_get().await;
    h.expect_secret_apply().await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::TOKEN_REFRESHED).await;
    status
}

#[tokio::test]
async fn a_token_change_restarts_the_targets_once_and_changes_close_together_fold_into_one() {
    let mut h = Harness::new(with_web_target(json!({}))).await;
    let created = first_pass(&mut h).await;
    assert_eq!(
        created.status.rollout_restart, None,
        "the first token restarts nothing"
    );

    // A refresh: the new token is written, then web restarted at once (never restarted before).
    let pending = requested_refresh(&mut h, "r1").await;
    assert_eq!(
        pending.rollout_restart.as_ref().unwrap().pending_since,
        Some(Time(h.now()))
    );
    let restarted_at = h
        .expect_workload_restart("deployments", "web", StatusCode::OK)
        .await;
    h.expect_event(NORMAL, reason::WORKLOAD_RESTARTED).await;
    let status = h.expect_status_apply().await;
    h.finish_pass().await;
    assert_eq!(restarted_at, h.now().to_string());
    let restart = status.rollout_restart.as_ref().unwrap();
    assert_eq!(restart.last_restart_time, Some(Time(h.now())));
    assert_eq!(restart.pending_since, None);
    let first_restart = h.now();

    // Neither an operator restart nor an unchanged pass restarts anything.
    h.restart();
    h.start_pass();
    h.expect_token_secret_get().await;
    h.finish_pass().await;

    // Two more refreshes within the interval: each writes its token, neither restarts.
    h.set_clock(first_restart + MINUTE);
    let pending = requested_refresh(&mut h, "r2").await;
    let action = h.finish_pass().await;
    let due = first_restart + 5 * MINUTE;
    assert_eq!(
        pending.rollout_restart.as_ref().unwrap().pending_since,
        Some(Time(first_restart + MINUTE))
    );
    // Back when the restart is due.
    assert_waits_until(&h, &action, due);
    h.set_clock(first_restart + 2 * MINUTE);
    requested_refresh(&mut h, "r3").await;
    h.finish_pass().await;

    // At the end of the interval, one restart for both; the cache may lag behind a restart
    // done already, so the resource is read afresh first.
    h.set_clock(due);
    h.restart();
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_workload_restart("deployments", "web", StatusCode::OK)
        .await;
    h.expect_event(NORMAL, reason::WORKLOAD_RESTARTED).await;
    let status = h.expect_status_apply().await;
    h.finish_pass().await;
    let restart = status.rollout_restart.as_ref().unwrap();
    assert_eq!(
        (
            restart.last_restart_time.clone(),
            restart.pending_since.clone()
        ),
        (Some(Time(due)), None)
    );
}

#[tokio::test]
async fn a_revoke_restarts_at_once_even_within_the_interval() {
    let mut h = Harness::new(with_web_target(json!({}))).await;
    first_pass(&mut h).await;
    requested_refresh(&mut h, "r1").await;
    h.expect_workload_restart("deployments", "web", StatusCode::OK)
        .await;
    h.expect_event(NORMAL, reason::WORKLOAD_RESTARTED).await;
    h.expect_status_apply().await;
    h.finish_pass().await;

    start_revoke_pass(&mut h).await;
    h.expect_secret_apply().await;
    let pending = h.expect_status_apply().await;
    assert!(pending.rollout_restart.as_ref().unwrap().pending_revoke);
    h.expect_event(NORMAL, reason::TOKEN_ISSUED).await;
    h.expect_workload_restart("deployments", "web", StatusCode::OK)
        .await;
    h.expect_event(NORMAL, reason::WORKLOAD_RESTARTED).await;
    let status = h.expect_status_apply().await;
    h.finish_pass().await;
    let restart = status.rollout_restart.as_ref().unwrap();
    assert_eq!(restart.last_restart_time, Some(Time(h.now())));
    assert!(!restart.pending_revoke);
}

#[tokio::test]
async fn a_missing_or_forbidden_target_is_reported_and_the_token_is_delivered() {
    let spec = json!({ "rolloutRestartTargets": [
        { "kind": "Deployment", "name": "web" },
        { "kind": "StatefulSet", "name": "db" },
    ] });
    let mut h = Harness::new(identity(spec)).await;
    first_pass(&mut h).await;
    let pending = requested_refresh(&mut h, "r1").await;
    assert_eq!(ready(&pending), ("True", reason::TOKEN_ISSUED));
    h.expect_workload_restart("deployments", "web", StatusCode::NOT_FOUND)
        .await;
    let missing = h
        .expect_event(WARNING, reason::RESTART_TARGET_NOT_FOUND)
        .await;
    h.expect_workload_restart("statefulsets", "db", StatusCode::FORBIDDEN)
        .await;
    let forbidden = h.expect_event(WARNING, reason::RESTART_FORBIDDEN).await;
    let status = h.expect_status_apply().await;
    h.finish_pass().await;
    assert!(
        missing["note"]
            .as_str()
            .unwrap()
            .contains("Deployment \"web\"")
    );
    assert!(
        forbidden["note"]
            .as_str()
            .unwrap()
            .contains("rolloutRestart.enabled=true")
    );
    let failed: Vec<(&str, &str)> = status
        .rollout_restart
        .as_ref()
        .unwrap()
        .failed_targets
        .iter()
        .map(|f| (f.name.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(
        failed,
        [
            ("web", reason::RESTART_TARGET_NOT_FOUND),
            ("db", reason::RESTART_FORBIDDEN)
        ]
    );
    assert_eq!(ready(&status), ("True", reason::TOKEN_ISSUED));
    let secret = h.cluster.token_secret.as_ref().expect("the Secret");
    assert_eq!(
        h.acs.token_status(&secret_value(secret, "token")).await,
        "valid"
    );
}

#[tokio::test]
async fn switching_from_scopes_to_tokens_issues_the_new_tokens_and_takes_the_old_keys_out() {
    let mut h = Harness::new(identity(json!({}))).await;
    let created = first_pass(&mut h).await;
    h.acs.calls().await;
    h.restart();
    h.cluster.edit_spec(|spec| {
        spec.scopes.clear();
        spec.tokens = serde_json::from_value(two_tokens()).expect("spec.tokens");
    });

    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_connection_secret_get().await;
    h.expect_secret_apply().await;
    h.expect_secret_keys_removed(&["token", "expiresOn", "scopes"])
        .await;
    let status = h.expect_status_apply().await;
    h.expect_event(NORMAL, reason::TOKEN_ISSUED).await;
    h.finish_pass().await;
    assert_eq!(
        h.acs.calls().await,
        ["issueAccessToken 200", "issueAccessToken 200"]
    );
    let secret = h.cluster.token_secret.as_ref().expect("the Secret");
    assert_eq!(
        secret_keys(secret),
        [
            "chat.expiresOn",
            "chat.scopes",
            "chat.token",
            "endpoint",
            "identityId",
            "voip.expiresOn",
            "voip.scopes",
            "voip.token",
        ]
    );
    assert_eq!(
        status.identity_id, created.status.identity_id,
        "the same identity"
    );
    assert!(status.token_scopes.is_empty() && status.token_lifetime_minutes.is_none());
    assert_eq!(status.tokens.len(), 2);
    assert_eq!(ready(&status), ("True", reason::TOKEN_ISSUED));
}

#[tokio::test]
async fn a_refresh_without_budget_waits_in_the_queue_and_says_since_when_without_an_event() {
    let mut h = Harness::new(identity(json!({}))).await;
    let created = first_pass(&mut h).await;
    h.acs.calls().await;
    // Everything else this endpoint's budget allows in the window went out just now.
    let limits = acs::RateLimits::for_endpoint(&h.acs.endpoint(), acs::Quota::default());
    let budget = acs::Operation::IssueToken.published_limit();
    for number in 0..budget {
        let ticket = acs::Ticket {
            class: acs::Class::New,
            deadline: h.now(),
            tenant: "elsewhere".into(),
            key: format!("other-{number}"),
            asked_at: h.now(),
        };
        let permit = limits.acquire(acs::Operation::IssueToken, &ticket, None);
        drop(permit.await.expect("within the budget"));
    }

    h.restart();
    h.cluster
        .annotate(crate::crd::REFRESH_REQUESTED_ANNOTATION, "r1");
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_identity_get().await;
    h.expect_connection_secret_get().await;
    // No ACS call and no Event: the condition says it waits, and since when.
    let status = h.expect_status_apply().await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_eq!(ready(&status), ("True", reason::WAITING_FOR_ACS));
    let message = ready_message(&status);
    assert!(
        message.starts_with(&format!("waiting for ACS budget since {}", h.now())),
        "{message}"
    );
    assert!(
        message.contains("the token in the Secret stays valid until"),
        "{message}"
    );
    assert_eq!(status.failed_attempts, 0, "waiting is no failure");
    assert_eq!(status.next_refresh_time, created.status.next_refresh_time);
    assert_eq!(status.handled_refresh_request, None, "still to do");
    // It is called back when its slot frees (a window from now), and looks again in 5 min
    // should that call be missed.
    assert_eq!(action, Action::requeue(Duration::from_secs(5 * 60)));
    assert_eq!(h.turns_called(), 0, "not before its slot is granted");
}

/// Reserves every create slot of the harness's endpoint for a burst elsewhere; returns the
/// limits and the burst's keys.
async fn fill_create_budget(h: &Harness) -> (std::sync::Arc<acs::RateLimits>, Vec<String>) {
    let limits = acs::RateLimits::for_endpoint(&h.acs.endpoint(), acs::Quota::default());
    let burst: Vec<String> = (0..acs::Operation::CreateIdentity.published_limit())
        .map(|number| format!("burst-{number}"))
        .collect();
    for key in &burst {
        let ticket = acs::Ticket {
            class: acs::Class::New,
            deadline: h.now(),
            tenant: "elsewhere".into(),
            key: key.clone(),
            asked_at: h.now(),
        };
        let reserved = limits.reserve(acs::Operation::CreateIdentity, &ticket, None);
        reserved.await.expect("within the budget");
    }
    (limits, burst)
}

#[tokio::test]
async fn a_new_resource_behind_a_burst_writes_only_its_condition_until_its_create_can_go_out() {
    let mut h = Harness::new(identity(json!({}))).await;
    let (limits, burst) = fill_create_budget(&h).await;

    // Its first pass writes its place in the queue and nothing else: no finalizer, no create
    // mark, no read of the resource, no ACS call, no Event.
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_connection_secret_get().await;
    let status = h.expect_status_apply().await;
    h.finish_pass().await;
    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_eq!(ready(&status), ("False", reason::WAITING_FOR_ACS));
    assert!(h.cluster.identity.finalizers().is_empty());
    assert!(!h.cluster.identity.create_attempted());
    assert_eq!(h.turns_called(), 0, "not before its slot is granted");

    // One slot of the burst comes free: it is granted to this resource, which is called back.
    limits.withdraw(&burst[0]);
    assert_eq!(h.turns_called(), 1);
    // The pass called back takes the slot and makes the requests of a first pass: the
    // finalizer with the create mark proves its cache current, so the resource is not read.
    let created = first_pass(&mut h).await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);
    assert_eq!(ready(&created.status), ("True", reason::TOKEN_ISSUED));
    for key in &burst[1..] {
        limits.withdraw(key);
    }
}

#[tokio::test]
async fn resources_waiting_in_the_queue_share_one_read_of_their_held_connection_secret() {
    let mut h = Harness::new(identity(json!({}))).await;
    let connection = h
        .cluster
        .connection_secret
        .as_mut()
        .expect("a connection Secret");
    connection.metadata.finalizers = Some(vec![CONNECTION_SECRET_FINALIZER.into()]);
    let (limits, burst) = fill_create_budget(&h).await;
    h.watch_lists_secrets();

    h.start_pass();
    h.expect_connection_secret_get().await;
    let status = h.expect_status_apply().await;
    h.finish_pass().await;
    assert_eq!(ready(&status), ("False", reason::WAITING_FOR_ACS));
    // The next pass (any resource of the namespace waiting behind the burst) reads nothing:
    // the Secret it needs was read a moment ago, and is held; the condition is written already.
    h.start_pass();
    h.finish_pass().await;
    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    for key in &burst {
        limits.withdraw(key);
    }
}

const ACS_CONNECTION_PATH: &str =
    "/apis/acs-operator.io/v1alpha1/namespaces/chat-app/acsconnections/team";
const CLUSTER_CONNECTION_PATH: &str = "/apis/acs-operator.io/v1alpha1/clusteracsconnections/shared";

/// The AcsConnection `team` of the namespace, its access key in Secret `secret` of it.
fn acs_connection(secret: &str) -> serde_json::Value {
    json!({
        "apiVersion": "acs-operator.io/v1alpha1",
        "kind": "AcsConnection",
        "metadata": { "name": "team", "namespace": NAMESPACE, "resourceVersion": "7" },
        "spec": { "accessKey": { "secretRef": { "name": secret } } },
    })
}

/// The ClusterAcsConnection `shared`, its access key in Secret `acs-key` of the operator's
/// namespace, allowing the namespaces `conditions` allow.
fn cluster_connection(conditions: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "acs-operator.io/v1alpha1",
        "kind": "ClusterAcsConnection",
        "metadata": { "name": "shared", "resourceVersion": "8" },
        "spec": {
            "accessKey": { "secretRef": { "name": "acs-key" } },
            "conditions": conditions,
        },
    })
}

#[tokio::test]
async fn an_acs_connection_with_an_access_key_serves_as_the_connection_secret_does() {
    let mut h = Harness::new(identity_via("AcsConnection", "team")).await;
    h.start_pass();
    h.expect_token_secret_get().await;
    let connection = acs_connection(CONNECTION_SECRET);
    h.expect_get("AcsConnection", ACS_CONNECTION_PATH, Some(connection))
        .await;
    h.expect_connection_secret_get().await;
    // The finalizer before the create; the Secret is the connection's to manage, so it gets
    // none of the operator's.
    h.expect_finalizer_and_create_mark().await;
    let created = finish_first_pass(&mut h).await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);
    assert_eq!(ready(&created.status), ("True", reason::TOKEN_ISSUED));
    let secret = h.cluster.connection_secret.as_ref().expect("the Secret");
    assert!(secret.finalizers().is_empty());

    // Deleted, it cleans up in ACS through the same connection, and releases no Secret.
    h.acs.calls().await;
    h.restart();
    h.cluster.delete_identity(h.now());
    h.start_pass();
    let connection = acs_connection(CONNECTION_SECRET);
    h.expect_get("AcsConnection", ACS_CONNECTION_PATH, Some(connection))
        .await;
    h.expect_connection_secret_get().await;
    h.expect_event(NORMAL, reason::IDENTITY_DELETED).await;
    h.expect_identity_finalizer_patch(&[]).await;
    let action = h.finish_pass().await;
    assert_eq!(h.acs.calls().await, ["deleteIdentity 204"]);
    assert_eq!(h.acs.token_status(&created.token()).await, "deleted");
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_cluster_connection_serves_a_namespace_it_names_with_the_key_in_the_operators_namespace()
{
    let mut h = Harness::new(identity_via("ClusterAcsConnection", "shared")).await;
    let mut key_secret = serde_json::to_value(h.cluster.connection_secret.clone()).unwrap();
    key_secret["metadata"]["name"] = json!("acs-key");
    key_secret["metadata"]["namespace"] = json!(OPERATOR_NAMESPACE);
    h.start_pass();
    h.expect_token_secret_get().await;
    let connection = cluster_connection(json!([{ "namespaces": ["other", NAMESPACE] }]));
    h.expect_get(
        "ClusterAcsConnection",
        CLUSTER_CONNECTION_PATH,
        Some(connection),
    )
    .await;
    // Named, so its labels are not read.
    let key_path = format!("/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets/acs-key");
    h.expect_get("the connection's Secret", &key_path, Some(key_secret))
        .await;
    h.expect_finalizer_and_create_mark().await;
    let created = finish_first_pass(&mut h).await;
    assert_eq!(h.acs.calls().await, ["createIdentityWithToken 201"]);
    assert_eq!(ready(&created.status), ("True", reason::TOKEN_ISSUED));
}

#[tokio::test]
async fn a_cluster_connection_refuses_a_namespace_its_selector_does_not_match() {
    let mut h = Harness::new(identity_via("ClusterAcsConnection", "shared")).await;
    h.start_pass();
    h.expect_token_secret_get().await;
    let selector = json!({ "matchLabels": { "acs-operator.io/allowed": "true" } });
    let connection = cluster_connection(json!([{ "namespaceSelector": selector }]));
    h.expect_get(
        "ClusterAcsConnection",
        CLUSTER_CONNECTION_PATH,
        Some(connection),
    )
    .await;
    let namespace = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": NAMESPACE, "labels": { "team": "chat" } },
    });
    let namespace_path = format!("/api/v1/namespaces/{NAMESPACE}");
    h.expect_get("the Namespace", &namespace_path, Some(namespace))
        .await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::NAMESPACE_NOT_ALLOWED).await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_eq!(ready(&status), ("False", reason::NAMESPACE_NOT_ALLOWED));
    let message = ready_message(&status);
    assert!(
        message.starts_with(
            "ClusterAcsConnection \"shared\" does not allow namespace \"chat-app\"; ask its owner"
        ),
        "{message}"
    );
    assert!(h.cluster.identity.finalizers().is_empty(), "nothing in ACS");
    assert_eq!(action, Action::requeue(USER_ERROR_RETRY));
}

#[tokio::test]
async fn a_connection_that_does_not_exist_is_reported_before_anything_reaches_acs() {
    let mut h = Harness::new(identity_via("AcsConnection", "team")).await;
    h.start_pass();
    h.expect_token_secret_get().await;
    h.expect_get("AcsConnection", ACS_CONNECTION_PATH, None)
        .await;
    let status = h.expect_status_apply().await;
    h.expect_event(WARNING, reason::CONNECTION_NOT_FOUND).await;
    let action = h.finish_pass().await;

    assert_eq!(h.acs.calls().await, Vec::<String>::new());
    assert_eq!(ready(&status), ("False", reason::CONNECTION_NOT_FOUND));
    assert_eq!(action, Action::requeue(USER_ERROR_RETRY));
}
