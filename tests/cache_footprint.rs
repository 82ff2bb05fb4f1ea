//! What the controller's cache holds per CommunicationIdentity, counted by an allocator that
//! adds up every live allocation: deterministic, unlike the RSS scenario 3 of
//! docs/benchmarks.md measures. The cached form of a typical Ready resource, with the key the
//! cache files it under, was ~2,200 bytes as `CommunicationIdentity`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use acs_identity_operator::cached::CachedIdentity;
use acs_identity_operator::crd::CommunicationIdentity;
use kube::runtime::reflector::ObjectRef;
use serde_json::{Value, json};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(pointer, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A Ready resource as the API server sends it, `number` making its name, uid and times its own.
fn ready_resource(number: usize) -> Value {
    let at = |hour: usize| {
        format!(
            "2026-12-04T{hour:02}:{:02}:{:02}Z",
            number % 60,
            number * 7 % 60
        )
    };
    json!({
        "apiVersion": "acs-operator.io/v1alpha1",
        "kind": "CommunicationIdentity",
        "metadata": {
            "name": format!("web-{number:05}"),
            "namespace": "team-a",
            "uid": format!("5b7c2a8e-1f0d-4c1e-9d1a-{number:012}"),
            "resourceVersion": format!("{}", 1_000_000 + number),
            "generation": 1,
            "creationTimestamp": at(2),
            "finalizers": ["acs-operator.io/cleanup"],
            "labels": { "app": "web" },
            "managedFields": [{ "manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                                "fieldsV1": { "f:spec": { "f:scopes": {}, "f:tokenLifetime": {} } } }]
        },
        "spec": {
            "connectionSecretRef": { "name": "acs-connection", "key": "connectionString" },
            "scopes": ["chat"],
            "tokenLifetime": "24h"
        },
        "status": {
            "identityId": format!("8:acs:6f1d2c3b-4a5e-4f60-8b7c-9d0e1f2a3b4c_0000001b-2c3d-4e5f-6071-{number:012}"),
            "secretName": format!("web-{number:05}-acs-token"),
            "tokenExpiresOn": at(3),
            "lastRefreshTime": at(2),
            "nextRefreshTime": at(20),
            "tokenScopes": ["chat"],
            "tokenLifetimeMinutes": 1440,
            "observedGeneration": 1,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "TokenIssued",
                "message": format!("Secret \"web-{number:05}-acs-token\" holds a token valid until {}", at(3)),
                "lastTransitionTime": at(2), "observedGeneration": 1
            }]
        }
    })
}

#[test]
fn a_cached_ready_resource_costs_under_1200_bytes() {
    const RESOURCES: usize = 1000;
    let bodies: Vec<String> = (0..RESOURCES)
        .map(|number| ready_resource(number).to_string())
        .collect();
    let mut cache = Vec::with_capacity(RESOURCES);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for body in &bodies {
        let resource: CommunicationIdentity = serde_json::from_str(body).expect("a resource");
        let cached = CachedIdentity::from(resource);
        cache.push((ObjectRef::from_obj(&cached), Arc::new(cached)));
    }
    let per_resource = (LIVE_BYTES.load(Ordering::Relaxed) - before) / RESOURCES as isize;
    eprintln!("{per_resource} bytes a resource");
    assert!(per_resource < 1200, "{per_resource} bytes a resource");
    let (_, cached) = &cache[7];
    let unpacked = cached.unpack().expect("unpacks");
    assert_eq!(
        unpacked.status.and_then(|s| s.secret_name).as_deref(),
        Some("web-00007-acs-token")
    );
}
