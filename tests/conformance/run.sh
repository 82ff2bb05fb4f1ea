#!/usr/bin/env bash
# Runs Microsoft's own ACS identity SDK (azure-communication-identity 1.5.0, unchanged) against
# acs-emulator, over plain HTTP and over HTTPS with the emulator's CA.
#
# Creates a venv under ~/.cache/acs-identity-operator/venv when missing, builds the emulator,
# starts two instances on free ports (--listen 127.0.0.1:0; the port is read from the printed
# connection string), runs pytest, and stops the emulators on exit. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${ACS_CONFORMANCE_VENV:-$HOME/.cache/acs-identity-operator/venv}"
PACKAGES=(azure-communication-identity==1.5.0 aiohttp pytest)

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import importlib.metadata as m, aiohttp, pytest; assert m.version("azure-communication-identity") == "1.5.0"' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
fi

cd "$ROOT"
cargo build --quiet -p acs-emulator
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/acs-emulator"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$ROOT/scripts/lib/emulator.sh"
# start NAME ARGS...: starts an emulator and sets CONN_<NAME> to its connection string.
start() {
  local name="$1"
  shift
  emulator_start "$name" "$WORK" "$BIN" --admin "$@"
  PIDS+=("$emulator_pid")
  printf -v "CONN_$name" '%s' "$emulator_connection_string"
}

start HTTP --http
start HTTPS --tls-dir "$WORK/tls"

export ACS_EMULATOR_HTTP="$CONN_HTTP"
export ACS_EMULATOR_HTTPS="$CONN_HTTPS"
export ACS_EMULATOR_CA="$WORK/tls/ca.crt"
# How the SDK (requests) is told to trust a private CA.
export REQUESTS_CA_BUNDLE="$WORK/tls/ca.crt"

"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/conformance/sdk_conformance.py" "$@"
