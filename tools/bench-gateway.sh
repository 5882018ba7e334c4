#!/usr/bin/env bash
# Figures of the VpnGateway in a real `cloak lab` (prints them, asserts nothing): throughput
# through the gateway against the bare tunnel, failover drills per failure kind, and the cost of
# the node component, of an exit and of a client pod's start. See tools/bench/gateway.py.
#   tools/bench-gateway.sh [drills]    (root; the lab "gwbench" is brought up and removed)
set -euo pipefail
exec "$(dirname "$0")/bench/in-lab.sh" gateway.py gwbench "${1:-10}"
