//! The CRD checked in under crds/ must be exactly what `acs-identity-operator crd` prints.

use std::process::Command;

const CHECKED_IN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/communicationidentity.yaml"
);

#[test]
fn checked_in_crd_matches_the_generated_one() {
    let output = Command::new(env!("CARGO_BIN_EXE_acs-identity-operator"))
        .arg("crd")
        .output()
        .expect("run acs-identity-operator crd");
    assert!(
        output.status.success(),
        "acs-identity-operator crd failed: {output:?}"
    );
    let generated = String::from_utf8(output.stdout).expect("the CRD is UTF-8");
    let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
    assert!(
        generated == checked_in,
        "crds/communicationidentity.yaml is stale; regenerate it with\n\
         \n    cargo run -- crd > crds/communicationidentity.yaml\n"
    );
}
