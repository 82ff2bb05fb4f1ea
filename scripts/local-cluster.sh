#!/usr/bin/env bash
# A real local Kubernetes cluster built from Go modules at a pinned release: the control plane
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) on loopback, one node
# (containerd, runc, CNI, kubelet, kube-proxy) in a network namespace of its own (see
# scripts/lib/node.sh for how its traffic stays inside), plus kubectl and helm.
#
#   scripts/local-cluster.sh up     build what is missing, start on loopback, wait for /readyz
#   scripts/local-cluster.sh down   stop exactly the processes `up` started
#   scripts/local-cluster.sh env    print `export` lines for KUBECONFIG and PATH (eval them)
#   scripts/local-cluster.sh build  only build (or find in the cache) the binaries
#
# State (certificates, kubeconfig, logs, pids, etcd data) lives in $ACS_DEV_DIR (default .dev/).
# Builds are cached under $ACS_CACHE_DIR (default ~/.cache/acs-identity-operator), keyed by the
# hash of the Go wrapper modules, so only the first run compiles. The node needs root.
# Optional: ACS_APISERVER_PORT pins the API server port; ACS_WATCH_PID makes the cluster stop
# itself when that process ends (tests use it so that nothing outlives a crashed test run), and
# ACS_REMOVE_STATE_ON_EXIT=1 then also removes its state folder.
set -euo pipefail

K8S_VERSION=v1.37.2
HELM_MODULE=helm.sh/helm/v3
HELM_VERSION=v3.22.0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${ACS_DEV_DIR:-$repo/.dev}
cache=${ACS_CACHE_DIR:-$HOME/.cache/acs-identity-operator}
module_dir=$repo/tests/controlplane
export GOSUMDB=off # the checksum database is not reachable here; go.sum is checked in
export GOFLAGS=-mod=mod
export GOTOOLCHAIN=local

die() {
  echo "local-cluster: error: $*" >&2
  exit 1
}
say() { echo "local-cluster: $*" >&2; }
# shellcheck source=scripts/lib/node.sh
source "$repo/scripts/lib/node.sh"

