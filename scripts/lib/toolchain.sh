# Sourced by the scripts: one place that says where builds are cached, so warm runs are fast
# even from a fresh clone (CI clones anew each time).
export ACS_CACHE_DIR=${ACS_CACHE_DIR:-$HOME/.cache/acs-identity-operator}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ACS_CACHE_DIR/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
command -v cargo >/dev/null || {
  echo "error: cargo is not installed; install Rust with rustup (stable toolchain)" >&2
  exit 1
}
