#!/usr/bin/env bash
# The whole test suite: formatting and lints, the dependencies' licenses and sources, unit tests,
# Microsoft's SDK against the emulator, and integration tests on a real local control plane. Exits non-zero when anything fails and
# leaves no process running.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh

step() { echo "==> $*"; }

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "dependencies: licenses, duplicate versions and sources (cargo-deny, offline)"
scripts/check-deps.sh

step "the Dockerfile: lint, and the release binary built exactly as it builds it"
scripts/check-dockerfile.sh

step "the chart's alerts: promtool check rules and test rules"
scripts/check-alerts.sh

step "building the binaries"
cargo build --workspace --bins --locked

export ACS_DEV_DIR=$repo/.dev/test
export ACS_WATCH_PID=$$
trap 'scripts/local-cluster.sh down >/dev/null 2>&1 || true' EXIT
step "starting the local control plane"
scripts/local-cluster.sh up
eval "$(scripts/local-cluster.sh env)"
export ACS_TEST_REUSE_CLUSTER=1

step "Microsoft's azure-communication-identity SDK against acs-emulator"
tests/conformance/run.sh

step "unit and integration tests"
# In a session of its own, so that whatever the tests start (operator and emulator processes)
# is stopped with it, even if the test binary itself is killed.
setsid cargo test --workspace --locked &
tests_pid=$!
trap 'kill -- -"$tests_pid" 2>/dev/null || true; scripts/local-cluster.sh down >/dev/null 2>&1 || true' EXIT
wait "$tests_pid"
