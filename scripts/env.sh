# Sourced by the scripts: the environment every build and run of Ladder uses.
# CI clones afresh each run: keep the build cache outside the clone so that dependencies are not
# rebuilt from scratch every time (cargo still rebuilds the workspace's own crates for a new path).
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${LADDER_CACHE:-$HOME/.cache/ladder}/target"
fi
export LADDER_VENV="$PWD/.venv"
# libtorch for tch comes from the venv's torch 2.11.0. The path is the venv's real location in
# the cache, the same for every clone, so that torch-sys (a 3-minute build) is not rebuilt
# because a clone lives elsewhere. Source this file before running cargo by hand.
if [ -e "$LADDER_VENV" ]; then
  export LIBTORCH="$(realpath "$LADDER_VENV")/lib/python3.11/site-packages/torch"
  export LIBTORCH_CXX11_ABI=1
fi
