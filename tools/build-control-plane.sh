#!/usr/bin/env bash
# Builds the Kubernetes binaries from their Go modules (the wrapper module in tools/controlplane)
# into a cache directory outside the work tree, keyed by version: etcd, kube-apiserver and
# kube-controller-manager (the integration tests' control plane) and kube-scheduler, kubelet and
# kube-proxy (`cloak lab`'s nodes).
# Does nothing when the binaries are already there. Prints the directory holding them.
#
#   CLOAK_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/cloak)
set -euo pipefail
here=$(cd "$(dirname "$0")/controlplane" && pwd)
ver=$(cat "$here/KUBERNETES_VERSION")
sum=$(cat "$here/go.mod" "$here/go.sum" "$here/tools.go" | sha256sum | cut -c1-12)
cache=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
out="$cache/controlplane/${ver}-${sum}"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

# One build at a time: a second caller waits for the first, then finds the binaries there.
mkdir -p "$(dirname "$out")"
exec 9>"$(dirname "$out")/.build.lock"
flock 9
have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "build-control-plane: go is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
tmp="$out.tmp.$$"
mkdir -p "$tmp"
# The Go build cache (~3.5 GiB) is kept outside the work tree and shared by both build scripts:
# a version bump or an interrupted build then recompiles only what changed.
export GOCACHE="$cache/go-build"
trap 'rm -rf "$tmp"' EXIT
major=${ver#v}; major=${major%%.*}
minor=${ver#v*.}; minor=${minor%%.*}
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$ver -X $vpkg.gitMajor=$major -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
cd "$here"
echo "build-control-plane: building Kubernetes $ver control plane into $out (several minutes cold)" >&2
go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
# One go build for the five Kubernetes commands: they share most packages, and one invocation
# schedules their compilation together (~5 min cold on 2 cores, against ~3 min for the first).
go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
mv "$tmp" "$out"
trap - EXIT
echo "$out"
