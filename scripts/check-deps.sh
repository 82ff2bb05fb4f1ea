#!/usr/bin/env bash
# Checks the dependency tree with cargo-deny and deny.toml: licenses (only those allowed there),
# bans (two versions of a crate warn) and sources (crates.io and path dependencies only). It
# runs offline, so advisories, which need the advisory database, are not checked.
#
# cargo-deny is installed once, pinned, under $ACS_CACHE_DIR; that first install compiles it
# (about 4 minutes on 2 cores). `cargo deny check` run by hand shows what each warning's crate
# is pulled in by.
#
# Usage: scripts/check-deps.sh          (exits non-zero on any finding)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh

CARGO_DENY_VERSION=0.20.2
root=$ACS_CACHE_DIR/cargo-deny-$CARGO_DENY_VERSION
if [ ! -x "$root/bin/cargo-deny" ]; then
  echo "installing cargo-deny $CARGO_DENY_VERSION into $root (once)" >&2
  # In a target directory of its own (cargo's temporary one), not the workspace's shared one.
  env -u CARGO_TARGET_DIR cargo install --locked --quiet "cargo-deny@$CARGO_DENY_VERSION" --root "$root"
fi
# cargo-deny reads the metadata of every platform's dependencies (the Windows crates too), which
# builds on Linux never download: fetch them first, or a fresh home fails offline.
cargo fetch --locked --quiet
PATH=$root/bin:$PATH cargo deny --locked --offline check --hide-inclusion-graph licenses bans sources
