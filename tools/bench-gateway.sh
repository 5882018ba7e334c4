#!/usr/bin/env bash
# Figures of the VpnGateway in a real `cloak lab` (prints them, asserts nothing): throughput
# through the gateway against the bare tunnel, failover drills per failure kind, and the cost of
# the node component, of an exit and of a client pod's start. See tools/bench/gateway.py.
#   tools/bench-gateway.sh [drills]    (root; the lab "gwbench" is brought up and removed)
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
lab() { CLOAK_REPO=$PWD "$cloak" lab --name gwbench "$@"; }
lab down >/dev/null
trap 'lab down >/dev/null' EXIT
lab up >/dev/null
python3 tools/bench/gateway.py run "$cloak" gwbench "$drills"
