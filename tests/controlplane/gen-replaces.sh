#!/usr/bin/env bash
# Regenerates the replace block of go.mod: k8s.io/kubernetes requires every staging module at
# v0.0.0 (its own go.mod points them at ./staging), so a module that imports it must pin each one
# to the published v0.<minor>.<patch> tag that matches the Kubernetes release.
set -euo pipefail
k8s_version=${1:?usage: gen-replaces.sh v1.37.2}
staging_version="v0.${k8s_version#v1.}"
cd "$(dirname "$0")"
mod=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@${k8s_version}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
{
  echo "replace ("
  grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$mod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} > replaces.txt  # paste into go.mod in place of the old block
echo "wrote $(grep -c '=>' replaces.txt) replace lines for ${k8s_version} (staging ${staging_version}) to replaces.txt"
