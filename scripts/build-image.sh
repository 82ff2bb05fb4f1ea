#!/usr/bin/env bash
# Builds the operator image acs-identity-operator:dev without a container engine and loads it
# into the local cluster's node (scripts/local-cluster.sh up; same ACS_DEV_DIR).
#
# The Dockerfile stays the product's image definition; this script reproduces it and refuses
# to run when the Dockerfile says something it does not reproduce:
#   - the build stage: the Dockerfile's own `cargo build` line, run verbatim (as
#     scripts/check-dockerfile.sh does);
#   - the runtime stage, `FROM gcr.io/distroless/cc-debian12:nonroot`: a layer with what that
#     image holds, taken from this machine's Debian 12 packages: glibc 2.36 (libc6), libgcc
#     (libgcc-s1), the CA bundle (ca-certificates), /etc/passwd and /etc/group with root,
#     nobody and nonroot (65532), /home/nonroot and /tmp; distroless's PATH and SSL_CERT_FILE;
#   - each COPY --from=build, USER and ENTRYPOINT line as the Dockerfile has it.
# Any other instruction in the runtime stage, or another base image, fails the build.
#
#   scripts/build-image.sh            build (the layers are cached by content), then load
#   scripts/build-image.sh --no-load  only build; prints the image tar's path
#
# The image's manifest digest is written next to the tar (`.digest`) and printed: the chart's
# `image.digest` value takes it.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh
source scripts/lib/dockerfile.sh

IMAGE=docker.io/library/acs-identity-operator:dev
BASE=gcr.io/distroless/cc-debian12:nonroot
# What the base holds, and the versions it has (Debian 12).
BASE_PACKAGES="libc6 libgcc-s1 ca-certificates"
BASE_GLIBC=2.36
state=${ACS_DEV_DIR:-$repo/.dev}
out=$ACS_CACHE_DIR/images
load=1
[ "${1:-}" = --no-load ] && load=0

fail() {
  echo "build-image: error: $*" >&2
  exit 1
}
say() { echo "build-image: $*" >&2; }

# The runtime stage, instruction by instruction.
runtime=$(dockerfile_runtime_stage | grep -Ev '^[[:space:]]*(#|$)')
entrypoint="" user="" copies=()
while read -r instruction rest; do
  case "$instruction" in
  FROM) [ "$rest" = "$BASE" ] || fail "the runtime stage is FROM $rest; this script reproduces $BASE only" ;;
  COPY)
    read -r from src dst extra <<<"$rest"
    [ "$from" = --from=build ] && [ -n "$dst" ] && [ -z "$extra" ] || fail "cannot reproduce: COPY $rest"
    copies+=("$src $dst")
    ;;
  USER) user=$rest ;;
  ENTRYPOINT) entrypoint=$rest ;;
  *) fail "cannot reproduce the runtime stage's instruction: $instruction $rest" ;;
  esac
done <<<"$runtime"
[ -n "$entrypoint" ] && [ -n "$user" ] && [ ${#copies[@]} -gt 0 ] || fail "the runtime stage lacks USER, ENTRYPOINT or COPY"
python3 -c 'import json,sys; e=json.loads(sys.argv[1]); assert isinstance(e,list)' "$entrypoint" 2>/dev/null ||
  fail "ENTRYPOINT must be exec form (JSON): $entrypoint"

# The build stage: its cargo build line, verbatim; it leaves the binary at /acs-identity-operator.
build=$(dockerfile_build_line)
[ "$(wc -l <<<"$build")" -eq 1 ] && [ -n "$build" ] || fail "expected exactly one cargo build line in the Dockerfile"
grep -Fq "&& cp target/${build##*--target }/release/acs-identity-operator /acs-identity-operator" "$dockerfile" ||
  fail "the build stage no longer copies the release binary to /acs-identity-operator"
say "$build"
# shellcheck disable=SC2086 # split into words as the Dockerfile's RUN does
$build >&2
binary=$CARGO_TARGET_DIR/${build##*--target }/release/acs-identity-operator

for pkg in $BASE_PACKAGES; do
  dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
    fail "the base layer is made from Debian's $pkg, which is not installed (apt-get install $pkg)"
done
glibc=$(dpkg-query -W -f '${Version}' libc6)
[[ $glibc == "$BASE_GLIBC"-* ]] || fail "this machine's glibc is $glibc; the runtime image has $BASE_GLIBC"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
base=$stage/base app=$stage/app
mkdir -p "$base" "$app" "$out"
# Files (and symlinks) of the packages, as Debian installs them; docs and locales left out, as
# distroless leaves them out.
# Paths as the packages name them (/lib/..., not this machine's merged /usr/lib/...): the
# directories are made real, the packages' own symlinks kept.
dpkg -L libc6 libgcc-s1 | grep -Ev '^/(\.|usr/share/(doc|man|info|lintian|locale)(/.*)?)$' | while read -r path; do
  [ -L "$path" ] && [ -d "$path" ] && continue # a merged-/usr directory link of this machine
  if [ -L "$path" ] || [ -f "$path" ]; then
    mkdir -p "$base$(dirname "$path")"
    cp -P --preserve=mode "$path" "$base$path"
  fi
done
mkdir -p "$base/etc/ssl/certs" "$base/home/nonroot" "$base/tmp"
cp /etc/ssl/certs/ca-certificates.crt "$base/etc/ssl/certs/ca-certificates.crt"
cat >"$base/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$base/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
echo 'hosts: files dns' >"$base/etc/nsswitch.conf"
cp /etc/os-release "$base/etc/os-release"
chmod 1777 "$base/tmp"
chmod 0700 "$base/home/nonroot" && chown 65532:65532 "$base/home/nonroot"
for copy in "${copies[@]}"; do
  read -r src dst <<<"$copy"
  [ "$src" = /acs-identity-operator ] || fail "the build stage only makes /acs-identity-operator, not $src"
  install -D -m 0755 "$binary" "$app$dst"
done

tar=$out/acs-identity-operator-dev.tar
python3 scripts/lib/oci_image.py --out "$tar" --name "$IMAGE" \
  --entrypoint "$entrypoint" --user "$user" --workdir /home/nonroot \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --label "org.opencontainers.image.base.name=$BASE" "$base" "$app" >"$tar.digest"
say "built $IMAGE ($(du -h "$tar" | cut -f1), $(cat "$tar.digest")): $tar"

if [ "$load" = 1 ]; then
  socket=$state/node/containerd.sock
  [ -S "$socket" ] || fail "no node is running for $state (start it with scripts/local-cluster.sh up)"
  ctr=$(cat "$state/node/ctr")
  "$ctr" --address "$socket" --namespace k8s.io images import --local --platform linux/amd64 "$tar" >/dev/null
  # Also by digest (a pull records both names; an import only the tag), for image.digest.
  "$ctr" --address "$socket" --namespace k8s.io images tag --force "$IMAGE" "${IMAGE%:*}@$(cat "$tar.digest")" >/dev/null
  say "loaded into the node of $state"
fi
cat "$tar.digest"
