# The local cluster's one node, sourced by scripts/local-cluster.sh: kubelet, kube-proxy,
# containerd, runc and the CNI plugins, all built from pinned Go modules, plus kube-scheduler.
#
# Network: the node lives in a network namespace of its own (`ip netns add`), which has no
# link to anything outside it: only its loopback and a bridge `cni0` (10.88.0.1/16) that the
# Pods' veths join. kubelet, kube-proxy, containerd and every Pod run inside it. The one way
# in or out is netns-forward (tests/node/cmd/netns-forward): it listens inside the namespace on
# the API server's port and copies each connection to the API server on the machine's
# loopback. So kubelet and kube-proxy reach https://127.0.0.1:PORT exactly as on the machine,
# and Pods reach the `kubernetes` Service (10.0.0.1:443), which kube-proxy sends to
# 10.88.0.1:PORT. Nothing is routed anywhere else: there is no default route, no uplink, no DNS
# server, and containerd's registry configuration sends every pull to a closed loopback port.
#
# Processes: containerd, kube-proxy, kubelet (and through them every shim and container) run
# under one supervisor in new PID and mount namespaces (`unshare --pid --mount --mount-proc
# --kill-child`),
# so `down` ends them all at once and their mounts vanish with them.

NODE_NAME=acs-node
NODE_IP=10.88.0.1
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.0.0.0/24
# The Debian 12 packages the node needs: runc's seccomp support, kube-proxy's iptables, the
# busybox of the test image, and gcc for the sandbox's pause program.
NODE_DEBIAN_PACKAGES="libseccomp-dev iptables busybox-static gcc libc6-dev util-linux iproute2"
node_module_dir=$repo/tests/node
runtime_module_dir=$repo/tests/noderuntime
RUNTIME_PACKAGES="github.com/containerd/containerd/v2/cmd/containerd
github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
github.com/containerd/containerd/v2/cmd/ctr
github.com/opencontainers/runc
github.com/containernetworking/plugins/plugins/main/bridge
github.com/containernetworking/plugins/plugins/main/loopback
github.com/containernetworking/plugins/plugins/ipam/host-local"

files_hash() { cat "$@" | sha256sum | cut -c1-16; }
node_bin_dir() {
  echo "$cache/node-$K8S_VERSION-$(files_hash "$node_module_dir/go.mod" "$node_module_dir/go.sum" "$node_module_dir/cmd/node/main.go")/bin"
}
forward_bin() {
  echo "$cache/netns-forward-$(files_hash "$node_module_dir/go.mod" "$node_module_dir/go.sum" "$node_module_dir/cmd/netns-forward/main.go")/netns-forward"
}
runtime_bin_dir() {
  echo "$cache/noderuntime-$(files_hash "$runtime_module_dir/go.mod" "$runtime_module_dir/go.sum" "$runtime_module_dir/tools.go" <(echo "$RUNTIME_PACKAGES"))/bin"
}
images_dir() { echo "$cache/node-images-$(files_hash "$repo/scripts/lib/oci_image.py" "$repo/scripts/lib/node.sh" /var/lib/dpkg/info/busybox-static.md5sums)"; }

# Installs the Debian packages the node needs when one is missing (as root, through apt-get).
ensure_debian_packages() {
  local missing=() pkg
  for pkg in $NODE_DEBIAN_PACKAGES; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "the node needs the Debian packages ${missing[*]} (and root to run); install them"
  say "installing Debian packages: ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >"$state/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update >>"$state/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >>"$state/apt.log" 2>&1 ||
      die "apt-get install ${missing[*]} failed; log: $state/apt.log"
  fi
}

