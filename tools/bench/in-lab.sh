#!/usr/bin/env bash
# Runs one of tools/bench/*.py in a lab of its own: builds cloak (release) and the lab's images,
# brings the lab up, runs the script's `run`, and removes the lab whatever happens.
#   tools/bench/in-lab.sh <script.py> <lab name> <drills>    (root; called by tools/bench-*.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
script=$1 name=$2 drills=$3
export CLOAK_CACHE=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CLOAK_CACHE/target}
bin=$(tools/install-deps.sh)
export PATH="$bin:$PATH"
tools/build-lab.sh >/dev/null
cargo build --release --locked -q -p cloak
cloak="$CARGO_TARGET_DIR/release/cloak"
lab() { CLOAK_REPO=$PWD "$cloak" lab --name "$name" "$@"; }
lab down >/dev/null
trap 'lab down >/dev/null' EXIT
lab up >/dev/null
python3 "tools/bench/$script" run "$cloak" "$name" "$drills"
