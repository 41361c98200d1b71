# Sourced by the scripts: the environment every build and run of Ladder uses.
# CI clones afresh each run: keep the build cache outside the clone so that dependencies are not
# rebuilt from scratch every time (cargo still rebuilds the workspace's own crates for a new path).
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${LADDER_CACHE:-$HOME/.cache/ladder}/target"
fi
export LADDER_VENV="$PWD/.venv"
