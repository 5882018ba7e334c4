#!/usr/bin/env bash
# Builds and installs what `cloak lab` runs besides the Kubernetes binaries
# (tools/build-control-plane.sh builds those), into a cache outside the work tree, keyed by
# version. Does nothing for what is already there. Prints the directory holding the binaries.
#
#   containerd 2.x, containerd-shim-runc-v2, ctr   Go module github.com/containerd/containerd/v2
#   coredns                                        Go module github.com/coredns/coredns
#   pause, udp-echo                                static C programs (gcc -static) for the images
#   multus (thin plugin)                           Go module in tools/multus (`cloak lab up --cni multus`)
#   runc, CNI plugins, busybox, setpriv            Debian packages
#
#   CLOAK_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/cloak)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
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
# The client image copies /bin/busybox alone: Debian's dynamic busybox would not run there.
if [ -e /bin/busybox ] && ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "build-lab: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# One build at a time: a second caller waits for the first, then finds the binaries there.
exec 9>"$cache/lab/.build.lock"
flock 9

go_bins=(containerd containerd-shim-runc-v2 ctr coredns)
have_go() { for b in "${go_bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }

# Small static C programs for the lab's images: built into the same directory when missing
# (each takes a second), without touching the Go binaries.
c_programs() {
  local dir=$1
  if [ ! -x "$dir/pause" ]; then
    # The sandbox ("pause") container: sleeps until told to stop.
    cat > "$dir/pause.c" <<'C'
#include <signal.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  for (;;) pause();
}
C
    gcc -static -O2 -s -o "$dir/pause" "$dir/pause.c" && rm "$dir/pause.c"
  fi
  if [ ! -x "$dir/udp-echo" ]; then
    # A UDP echo server for the client image (busybox has none): udp-echo PORT.
    cat > "$dir/udp-echo.c" <<'C'
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(argc > 1 ? atoi(argv[1]) : 7)};
  if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) return 1;
  char buf[2048];
  for (;;) {
    struct sockaddr_in from;
    socklen_t len = sizeof from;
    ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
    if (n >= 0) sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, len);
  }
}
C
    gcc -static -O2 -s -o "$dir/udp-echo" "$dir/udp-echo.c" && rm "$dir/udp-echo.c"
  fi
}

# Multus, pinned by the wrapper module tools/multus (its go.sum), built into the same directory
# when missing or when the module changed (~50 s), without touching the other binaries.
multus() {
  local dir=$1 module="$here/multus" stamp
  stamp=$(cat "$module/go.mod" "$module/go.sum" | sha256sum | cut -c1-16)
  if [ -x "$dir/multus" ] && [ "$(cat "$dir/multus.stamp" 2>/dev/null)" = "$stamp" ]; then return; fi
  command -v go >/dev/null || { echo "build-lab: go is not installed" >&2; exit 1; }
  echo "build-lab: building Multus from $module into $dir (~50 s)" >&2
  (cd "$module" && GOTOOLCHAIN=local CGO_ENABLED=0 GOCACHE="$cache/go-build" \
    go build -trimpath -ldflags "-s -w" -o "$dir/multus.tmp" \
    gopkg.in/k8snetworkplumbingwg/multus-cni.v4/cmd/multus)
  mv "$dir/multus.tmp" "$dir/multus"
  echo "$stamp" > "$dir/multus.stamp"
}

if have_go; then c_programs "$out"; multus "$out"; echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "build-lab: go is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0
tmp="$out.tmp.$$"
mkdir -p "$tmp"
# The Go build cache is kept outside the work tree, shared with tools/build-control-plane.sh.
export GOCACHE="$cache/go-build" GOBIN="$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "build-lab: building containerd $containerd_version and coredns $coredns_version into $out (~6 min cold)" >&2
go install -trimpath -ldflags "-s -w" -tags "no_btrfs no_devmapper no_zfs urfave_cli_no_docs" \
  "github.com/containerd/containerd/v2/cmd/containerd@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/ctr@$containerd_version"
go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$coredns_version"
c_programs "$tmp"
multus "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
