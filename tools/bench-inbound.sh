#!/usr/bin/env bash
# Figures of a VpnGateway's inbound ports in a real `cloak lab` (prints them, asserts nothing):
# throughput and connection rate through an exit's forwarded port against the same provider's
# forwarded port answered inside the exit pod (no cloak rules), and renewal traffic. See
# tools/bench/inbound.py.
#   tools/bench-inbound.sh    (root; the lab "inbench" is brought up and removed)
set -euo pipefail
exec "$(dirname "$0")/bench/in-lab.sh" inbound.py inbench 0
