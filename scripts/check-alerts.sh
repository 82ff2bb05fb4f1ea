#!/usr/bin/env bash
# The chart's alerts: `promtool check rules` on charts/acs-identity-operator/files/
# prometheus-rules.yaml and `promtool test rules` on tests/alerts/rules_test.yaml. promtool is
# built once from its Go module (tests/promtool, pinned in go.sum) into $ACS_CACHE_DIR.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cache=${ACS_CACHE_DIR:-$HOME/.cache/acs-identity-operator}
module=$repo/tests/promtool
export GOSUMDB=off GOFLAGS=-mod=mod GOTOOLCHAIN=local
command -v go >/dev/null || { echo "check-alerts: error: the Go toolchain is not installed" >&2; exit 1; }
promtool=$cache/promtool-$(cat "$module/go.mod" "$module/go.sum" "$module/tools.go" | sha256sum | cut -c1-16)/promtool
if [ ! -x "$promtool" ]; then
  echo "check-alerts: building promtool (once; a few minutes on 2 cores)" >&2
  mkdir -p "$(dirname "$promtool")"
  go -C "$module" build -o "$promtool.tmp" -ldflags "-s -w" github.com/prometheus/prometheus/cmd/promtool
  mv "$promtool.tmp" "$promtool"
fi
"$promtool" check rules charts/acs-identity-operator/files/prometheus-rules.yaml
"$promtool" test rules tests/alerts/rules_test.yaml
