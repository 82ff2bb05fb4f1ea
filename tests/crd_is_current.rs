//! The CRDs checked in under crds/ must be exactly what `acs-identity-operator crd` prints.

use std::path::PathBuf;
use std::process::Command;

use acs_identity_operator::connection::{AcsConnection, ClusterAcsConnection};
use acs_identity_operator::crd::CommunicationIdentity;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;

/// Found at run time (cargo sets CARGO_MANIFEST_DIR for the test process): a build cache shared
/// by checkouts at other paths can hand this checkout a binary compiled in another one, whose
/// compile-time path may no longer exist.
fn checked_in() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo test"))
        .join("crds/acs-operator.io.yaml")
}

fn printed_crd() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_acs-identity-operator"))
        .arg("crd")
        .output()
        .expect("run acs-identity-operator crd");
    assert!(
        output.status.success(),
        "acs-identity-operator crd failed: {output:?}"
    );
    String::from_utf8(output.stdout).expect("the CRD is UTF-8")
}

/// Guards the YAML emitter: quoting or block styles that changed a CEL rule or a message would
/// otherwise show only as a rule the API server evaluates differently.
#[test]
fn printed_crd_reads_back_as_the_crd() {
    let read_back = serde_saphyr::from_multiple::<CustomResourceDefinition>(&printed_crd())
        .expect("the printed CRDs are YAML");
    let expected = [
        CommunicationIdentity::crd(),
        AcsConnection::crd(),
        ClusterAcsConnection::crd(),
    ];
    assert_eq!(
        serde_json::to_value(read_back).unwrap(),
        serde_json::to_value(expected).unwrap()
    );
}

#[test]
fn checked_in_crd_matches_the_generated_one() {
    let generated = printed_crd();
    let checked_in = std::fs::read_to_string(checked_in()).unwrap_or_default();
    assert!(
        generated == checked_in,
        "crds/acs-operator.io.yaml is stale; regenerate it with\n\
         \n    cargo run --locked -- crd > crds/acs-operator.io.yaml\n"
    );
}
