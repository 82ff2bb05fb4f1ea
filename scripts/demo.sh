#!/usr/bin/env bash
# The ACS access-token quickstart, told through the cluster: create identity -> issue token ->
# refresh -> revoke -> delete, each line printed only once the operator has done it and the demo
# has seen it in the resource's status, its Secret, its Events and the emulator.
#
# Builds what it needs, starts a local control plane, the acs-emulator and the operator, and
# stops all of them on exit. Exits 0 only when every step was observed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh

export ACS_DEV_DIR=$repo/.dev/demo
export ACS_WATCH_PID=$$
demo_dir=$ACS_DEV_DIR
mkdir -p "$demo_dir"
namespace=acs-demo
emulator_pid="" operator_pid=""
cleanup() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null || true
  [ -n "$emulator_pid" ] && kill "$emulator_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  scripts/local-cluster.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() {
  echo "demo: FAILED: $*" >&2
  echo "demo: operator log: $demo_dir/operator.log" >&2
  exit 1
}
info() { echo "demo: $*" >&2; }

info "building the operator and the emulator (cargo shows its progress)"
cargo build --workspace --bins --locked
bin=$CARGO_TARGET_DIR/debug

info "starting the local control plane"
scripts/local-cluster.sh up
eval "$(scripts/local-cluster.sh env)"

# Waits up to $1 seconds for the command after it to succeed.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.3
  done
}
jsonpath() { kubectl -n $namespace get commid alice -o "jsonpath=$1"; }
secret_value() { kubectl -n $namespace get secret alice-acs-token -o "jsonpath={.data.$1}" | base64 -d; }
emulator() { # METHOD PATH [JSON]
  curl -sf --cacert "$demo_dir/emulator/ca.crt" -X "$1" -H 'content-type: application/json' \
    ${3:+-d "$3"} "$endpoint/_emulator/$2"
}
token_status() { emulator POST validate "{\"token\":\"$1\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])'; }
has_event() { kubectl -n $namespace get events.events.k8s.io -o jsonpath='{.items[*].reason}' | grep -qw "$1"; }
# A token is shown only as its first characters (the same JWT header for every token) and a
# short fingerprint that tells tokens apart without revealing them.
redact() { echo "${1:0:12}… (${#1} characters, sha256 $(printf '%s' "$1" | sha256sum | cut -c1-12))"; }
# Tokens carry whole-second times: two minted in the same second for the same identity and
# scopes are identical, so the next one is asked for once the current token's second is over
# (the example's tokens live 1 h).
after_mint_second() {
  local minted=$(($(date -d "$(secret_value expiresOn)" +%s) - 3600))
  wait_until 3 test "$(date +%s)" -gt "$minted"
}

info "starting acs-emulator (HTTPS, its own CA)"
rm -rf "$demo_dir/emulator" && mkdir -p "$demo_dir/emulator"
coproc EMULATOR { exec "$bin/acs-emulator" --listen 127.0.0.1:0 --tls-dir "$demo_dir/emulator" --admin 2>"$demo_dir/emulator.log"; }
emulator_pid=$EMULATOR_PID
read -r -t 30 connection_string <&"${EMULATOR[0]}" || fail "the emulator did not start; see $demo_dir/emulator.log"
endpoint=$(echo "$connection_string" | sed -n 's/^endpoint=\([^;]*\)\/;.*/\1/p')

info "installing the CRD and the connection Secret"
kubectl apply -f crds/communicationidentity.yaml >/dev/null
kubectl wait --for condition=Established crd/communicationidentities.acs-operator.io --timeout 30s >/dev/null
kubectl create namespace $namespace --dry-run=client -o yaml | kubectl apply -f - >/dev/null
umask 077
printf '%s' "$connection_string" >"$demo_dir/connection-string"
kubectl -n $namespace create secret generic acs-connection \
  --from-file=connectionString="$demo_dir/connection-string" >/dev/null

info "starting the operator"
"$bin/acs-identity-operator" run --watch-namespace $namespace --acs-ca-file "$demo_dir/emulator/ca.crt" \
  >"$demo_dir/operator.log" 2>&1 &
operator_pid=$!

echo
echo "Azure Communication Services - Access Tokens Quickstart (through acs-identity-operator)"
kubectl -n $namespace apply -f examples/communicationidentity.yaml >/dev/null
wait_until 60 test "$(jsonpath '{.status.conditions[?(@.type=="Ready")].status}')" = True ||
  fail "alice did not become Ready: $(jsonpath '{.status.conditions}')"
identity=$(jsonpath '{.status.identityId}')
wait_until 10 has_event IdentityCreated || fail "no IdentityCreated event"
echo "Created an identity: $identity"

token=$(secret_value token)
[ "$(token_status "$token")" = valid ] || fail "the emulator does not accept the token in the Secret"
echo "Issued an access token with '$(secret_value scopes)' scope that expires at $(secret_value expiresOn):"
echo "  $(redact "$token")  (in Secret alice-acs-token)"

after_mint_second
kubectl -n $namespace annotate commid alice acs-operator.io/refresh-requested-at="$(date +%s)" --overwrite >/dev/null
wait_until 30 test "$(secret_value token)" != "$token" || fail "the refresh request was not acted on"
refreshed=$(secret_value token)
wait_until 10 has_event TokenRefreshed || fail "no TokenRefreshed event"
echo "Refreshed the access token (requested by annotation); it now expires at $(secret_value expiresOn):"
echo "  $(redact "$refreshed")  (the previous token stays valid: a refresh never revokes)"

after_mint_second
kubectl -n $namespace annotate commid alice acs-operator.io/revoke-requested-at="$(date +%s)" --overwrite >/dev/null
wait_until 30 test "$(token_status "$refreshed")" = revoked || fail "the revoke request was not acted on"
wait_until 30 test "$(secret_value token)" != "$refreshed" || fail "no new token after the revoke"
reissued=$(secret_value token)
[ "$(token_status "$reissued")" = valid ] || fail "the token issued after the revoke is not valid"
echo "Successfully revoked all access tokens for identity with ID: $identity"
echo "  and issued a fresh one: $(redact "$reissued")"

kubectl -n $namespace delete commid alice --wait=true --timeout 60s >/dev/null
wait_until 30 test "$(token_status "$reissued")" = deleted || fail "the identity is still alive in ACS"
wait_until 60 bash -c "! kubectl -n $namespace get secret alice-acs-token" || fail "the Secret outlived its owner"
echo "Deleted the identity with ID: $identity (gone from ACS; its Secret removed with it)"
echo
info "every step observed; stopping everything"
