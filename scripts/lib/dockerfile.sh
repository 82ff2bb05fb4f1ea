# What the Dockerfile says, for the scripts that build or check without a container engine
# (scripts/check-dockerfile.sh, scripts/build-image.sh). Sourced; needs $repo.

dockerfile=$repo/Dockerfile

# The one `cargo build` command of the Dockerfile, up to the `&&` that follows it.
dockerfile_build_line() {
  grep -o 'cargo build [^&\\]*' "$dockerfile" | sed 's/[[:space:]]*$//'
}

# The runtime stage: everything from the last FROM on.
dockerfile_runtime_stage() {
  awk '/^FROM /{stage=""} {stage=stage $0 "\n"} END{printf "%s", stage}' "$dockerfile"
}