build_node() {
  ensure_debian_packages
  local bin
  bin=$(node_bin_dir)
  if [ ! -x "$bin/node" ]; then
    say "building the node's Kubernetes parts $K8S_VERSION (kubelet, kube-scheduler, kube-proxy) into $bin; the first build takes 5-15 minutes on 2 cores"
    mkdir -p "$bin.tmp"
    run_with_progress "kubelet, kube-scheduler and kube-proxy" "$state/build-node.log" \
      go -C "$node_module_dir" build -v -o "$bin.tmp/node" -ldflags "$(version_ldflags)" ./cmd/node
    for name in kubelet kube-scheduler kube-proxy; do
      ln -sf node "$bin.tmp/$name"
    done
    rm -rf "$bin" && mv "$bin.tmp" "$bin"
  fi
  local forward
  forward=$(forward_bin)
  if [ ! -x "$forward" ]; then
    mkdir -p "$(dirname "$forward")"
    run_with_progress "netns-forward" "$state/build-forward.log" \
      go -C "$node_module_dir" build -o "$forward.tmp" -ldflags "-s -w" ./cmd/netns-forward
    mv "$forward.tmp" "$forward"
  fi
  bin=$(runtime_bin_dir)
  if [ ! -x "$bin/runc" ]; then
    say "building containerd, runc and the CNI plugins into $bin (2-4 minutes the first time)"
    mkdir -p "$bin.tmp"
    # shellcheck disable=SC2086 # one package per word
    run_with_progress "containerd, runc and the CNI plugins" "$state/build-runtime.log" \
      env CGO_ENABLED=1 go -C "$runtime_module_dir" build -v -tags seccomp -ldflags "-s -w" -o "$bin.tmp/" $RUNTIME_PACKAGES
    # The sandbox ("pause") program: Kubernetes' own pause.c from the same release's module.
    local k8s_dir
    k8s_dir=$(go -C "$node_module_dir" list -m -f '{{.Dir}}' k8s.io/kubernetes)
    gcc -Os -static -DVERSION="$K8S_VERSION" -o "$bin.tmp/pause" "$k8s_dir/build/pause/linux/pause.c" ||
      die "compiling pause.c failed"
    rm -rf "$bin" && mv "$bin.tmp" "$bin"
  fi
  local images
  images=$(images_dir)
  if [ ! -f "$images/busybox.tar" ]; then
    mkdir -p "$images.tmp"
    build_node_images "$images.tmp"
    rm -rf "$images" && mv "$images.tmp" "$images"
  fi
}

# The two images every node has: the sandbox (pause) and a busybox shell for tests and demos.
build_node_images() { # out_dir
  local out=$1 root
  root=$(mktemp -d)
  mkdir -p "$root/pause" "$root/busybox/bin"
  cp "$(runtime_bin_dir)/pause" "$root/pause/pause"
  python3 "$repo/scripts/lib/oci_image.py" --out "$out/pause.tar" --name docker.io/acs-test/pause:local \
    --entrypoint '["/pause"]' --user 65535:65535 "$root/pause" >/dev/null
  cp /bin/busybox "$root/busybox/bin/busybox"
  local applet
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/busybox/bin/$applet"
  done
  mkdir -p "$root/busybox/tmp" && chmod 1777 "$root/busybox/tmp"
  python3 "$repo/scripts/lib/oci_image.py" --out "$out/busybox.tar" --name docker.io/acs-test/busybox:local \
    --entrypoint '["/bin/sh"]' --env PATH=/bin "$root/busybox" >/dev/null
  rm -rf "$root"
}

node_netns_name() { echo "acs-$(echo "$state" | sha256sum | cut -c1-10)"; }

write_node_config() {
  local node=$state/node runtime
  runtime=$(runtime_bin_dir)
  mkdir -p "$node/cni/net.d" "$node/containerd/certs.d/_default" "$node/kubelet" "$node/pod-logs"
  # Every registry is this closed loopback port: a Pod's image is never pulled from anywhere.
  cat >"$node/containerd/certs.d/_default/hosts.toml" <<EOF
server = "http://127.0.0.1:9"
EOF
  cat >"$node/containerd/config.toml" <<EOF
version = 3
root = "$node/containerd/root"
state = "$node/containerd/state"
[grpc]
  address = "$node/containerd.sock"
[ttrpc]
  address = "$node/containerd-ttrpc.sock"
[debug]
  level = "warn"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "docker.io/acs-test/pause:local"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$node/containerd/certs.d"
[plugins."io.containerd.cri.v1.runtime"]
  # Root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj would kill runc's init.
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$runtime"]
    conf_dir = "$node/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$runtime/runc"
        SystemdCgroup = false
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
EOF
  cat >"$node/cni/net.d/10-pods.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "isDefaultGateway": true,
      "hairpinMode": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "dataDir": "$node/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]]
      }
    },
    {"type": "loopback"}
  ]
}
EOF
  : >"$node/resolv.conf"
  cat >"$node/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This VM has cgroup v1 (hybrid) and no systemd: supported until 1.38 with failCgroupV1 false.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://$node/containerd.sock
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $state/pki/ca.crt}
authorization: {mode: Webhook}
podLogsDir: $node/pod-logs
resolvConf: $node/resolv.conf
clusterDomain: cluster.local
# How often kubelet resyncs Pods, and so how soon a Secret's update reaches a mounted file.
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"nodefs.available": "1%", "imagefs.available": "1%", "memory.available": "100Mi"}
maxPods: 50
EOF
  cat >"$node/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: $state/kube-proxy.kubeconfig
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# Replies from a Service's Pod on the same bridge must come back through the node.
iptables: {masqueradeAll: true}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# The node's network namespace: loopback and the Pods' bridge, nothing else.
make_node_netns() {
  local ns
  ns=$(node_netns_name)
  ip netns del "$ns" 2>/dev/null || true
  ip netns add "$ns" || die "ip netns add $ns failed (the node needs root and network namespaces)"
  echo "/run/netns/$ns" >"$state/node/netns"
  local in=(ip netns exec "$ns")
  "${in[@]}" ip link set lo up
  "${in[@]}" ip link add cni0 type bridge
  "${in[@]}" ip addr add "$NODE_IP/16" dev cni0
  "${in[@]}" ip link set cni0 up
  "${in[@]}" ip route add "$SERVICE_CIDR" dev cni0
  "${in[@]}" sysctl -qw net.ipv4.ip_forward=1
}

