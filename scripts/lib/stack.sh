# Sourced by the scripts that need the whole stack: a local control plane, the acs-emulator
# (HTTPS, its own CA, admin endpoints) and the operator watching one namespace that holds the
# connection Secret. `stack_up STATE_DIR NAMESPACE` starts it; everything stops on exit.
# Expects scripts/lib/toolchain.sh to be sourced and the working directory to be the repo.

source scripts/lib/emulator.sh

stack_pids=()
stack_down() {
  local pid
  for pid in "${stack_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/local-cluster.sh down >/dev/null 2>&1 || true
}
trap stack_down EXIT

stack_fail() {
  echo "$stack_name: FAILED: $*" >&2
  echo "$stack_name: operator log: $stack_dir/operator.log" >&2
  exit 1
}
stack_info() { echo "$stack_name: $*" >&2; }

# Waits up to $1 seconds for the command after it to succeed.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.3
  done
}

# Waits up to $1 seconds for the shell condition $2 to hold, evaluated anew each time.
eventually() {
  local deadline=$((SECONDS + $1))
  until eval "$2" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.3
  done
}

# Calls an admin endpoint of the emulator: METHOD PATH [JSON].
emulator() {
  curl -sf --cacert "$stack_dir/emulator/ca.crt" -X "$1" -H 'content-type: application/json' \
    ${3:+-d "$3"} "$endpoint/_emulator/$2"
}

stack_up() { # STATE_DIR NAMESPACE
  stack_dir=$1 namespace=$2
  stack_name=$(basename "$0" .sh)
  export ACS_DEV_DIR=$stack_dir ACS_WATCH_PID=$$
  mkdir -p "$stack_dir"

  stack_info "building the operator and the emulator (cargo shows its progress)"
  cargo build --workspace --bins --locked
  bin=$CARGO_TARGET_DIR/debug

  stack_info "starting the local control plane"
  scripts/local-cluster.sh up
  eval "$(scripts/local-cluster.sh env)"

  stack_info "starting acs-emulator (HTTPS, its own CA)"
  rm -rf "$stack_dir/emulator" && mkdir -p "$stack_dir/emulator"
  emulator_start emulator "$stack_dir" "$bin/acs-emulator" --tls-dir "$stack_dir/emulator" --admin ||
    stack_fail "the emulator did not start; see $stack_dir/emulator.log"
  stack_pids+=("$emulator_pid")
  local connection_string=$emulator_connection_string
  endpoint=$emulator_endpoint

  stack_info "installing the CRD and the connection Secret"
  kubectl apply -f crds/communicationidentity.yaml >/dev/null
  kubectl wait --for condition=Established crd/communicationidentities.acs-operator.io --timeout 30s >/dev/null
  kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  (umask 077 && printf '%s' "$connection_string" >"$stack_dir/connection-string")
  kubectl -n "$namespace" create secret generic acs-connection \
    --from-file=connectionString="$stack_dir/connection-string" >/dev/null

  stack_info "starting the operator"
  "$bin/acs-identity-operator" run --watch-namespace "$namespace" --acs-ca-file "$stack_dir/emulator/ca.crt" \
    --acs-endpoint-suffixes 127.0.0.1,localhost --metrics-addr 127.0.0.1:0 >"$stack_dir/operator.log" 2>&1 &
  stack_pids+=("$!")
}
