#!/usr/bin/env bash
# Prints how long the test control plane takes to start (etcd + kube-apiserver ready, CRDs
# Established) over N runs, with the binaries cached. Usage: tools/bench-controlplane.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5}
export CLOAK_CACHE=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CLOAK_CACHE/target}
PATH="$(tools/install-deps.sh):$PATH"
cargo test -q -p cloak-testkit --test lifecycle --no-run 2>/dev/null
for _ in $(seq "$n"); do
  cargo test -q -p cloak-testkit --test lifecycle a_started_control_plane -- --nocapture 2>&1 | grep -o 'ready in .*'
done
