#!/usr/bin/env bash
# cloak's one test command: installs what is missing (tools/install-deps.sh), then runs every check
# and every test tier. `.ci/run` calls exactly this.
#
#   fmt, clippy (warnings denied), helm lint
#   cargo test --workspace: unit tests, integration tests against a real local control plane
#                           (etcd + kube-apiserver [+ kube-controller-manager]) on 127.0.0.1,
#                           root tests in network namespaces with real WireGuard/OpenVPN tunnels
#
# Builds are cached outside the work tree: CARGO_TARGET_DIR defaults to $CLOAK_CACHE/target.
set -euo pipefail
cd "$(dirname "$0")/.."
export CLOAK_CACHE=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CLOAK_CACHE/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
step() { printf '\n=== %s\n' "$*" >&2; }

step "install dependencies"
bin=$(tools/install-deps.sh)
export PATH="$bin:$PATH"

# Incremental caches only grow (44 GB of them once filled this machine's disk): past 16 GiB
# they go, and the next build makes them again.
incremental="$CARGO_TARGET_DIR/debug/incremental"
if [ -d "$incremental" ] && [ "$(du -s --block-size=1G "$incremental" | cut -f1)" -gt 16 ]; then
  rm -rf "$incremental"
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "helm lint"
helm lint --strict charts/cloak >/dev/null

step "cargo test (all tiers)"
# --lib --bins --tests: every tier, without benchmark targets (they run with `cargo bench`) and
# without doc-tests (there are none to run).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Bounded: a hung test must fail the run with a reason long before CI's 90-minute limit (a warm
# run takes ~3 minutes, a cold one with every build ~15). Killed test processes leave nothing for
# long: the harness's watchdogs stop their servers and the next run reaps their namespaces.
limit=${CLOAK_TEST_TIMEOUT:-45m}
timeout --kill-after=30s "$limit" \
  cargo test --workspace --locked --no-fail-fast --lib --bins --tests 2>&1 | tee "$log" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "cloak: the tests did not finish within $limit (CLOAK_TEST_TIMEOUT); a test hung" >&2
fi
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "cloak: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
