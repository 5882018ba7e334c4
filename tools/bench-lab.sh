#!/usr/bin/env bash
# Figures of `cloak lab` (prints them, asserts nothing): `up` from nothing running (binaries and
# images cached), the idle RSS and CPU of every component, and pod start latency.
#   tools/bench-lab.sh [rounds]      (root; the lab "bench" is brought up and removed)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
export CLOAK_CACHE=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CLOAK_CACHE/target}
bin=$(tools/install-deps.sh)
export PATH="$bin:$PATH"
cargo build --release --locked -q -p cloak
cloak="$CARGO_TARGET_DIR/release/cloak"
lab() { "$cloak" lab --name bench "$@"; }
k() { lab kubectl "$@"; }
lab down >/dev/null
trap 'lab down >/dev/null' EXIT

start=$(date +%s.%N)
lab up >/dev/null
end=$(date +%s.%N)
calc() { awk "BEGIN { print $* }"; }
printf 'lab up (2 nodes, warm caches): %.1f s\n' "$(calc "$end - $start")"
start=$(date +%s.%N)
lab up >/dev/null
end=$(date +%s.%N)
printf 'lab up again (no-op): %.2f s\n' "$(calc "$end - $start")"

echo "settling 30 s, then idle figures over 30 s"
sleep 30
dir=/var/lib/cloak/lab/bench
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Processes per component: the supervisor's own, and everything in each node's pod cgroups.
declare -A pids
for f in "$dir"/pids/*; do
  name=$(basename "$f")
  # setpriv/nsenter exec the server, so the recorded PID is the server itself.
  pids[$name]=$(cat "$f")
done
pids[supervisor]=$(cut -d' ' -f1 "$dir/supervisor.pid")
for n in 1 2; do
  cg="/sys/fs/cgroup/memory/cloak-lab-bench-n$n"
  pids["pods-n$n"]=$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u | tr '\n' ' ')
  # containerd's shims live in the node's network namespace, outside the pod cgroups.
  pids["shims-n$n"]=$(for p in $(ip netns pids "ck-bench-n$n"); do
    [ "$(readlink "/proc/$p/exe" 2>/dev/null | xargs -r basename)" = containerd-shim-runc-v2 ] && echo "$p"; done | tr '\n' ' ')
done
declare -A before
for c in "${!pids[@]}"; do
  t=0; for p in ${pids[$c]}; do t=$((t + $(ticks "$p"))); done; before[$c]=$t
done
sleep 30
total_rss=0
printf '%-28s %10s %8s\n' component "RSS MiB" "CPU %"
for c in $(printf '%s\n' "${!pids[@]}" | sort); do
  t=0; r=0
  for p in ${pids[$c]}; do t=$((t + $(ticks "$p"))); r=$((r + $(rss_kib "$p"))); done
  total_rss=$((total_rss + r))
  printf '%-28s %10.1f %8.2f\n' "$c" "$(calc "$r / 1024")" "$(calc "($t - ${before[$c]}) * 100 / $hz / 30")"
done
printf '%-28s %10.1f\n' "total" "$(calc "$total_rss / 1024")"

echo "pod start latency (create -> Ready), $rounds rounds"
times=()
for i in $(seq 1 "$rounds"); do
  start=$(date +%s.%N)
  k run "bench-$i" --image=cloak.dev/lab/client:dev --image-pull-policy=Never --restart=Never -- sleep 3600 >/dev/null
  k wait --for=condition=Ready "pod/bench-$i" --timeout=60s >/dev/null
  end=$(date +%s.%N)
  times+=("$(calc "$end - $start")")
  k delete pod "bench-$i" --wait=false >/dev/null
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "pod start: median %.2f s, min %.2f s, max %.2f s\n", a[int((NR+1)/2)], a[1], a[NR]}'
