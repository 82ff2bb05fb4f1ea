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

# start NAME ARGS...: starts an emulator and sets CONN_<NAME> to its connection string.
start() {
  local name="$1"
  shift
  "$BIN" --listen 127.0.0.1:0 --admin "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=("$!")
  local pid="$!"
  for _ in $(seq 1 300); do
    # A whole line (the emulator flushes it with its newline) means it is accepting.
    if [[ $(wc -l <"$WORK/$name.out") -ge 1 ]]; then
      printf -v "CONN_$name" '%s' "$(head -n 1 "$WORK/$name.out")"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "acs-emulator ($name) exited before it was ready:" >&2
      cat "$WORK/$name.err" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "acs-emulator ($name) printed no connection string within 30 s" >&2
  return 1
}

start HTTP --http
start HTTPS --tls-dir "$WORK/tls"

export ACS_EMULATOR_HTTP="$CONN_HTTP"
export ACS_EMULATOR_HTTPS="$CONN_HTTPS"
export ACS_EMULATOR_CA="$WORK/tls/ca.crt"
# How the SDK (requests) is told to trust a private CA.
export REQUESTS_CA_BUNDLE="$WORK/tls/ca.crt"

"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/conformance/sdk_conformance.py" "$@"
