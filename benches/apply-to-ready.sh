#!/usr/bin/env bash
# Time from `kubectl apply` of a CommunicationIdentity to Ready=True, on the local stack (real
# control plane, acs-emulator, operator): N runs (default 20), one at a time, each resource
# deleted before the next. Prints every run and the median. A benchmark, not a test.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh
source scripts/lib/stack.sh
runs=${1:-20}
stack_up "$repo/.dev/apply-to-ready" acs-latency

manifest() {
  sed "s/name: alice/name: latency-$1/" examples/communicationidentity.yaml
}
times=()
for i in $(seq "$runs"); do
  start=$(date +%s%N)
  manifest "$i" | kubectl -n "$namespace" apply -f - >/dev/null
  kubectl -n "$namespace" wait --for=condition=Ready "commid/latency-$i" --timeout 60s >/dev/null ||
    stack_fail "latency-$i did not become Ready"
  ms=$((($(date +%s%N) - start) / 1000000))
  times+=("$ms")
  echo "run $i: ${ms} ms"
  kubectl -n "$namespace" delete commid "latency-$i" --wait=true >/dev/null
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
median=$(awk -v n="$runs" 'NR == int((n + 1) / 2) { a = $1 } NR == int(n / 2) + 1 { b = $1 } END { print (n % 2 ? a : (a + b) / 2) }' <<<"$sorted")
printf '\n| runs | min ms | median ms | max ms |\n|---|---|---|---|\n| %s | %s | %s | %s |\n' \
  "$runs" "$(head -1 <<<"$sorted")" "$median" "$(tail -1 <<<"$sorted")"
echo "(each includes kubectl's own start-up, about 0.1 s per command)"
