#!/usr/bin/env bash
# Builds and installs what `cloak lab` runs besides the Kubernetes binaries
# (tools/build-control-plane.sh builds those), into a cache outside the work tree, keyed by
# version. Does nothing for what is already there. Prints the directory holding the binaries.
#
#   containerd 2.x, containerd-shim-runc-v2, ctr   Go module github.com/containerd/containerd/v2
#   coredns                                        Go module github.com/coredns/coredns
#   pause                                          a static C program (gcc -static), the sandbox image
#   runc, CNI plugins, busybox, setpriv            Debian packages
#
#   CLOAK_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/cloak)
set -euo pipefail
containerd_version=v2.3.7
coredns_version=v1.14.7
cache=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
out="$cache/lab/containerd-${containerd_version}_coredns-${coredns_version}"
mkdir -p "$cache/lab"

# --- Debian packages: file -> package
declare -A packages=(
  [/usr/sbin/runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
  [/bin/busybox]=busybox-static [/usr/bin/setpriv]=util-linux [/usr/bin/gcc]=gcc
  [/usr/include/stdio.h]=libc6-dev
)
missing=()
for file in "${!packages[@]}"; do [ -e "$file" ] || missing+=("${packages[$file]}"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "build-lab: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

bins=(containerd containerd-shim-runc-v2 ctr coredns pause)
# One build at a time: a second caller waits for the first, then finds the binaries there.
mkdir -p "$(dirname "$out")"
exec 9>"$(dirname "$out")/.build.lock"
flock 9
have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "build-lab: go is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0
tmp="$out.tmp.$$"
mkdir -p "$tmp"
# The Go build cache is kept outside the work tree, shared with tools/build-control-plane.sh.
export GOCACHE="$cache/go-build" GOBIN="$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "build-lab: building containerd $containerd_version and coredns $coredns_version into $out (~2 min cold)" >&2
go install -trimpath -ldflags "-s -w" -tags "no_btrfs no_devmapper no_zfs urfave_cli_no_docs" \
  "github.com/containerd/containerd/v2/cmd/containerd@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/ctr@$containerd_version"
go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$coredns_version"
# The sandbox ("pause") container: sleeps until told to stop, reaps nothing else.
cat > "$tmp/pause.c" <<'C'
#include <signal.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  for (;;) pause();
}
C
gcc -static -O2 -s -o "$tmp/pause" "$tmp/pause.c"
rm "$tmp/pause.c"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
