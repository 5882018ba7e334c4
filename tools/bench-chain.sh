#!/usr/bin/env bash
# Figures of the VpnChain in a real `cloak lab` (prints them, asserts nothing): throughput through
# the example's 3-hop chain against the same chain cut to 1 hop and the bare tunnel, repair drills
# per hop position, and the cost of each hop. See tools/bench/chain.py.
#   tools/bench-chain.sh [drills]    (root; the lab "chbench" is brought up and removed)
set -euo pipefail
exec "$(dirname "$0")/bench/in-lab.sh" chain.py chbench "${1:-10}"
