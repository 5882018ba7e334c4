#!/usr/bin/env bash
# Figures of the VpnChain in a real `cloak lab` (prints them, asserts nothing): throughput through
# the example's 3-hop chain against the same chain cut to 1 hop and the bare tunnel, repair drills
# per hop position, and the cost of each hop. See tools/bench/chain.py.
#   tools/bench-chain.sh [drills]    (root; the lab "chbench" is brought up and removed)
set -euo pipefail
cd "$(dirname "$0")/.."
drills=${1:-10}
export CLOAK_CACHE=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CLOAK_CACHE/target}
bin=$(tools/install-deps.sh)
export PATH="$bin:$PATH"
tools/build-lab.sh >/dev/null
cargo build --release --locked -q -p cloak
cloak="$CARGO_TARGET_DIR/release/cloak"
lab() { CLOAK_REPO=$PWD "$cloak" lab --name chbench "$@"; }
lab down >/dev/null
trap 'lab down >/dev/null' EXIT
lab up >/dev/null
python3 tools/bench/chain.py run "$cloak" chbench "$drills"
