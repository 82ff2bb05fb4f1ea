#!/usr/bin/env bash
# The performance and chaos harness (issue 7; docs/benchmarks.md). Builds the release binaries,
# then runs one scenario of crates/bench, which starts its own control plane (state under
# .dev/bench-SCENARIO), emulator(s) and operator(s), prints progress and a table, writes JSON
# under bench-results/, and stops everything it started. Never part of the test command.
#
#   scripts/bench.sh provision-limited [--n 10000]
#   scripts/bench.sh provision-unlimited [--n 10000] [--resources 1]
#   scripts/bench.sh memory [--n 10000] [--secrets N] [--settle 15]
#   scripts/bench.sh idle [--n 10000] [--idle-seconds 300]
#   scripts/bench.sh crash [--n 200] [--kills 20] [--delete-kills 10]
#   scripts/bench.sh soak [--n 200] [--sim-hours 24] [--time-scale 60] [--outage-seconds 120]
#   scripts/bench.sh scale-out [--n 2500] [--resources 4]
#   scripts/bench.sh refresh-under-burst [--burst 5000] [--due 100]
#   scripts/bench.sh SCENARIO --help
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh
[ $# -ge 1 ] || {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
cargo build --release --locked --workspace --bins
exec "$CARGO_TARGET_DIR/release/acs-bench" "$@"
