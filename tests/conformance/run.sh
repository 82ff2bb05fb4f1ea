#!/usr/bin/env bash
# Runs Microsoft's own ACS identity SDK (azure-communication-identity 1.5.0, unchanged) against
# acs-emulator, over plain HTTP and over HTTPS with the emulator's CA, and with Microsoft's
# azure-identity (1.27.0) signing in at the emulator's Entra authority with a federated client
# assertion (workload identity) instead of the access key.
#
# Creates a venv under ~/.cache/acs-identity-operator/venv when missing, builds the emulator,
# starts two instances on free ports (--listen 127.0.0.1:0; the port is read from the printed
# connection string), runs pytest, and stops the emulators on exit. Extra arguments go to pytest.
# The HTTPS one also trusts a throwaway ServiceAccount issuer (tests/conformance/issuer.py: a
# key pair made for this run, its public key given as a JWKS file) for one federated credential.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${ACS_CONFORMANCE_VENV:-$HOME/.cache/acs-identity-operator/venv}"
PACKAGES=(azure-communication-identity==1.5.0 azure-identity==1.27.0 aiohttp pytest)

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import importlib.metadata as m, aiohttp, pytest; assert m.version("azure-communication-identity") == "1.5.0" and m.version("azure-identity") == "1.27.0"' 2>/dev/null; then
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

# The Entra application the tests sign in as (any GUIDs: the emulator knows only these).
export ACS_ENTRA_TENANT=9f3c2a1e-4b5d-4c6e-8f70-123456789abc
export ACS_ENTRA_CLIENT=0e1d2c3b-4a59-4687-9a1b-c2d3e4f5a6b7
# Prints the issuer URL and the subject its tokens name, one a line.
{ read -r ISSUER; read -r SUBJECT; } < <("$VENV/bin/python" "$ROOT/tests/conformance/issuer.py" "$WORK/issuer")
export ACS_ENTRA_ISSUER_KEY="$WORK/issuer/issuer.key"

start HTTP --http
start HTTPS --tls-dir "$WORK/tls" \
  --federated-credential "tenant=$ACS_ENTRA_TENANT,client=$ACS_ENTRA_CLIENT,issuer=$ISSUER,subject=$SUBJECT" \
  --issuer-jwks-file "$ISSUER=$WORK/issuer/jwks.json"

export ACS_EMULATOR_HTTP="$CONN_HTTP"
export ACS_EMULATOR_HTTPS="$CONN_HTTPS"
export ACS_EMULATOR_CA="$WORK/tls/ca.crt"
# How the SDK (requests) is told to trust a private CA.
export REQUESTS_CA_BUNDLE="$WORK/tls/ca.crt"

"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/conformance/sdk_conformance.py" "$@"