module_hash() {
  cat "$module_dir/go.mod" "$module_dir/go.sum" "$module_dir/cmd/k8s/main.go" |
    sha256sum | cut -c1-16
}
version_ldflags() {
  local minor=${K8S_VERSION#v1.} ldflags="-s -w" pkg
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  echo "$ldflags"
}
bin_dir() { echo "$cache/controlplane-$K8S_VERSION-$(module_hash)/bin"; }
helm_bin() { echo "$cache/helm-$HELM_VERSION/helm"; }

# Runs a long command in the background, printing what it is doing and the elapsed time every
# 20 s instead of minutes of silence; the full output goes to $log.
run_with_progress() {
  local what=$1 log=$2
  shift 2
  local start=$SECONDS
  "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 20); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      local last
      last=$(grep -v '^go: downloading' "$log" | tail -n 1 | cut -c1-80)
      say "building $what: $((SECONDS - start))s elapsed, $(wc -l <"$log") packages so far${last:+ (last: $last)}"
    fi
  done
  if ! wait "$pid"; then
    tail -n 20 "$log" >&2
    die "building $what failed after $((SECONDS - start))s; full log: $log"
  fi
  say "built $what in $((SECONDS - start))s"
}

build() {
  command -v go >/dev/null || die "the Go toolchain is not installed (need go >= 1.26 on PATH to build the control plane)"
  mkdir -p "$state" "$cache"
  # One build at a time per cache: runs from several checkouts share it.
  exec 9>"$cache/.build.lock"
  if ! flock -n 9; then
    say "waiting for another build into $cache to finish"
    flock 9
  fi
  local bin
  bin=$(bin_dir)
  if [ ! -x "$bin/k8s" ]; then
    say "building Kubernetes $K8S_VERSION (etcd, kube-apiserver, kube-controller-manager, kubectl) into $bin; the first build takes 15-30 minutes on 2 cores"
    local ldflags
    ldflags=$(version_ldflags)
    mkdir -p "$bin.tmp"
    run_with_progress "the control plane" "$state/build.log" \
      go -C "$module_dir" build -v -o "$bin.tmp/k8s" -ldflags "$ldflags" ./cmd/k8s
    for name in etcd kube-apiserver kube-controller-manager kubectl; do
      ln -sf k8s "$bin.tmp/$name"
    done
    rm -rf "$bin" && mv "$bin.tmp" "$bin"
  fi
  if [ ! -x "$(helm_bin)" ]; then
    say "building helm $HELM_VERSION"
    mkdir -p "$(dirname "$(helm_bin)")"
    run_with_progress "helm" "$state/build-helm.log" \
      env GOBIN="$(dirname "$(helm_bin)")" go install -v \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
      "$HELM_MODULE/cmd/helm@$HELM_VERSION"
  fi
  build_node
  flock -u 9
  exec 9>&-
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

require_free_port() {
  if ! python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1",int(sys.argv[1])))' "$1" 2>/dev/null; then
    die "port $1 on 127.0.0.1 is already taken (by another process); free it or choose another with ACS_APISERVER_PORT"
  fi
}

gen_certs() {
  local pki=$state/pki
  rm -rf "$pki" && mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 \
      -subj "/CN=acs-local-cluster-ca" 2>/dev/null
    # X.509 v3 with explicit usages: rustls (the operator's TLS) rejects v1 certificates.
    issue() { # name subject extendedKeyUsage [subjectAltName]
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      local ext=$1.ext
      printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$3" >"$ext"
      [ -n "${4:-}" ] && echo "subjectAltName=$4" >>"$ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$ext" -out "$1.crt" 2>/dev/null
    }
    issue apiserver "/CN=kube-apiserver" serverAuth "IP:127.0.0.1,IP:10.0.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
    issue admin "/O=system:masters/CN=admin" clientAuth
    issue controller-manager "/CN=system:kube-controller-manager" clientAuth
    issue scheduler "/CN=system:kube-scheduler" clientAuth
    issue kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
    issue kube-proxy "/CN=system:kube-proxy" clientAuth
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() { # file user
  local pki=$state/pki
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 "$pki/$2.crt")
    client-key-data: $(base64 -w0 "$pki/$2.key")
contexts:
- name: local
  context: {cluster: local, user: $2}
current-context: local
EOF
}

readyz() {
  curl -sf --max-time 2 --cacert "$state/pki/ca.crt" --cert "$state/pki/admin.crt" \
    --key "$state/pki/admin.key" "https://127.0.0.1:$1/readyz" 2>/dev/null
}

running() {
  [ -f "$state/pids" ] || return 1
  local name pid exe
  while read -r name pid exe; do
    kill -0 "$pid" 2>/dev/null || return 1
  done <"$state/pids"
}

# Starts a process in a session of its own and records its name, pid and the executable
# /proc/PID/exe must show for `down` to signal it (pids get reused).
start_exe() { # name expected-exe command args...
  local name=$1 exe=$2
  shift 2
  setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo "$name $! $exe" >>"$state/pids"
}

start() { # name args...
  local name=$1
  shift
  start_exe "$name" "$(readlink -f "$(bin_dir)/k8s")" "$(bin_dir)/$name" "$@"
}

up() {
  if running && readyz "$(cat "$state/apiserver-port")" >/dev/null; then
    say "already running (kubeconfig: $state/kubeconfig)"
    return 0
  fi
  [ -f "$state/pids" ] && down
  local build_start=$SECONDS
  build
  local build_secs=$((SECONDS - build_start)) start_at=$SECONDS
  command -v openssl >/dev/null || die "openssl is needed to generate the cluster's certificates"
  apiserver_port=${ACS_APISERVER_PORT:-$(free_port)}
  require_free_port "$apiserver_port"
  local etcd_port etcd_peer_port
  etcd_port=$(free_port)
  etcd_peer_port=$(free_port)
  rm -rf "$state/etcd" "$state/logs" "$state/node" && mkdir -p "$state/logs" "$state/node"
  : >"$state/pids"
  gen_certs
  echo "$apiserver_port" >"$state/apiserver-port"
  readlink -f "$(bin_dir)/k8s" >"$state/binary"
  write_kubeconfig "$state/kubeconfig" admin
  write_kubeconfig "$state/controller-manager.kubeconfig" controller-manager
  for user in scheduler kubelet kube-proxy; do
    write_kubeconfig "$state/$user.kubeconfig" "$user"
  done
  local pki=$state/pki
  start etcd --name local --data-dir "$state/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "local=http://127.0.0.1:$etcd_peer_port" --listen-metrics-urls "" \
    --quota-backend-bytes 8589934592 --log-level warn
  start kube-apiserver --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged --profiling=false \
    --endpoint-reconciler-type none --max-requests-inflight 2000 --max-mutating-requests-inflight 1000 --v 1
  start kube-controller-manager --kubeconfig "$state/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$state/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$state/controller-manager.kubeconfig" \
    --controllers garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,deployment-controller,replicaset-controller,endpointslice-controller,disruption-controller,node-lifecycle-controller,root-ca-certificate-publisher-controller \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 \
    --kube-api-qps 200 --kube-api-burst 400 --profiling=false --v 1
  if [ -n "${ACS_WATCH_PID:-}" ]; then
    # Stops the cluster once the watched process (a test run) is gone, however it ended.
    # With ACS_REMOVE_STATE_ON_EXIT=1 (throwaway test clusters) the state folder goes too.
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" down; [ "$4" = 1 ] && rm -rf "$3"' _ \
      "$ACS_WATCH_PID" "$repo/scripts/local-cluster.sh" "$state" "${ACS_REMOVE_STATE_ON_EXIT:-0}" >/dev/null 2>&1 </dev/null &
  fi
  local deadline=$((SECONDS + 90))
  until readyz "$apiserver_port" | grep -q '^ok$'; do
    check_started "kube-apiserver was not ready" "$deadline"
  done
  write_kubernetes_endpoints
  start_node
  deadline=$((SECONDS + 90))
  until node_ready; do
    check_started "node $NODE_NAME was not Ready" "$deadline"
  done
  say "ready: Kubernetes $K8S_VERSION on https://127.0.0.1:$apiserver_port, node $NODE_NAME Ready (build ${build_secs}s, start $((SECONDS - start_at))s)"
  say "use it with: eval \"\$(scripts/local-cluster.sh env)\""
}

node_ready() {
  [ "$("$(bin_dir)/kubectl" --kubeconfig "$state/kubeconfig" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# While up waits: fails if a started process has ended, or once the deadline has passed.
check_started() { # what deadline
  local name pid exe
  while read -r name pid exe; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 15 "$state/logs/$name.log" >&2
      down >/dev/null 2>&1 || true
      die "$name exited during start; its log: $state/logs/$name.log"
    fi
  done <"$state/pids"
  if [ "$SECONDS" -ge "$2" ]; then
    down >/dev/null 2>&1 || true
    die "$1 within 90s; logs in $state/logs/"
  fi
  sleep 0.5
}

# Whether pid runs (a zombie, ended but not yet reaped by its new parent, does not).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

down() {
  [ -f "$state/pids" ] || {
    say "not running"
    return 0
  }
  local name pid exe pids=()
  while read -r name pid exe; do
    # Only signal a pid that still runs the binary we started (pids get reused).
    if [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "${exe:-$(cat "$state/binary" 2>/dev/null)}" ]; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
  done < <(tac "$state/pids")
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$state/pids"
  if [ -f "$state/node/netns" ]; then
    ip netns del "$(basename "$(cat "$state/node/netns")")" 2>/dev/null || true
    rm -f "$state/node/netns"
  fi
  say "stopped"
}

env_lines() {
  echo "export KUBECONFIG=$state/kubeconfig"
  echo "export PATH=$(bin_dir):$(dirname "$(helm_bin)"):\$PATH"
}

case "${1:-}" in
up) up ;;
down) down ;;
env) env_lines ;;
build) build ;;
*)
  echo "usage: $0 up|down|env|build" >&2
  exit 2
  ;;
esac
