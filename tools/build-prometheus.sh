#!/usr/bin/env bash
# Builds what the observability tests and `cloak lab` need of Prometheus, into a cache outside the
# work tree, keyed by version. Does nothing for what is already there. Prints the directory.
#
#   prometheus, promtool   Go module github.com/prometheus/prometheus (only Kubernetes service
#                          discovery compiled in: build tags remove_all_sd,enable_kubernetes_sd;
#                          no web UI assets, the HTTP API is whole)
#   crds/*.yaml            the prometheus-operator's PodMonitor and PrometheusRule CRDs, generated
#                          by controller-gen from the Go types of its module
#                          github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring
#                          (the module proxy does not serve the repository's root module, where
#                          the generated YAML lives), as the project generates them
#
#   CLOAK_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/cloak)
set -euo pipefail
prometheus_version=v0.316.0           # Prometheus 3.x's Go module version
operator_version=v0.95.2              # prometheus-operator's API module
controller_tools_version=v0.19.0
cache=${CLOAK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloak}
out="$cache/prometheus/prometheus-${prometheus_version}_operator-${operator_version}"
mkdir -p "$cache/prometheus"

exec 9>"$cache/prometheus/.build.lock"
flock 9
if [ -x "$out/prometheus" ] && [ -x "$out/promtool" ] && [ -s "$out/crds/monitoring.coreos.com_podmonitors.yaml" ] \
  && [ -s "$out/crds/monitoring.coreos.com_prometheusrules.yaml" ]; then
  echo "$out"; exit 0
fi

command -v go >/dev/null || { echo "build-prometheus: go is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOCACHE="$cache/go-build"
tmp="$out.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp/crds"
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
echo "build-prometheus: building prometheus and promtool $prometheus_version into $out (~4 min cold)" >&2
GOBIN="$tmp" go install -trimpath -ldflags "-s -w" -tags "remove_all_sd,enable_kubernetes_sd" \
  "github.com/prometheus/prometheus/cmd/prometheus@$prometheus_version" \
  "github.com/prometheus/prometheus/cmd/promtool@$prometheus_version"

echo "build-prometheus: generating the PodMonitor and PrometheusRule CRDs ($operator_version)" >&2
GOBIN="$tmp/tools" go install "sigs.k8s.io/controller-tools/cmd/controller-gen@$controller_tools_version"
module=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring
src=$(GOFLAGS=-mod=mod go mod download -json "$module@$operator_version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[ -d "$src" ] || { echo "build-prometheus: $module@$operator_version not downloaded" >&2; exit 1; }
cp -r "$src" "$tmp/monitoring" && chmod -R u+w "$tmp/monitoring"
(cd "$tmp/monitoring" && GOFLAGS=-mod=mod "$tmp/tools/controller-gen" crd:crdVersions=v1 \
  paths=./v1/... output:crd:dir="$tmp/all-crds" >&2)
for kind in podmonitors prometheusrules; do
  cp "$tmp/all-crds/monitoring.coreos.com_$kind.yaml" "$tmp/crds/"
done
rm -rf "$tmp/tools" "$tmp/monitoring" "$tmp/all-crds"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
