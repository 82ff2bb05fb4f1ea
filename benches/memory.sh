#!/usr/bin/env bash
# Operator memory against the cluster's Secret count: resident set size (VmRSS) of an operator
# watching all namespaces with 100 Ready CommunicationIdentities, first with no other Secrets in
# the cluster, then with 5,000 unrelated Secrets of 1 KiB each. The operator watches only the
# Secrets it labels (metadata only, kube-runtime's `Controller::owns`), so both numbers should be
# about the same. Each figure is from a freshly started operator, once every resource is Ready
# and it has idled for $SETTLE seconds.
#
#   benches/memory.sh            # its own control plane under .dev/memory, stopped on exit
#   IDENTITIES=100 SECRETS=5000 SETTLE=10 PROFILE=release benches/memory.sh
#
# Not part of the test command.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh

IDENTITIES=${IDENTITIES:-100}
SECRETS=${SECRETS:-5000}
SETTLE=${SETTLE:-10}
PROFILE=${PROFILE:-dev}
export ACS_DEV_DIR=$repo/.dev/memory
export ACS_WATCH_PID=$$
work=$ACS_DEV_DIR/bench
mkdir -p "$work"
namespace=memory-identities
noise=memory-noise
emulator_pid="" operator_pid=""

say() { echo "memory: $*" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}
stop_operator() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  operator_pid=""
}
cleanup() {
  stop_operator || true
  [ -n "$emulator_pid" ] && kill "$emulator_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  scripts/local-cluster.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Waits up to $1 seconds for the command after it to succeed.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

say "building ($PROFILE)"
cargo build --workspace --bins --locked --profile "$PROFILE"
bin=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")

scripts/local-cluster.sh up
eval "$(scripts/local-cluster.sh env)"

coproc EMULATOR { exec "$bin/acs-emulator" --listen 127.0.0.1:0 --tls-dir "$work/emulator" --admin 2>"$work/emulator.log"; }
emulator_pid=$EMULATOR_PID
read -r -t 30 connection_string <&"${EMULATOR[0]}" || fail "the emulator did not start"

kubectl apply -f crds/communicationidentity.yaml >/dev/null
kubectl wait --for condition=Established crd/communicationidentities.acs-operator.io --timeout 30s >/dev/null
for ns in $namespace $noise; do
  kubectl create namespace $ns --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
umask 077
printf '%s' "$connection_string" >"$work/connection-string"
kubectl -n $namespace create secret generic acs-connection \
  --from-file=connectionString="$work/connection-string" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

say "creating $IDENTITIES CommunicationIdentities"
for i in $(seq 1 "$IDENTITIES"); do
  cat <<EOF
---
apiVersion: acs-operator.io/v1alpha1
kind: CommunicationIdentity
metadata: {name: user-$i, namespace: $namespace}
spec: {connectionSecretRef: {name: acs-connection}, scopes: [chat], tokenLifetime: 24h}
EOF
done | kubectl apply -f - >/dev/null

ready_count() {
  kubectl -n $namespace get communicationidentities \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    grep -c True || true
}
all_ready() { [ "$(ready_count)" -eq "$IDENTITIES" ]; }

# Starts an operator over all namespaces, waits for every resource to be Ready, idles, and
# prints its VmRSS in KiB.
measure() {
  local log=$work/operator-$1.log
  "$bin/acs-identity-operator" run --acs-ca-file "$work/emulator/ca.crt" \
    --metrics-addr 127.0.0.1:0 >"$log" 2>&1 &
  operator_pid=$!
  wait_until 300 all_ready || fail "only $(ready_count) of $IDENTITIES Ready; see $log"
  wait_until 30 grep -q "caches synced" "$log" || fail "no 'caches synced' in $log"
  sleep "$SETTLE"
  awk '/^VmRSS:/ {print $2}' "/proc/$operator_pid/status"
  stop_operator
}

kubectl -n $noise delete secrets --all >/dev/null
rss_without=$(measure without)
say "VmRSS with $IDENTITIES identities and 0 unrelated Secrets: $rss_without KiB"

say "creating $SECRETS unrelated Secrets of 1 KiB in namespace $noise"
filler=$(head -c 768 /dev/zero | tr '\0' x | base64 -w0)
for batch in $(seq 0 $(((SECRETS - 1) / 500))); do
  for i in $(seq $((batch * 500 + 1)) $((batch * 500 + 500 > SECRETS ? SECRETS : batch * 500 + 500))); do
    printf -- '---\napiVersion: v1\nkind: Secret\nmetadata: {name: noise-%s}\ndata: {blob: %s}\n' "$i" "$filler"
  done | kubectl -n $noise create -f - >/dev/null
done
[ "$(kubectl -n $noise get secrets --no-headers | wc -l)" -ge "$SECRETS" ] || fail "the Secrets were not all created"

rss_with=$(measure with)
say "VmRSS with $IDENTITIES identities and $SECRETS unrelated Secrets: $rss_with KiB"
echo "identities=$IDENTITIES unrelated_secrets=0 vmrss_kib=$rss_without"
echo "identities=$IDENTITIES unrelated_secrets=$SECRETS vmrss_kib=$rss_with"
