#!/usr/bin/env bash
# cloak's main job on one machine: installs and builds whatever is missing (Debian packages,
# helm/kubectl, the Kubernetes binaries, containerd, CoreDNS, cloak itself), then runs
# `cloak lab` — by default `cloak lab up`: a real 2-node Kubernetes cluster in network namespaces
# of its own, cloak installed by its Helm chart, fake VPN providers and an internet.
#
#   tools/lab.sh                    # = up
#   tools/lab.sh up --nodes 3
#   tools/lab.sh status | down | kubeconfig | kubectl get vpnmasks -A
#
# Needs root (network namespaces, cgroups, mounts). Everything built is cached in
# $CLOAK_CACHE (default ~/.cache/cloak); the lab's state lives in /var/lib/cloak/lab/<name>.
set -euo pipefail
cd "$(dirname "$0")/.."
export CLOAK_CACHE=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CLOAK_CACHE/target}
bin=$(tools/install-deps.sh)
export PATH="$bin:$PATH"
tools/build-lab.sh >/dev/null
cargo build --release --locked -q -p cloak
[ "$#" -gt 0 ] || set -- up
exec "$CARGO_TARGET_DIR/release/cloak" lab "$@"
