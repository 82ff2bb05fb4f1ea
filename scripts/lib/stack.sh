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

  stack_info "installing the CRDs and the connection Secret"
  kubectl apply -f crds/acs-operator.io.yaml >/dev/null
  kubectl wait --for condition=Established -f crds/acs-operator.io.yaml --timeout 30s >/dev/null
  kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  (umask 077 && printf '%s' "$connection_string" >"$stack_dir/connection-string")
  kubectl -n "$namespace" create secret generic acs-connection \
    --from-file=connectionString="$stack_dir/connection-string" >/dev/null

  if [ "${STACK_OPERATOR:-process}" = pod ]; then
    stack_operator_pod
    return
  fi
  stack_info "starting the operator"
  "$bin/acs-identity-operator" run --watch-namespace "$namespace" --acs-ca-file "$stack_dir/emulator/ca.crt" \
    --acs-endpoint-suffixes 127.0.0.1,localhost --metrics-addr 127.0.0.1:0 >"$stack_dir/operator.log" 2>&1 &
  stack_pids+=("$!")
}

# STACK_OPERATOR=pod: the operator as its users run it, a Pod on the local cluster's node,
# installed by the Helm chart from the image scripts/build-image.sh assembles. The emulator stays
# on this machine's loopback; a netns-forward puts it on 127.0.0.1 inside the operator Pod's
# network namespace (its certificate names 127.0.0.1), so TLS is checked against the emulator's
# CA, given through the chart's extraCA.
stack_operator_pod() {
  stack_info "building the operator image and loading it into the node"
  scripts/build-image.sh >/dev/null
  local ops=$namespace-operator release=acs-demo
  kubectl create namespace "$ops" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n "$ops" create configmap emulator-ca --from-file=ca.crt="$stack_dir/emulator/ca.crt" >/dev/null
  stack_info "installing the chart: the operator as a Pod (image acs-identity-operator:dev)"
  helm install "$release" charts/acs-identity-operator -n "$ops" --set image.tag=dev \
    --set image.pullPolicy=Never --set watchNamespace="$namespace" \
    --set acsEndpointSuffixes=127.0.0.1 --set extraCA.configMap.name=emulator-ca >/dev/null
  kubectl -n "$ops" rollout status deployment "$release-acs-identity-operator" --timeout 120s >/dev/null ||
    stack_fail "the operator's Deployment did not become available"
  local pod pid="" _
  pod=$(kubectl -n "$ops" get pods -l app.kubernetes.io/instance=$release -o jsonpath='{.items[0].metadata.name}')
  for _ in $(seq 100); do
    pid=$(grep -lzx "POD_NAME=$pod" /proc/[0-9]*/environ 2>/dev/null | head -n 1 | cut -d/ -f3) && [ -n "$pid" ] && break
    sleep 0.1
  done
  [ -n "$pid" ] || stack_fail "found no process of the operator Pod $pod"
  local port=${endpoint##*:}
  "$(cat "$ACS_DEV_DIR/node/netns-forward")" -listen-netns "/proc/$pid/ns/net" -listen "127.0.0.1:$port" \
    -to "127.0.0.1:$port" >"$stack_dir/forward.log" 2>&1 &
  stack_pids+=("$!")
  stack_info "operator Pod $ops/$pod (UID $(awk '/^Uid:/{print $2}' "/proc/$pid/status"), read-only root, no capabilities) reaches the emulator through its own 127.0.0.1"
}

# The lines a container printed, from the node's log files (kubectl logs needs a kubelet the
# API server can reach; the node's is inside its own network namespace): NAMESPACE POD.
pod_output() {
  cat "$ACS_DEV_DIR"/node/pod-logs/"$1_$2"_*/*/0.log 2>/dev/null | sed -E 's/^[^ ]+ (stdout|stderr) [FP] //'
}