# The `kubernetes` Service's endpoint: the forwarder on the node's bridge address (the API
# server runs with --endpoint-reconciler-type none, on the machine's loopback).
write_kubernetes_endpoints() {
  "$(bin_dir)/kubectl" --kubeconfig "$state/kubeconfig" apply -f - >/dev/null <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: local-cluster.sh
addressType: IPv4
endpoints:
  - addresses: ["$NODE_IP"]
    conditions: {ready: true}
ports:
  - name: https
    port: $apiserver_port
    protocol: TCP
EOF
}

start_node() {
  local node=$state/node runtime nodebin netns
  runtime=$(runtime_bin_dir)
  nodebin=$(node_bin_dir)
  write_node_config
  make_node_netns
  netns=$(cat "$node/netns")
  echo "$runtime/ctr" >"$node/ctr"
  echo "$(forward_bin)" >"$node/netns-forward"
  # The API server, inside the node's namespace, on the same port as on the machine.
  start_exe netns-forward "$(forward_bin)" "$(forward_bin)" -listen-netns "$netns" -listen "0.0.0.0:$apiserver_port" -to "127.0.0.1:$apiserver_port"
  start_exe kube-scheduler "$(readlink -f "$nodebin/node")" "$nodebin/kube-scheduler" --kubeconfig "$state/scheduler.kubeconfig" \
    --authentication-kubeconfig "$state/scheduler.kubeconfig" --authorization-kubeconfig "$state/scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 --profiling=false --v 1
  cat >"$node/supervise.sh" <<EOF
# PID 1 of the node's PID namespace: when it ends, the kernel ends every process of the node.
export PATH=$runtime:\$PATH
$runtime/containerd --config $node/containerd/config.toml >$state/logs/containerd.log 2>&1 &
for _ in \$(seq 100); do [ -S $node/containerd.sock ] && break; sleep 0.1; done
ctr() { $runtime/ctr --address $node/containerd.sock --namespace k8s.io "\$@"; }
for image in $(images_dir)/*.tar; do ctr images import --local --platform linux/amd64 "\$image" >>$state/logs/images.log 2>&1; done
touch $node/images-loaded
$nodebin/kube-proxy --config $node/kube-proxy.yaml --v 1 >$state/logs/kube-proxy.log 2>&1 &
$nodebin/kubelet --config $node/kubelet/config.yaml --kubeconfig $state/kubelet.kubeconfig \
  --root-dir $node/kubelet/root --cert-dir $node/kubelet/pki --hostname-override $NODE_NAME \
  --node-ip $NODE_IP --v 1 >$state/logs/kubelet.log 2>&1 &
wait -n
echo "a node process ended; the node stops" >&2
EOF
  # nsenter enters the node's network namespace and becomes unshare (the pid `down` signals).
  start_exe node "$(command -v unshare)" nsenter --net="$netns" unshare --pid --fork --mount --mount-proc \
    --propagation private --kill-child bash "$node/supervise.sh"
}
