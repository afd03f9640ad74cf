#!/usr/bin/env bash
# Builds the local control plane's tools with `go build` from the Go module proxy
# (docs/ARCHITECTURE.md, "The local control plane"): etcd, kube-apiserver, kube-controller-manager, kubectl, helm,
# and SeaweedFS's `weed` (the S3 server the rewards ledger is tested against).
#
# Idempotent. Binaries go to a cache outside the repository, keyed by the pinned versions
# and the Go modules' checksums, so a machine builds each set once:
#   ${EDGELOOM_CACHE:-~/.cache/edgeloom}/tools/<key>/<binary>
# and ${EDGELOOM_CACHE}/bin/<binary> links to the current set. A cold build takes several
# minutes on 2 cores; progress is printed every 30 seconds.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
tools="$repo/e2e/tools"
# shellcheck source=/dev/null
. "$tools/versions.env"
cache="${EDGELOOM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeloom}"
mkdir -p "$cache/bin"

command -v go >/dev/null || { echo "install-tools: Go is required (https://go.dev/doc/install)" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

sum() { cat "$@" | sha256sum | cut -c1-12; }

# build DIR KEY NAME PACKAGE LDFLAGS: go build PACKAGE from module DIR into the cache.
build() {
  local moddir=$1 outdir=$2 name=$3 pkg=$4 ldflags=$5
  if [ -x "$outdir/$name" ]; then
    echo "install-tools: $name is cached ($outdir)"
  else
    mkdir -p "$outdir"
    echo "install-tools: building $name from $pkg (a cold build takes minutes)..."
    local start=$SECONDS
    ( cd "$moddir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$outdir/$name.tmp" "$pkg" ) &
    local pid=$! next=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
      sleep 1
      if (( SECONDS >= next )) && kill -0 "$pid" 2>/dev/null; then
        echo "install-tools:   still building $name ($((SECONDS - start))s)"
        next=$((SECONDS + 30))
      fi
    done
    wait "$pid"
    mv "$outdir/$name.tmp" "$outdir/$name"
    echo "install-tools: built $name in $((SECONDS - start))s"
  fi
  ln -sfn "$outdir/$name" "$cache/bin/$name"
}

kube_key="kube-${KUBE_VERSION}-etcd-${ETCD_VERSION}-$(sum "$tools/kube/go.mod" "$tools/kube/go.sum")"
helm_key="helm-${HELM_VERSION}-$(sum "$tools/helm/go.mod" "$tools/helm/go.sum")"
weed_key="seaweedfs-$(sum "$tools/seaweedfs/go.mod" "$tools/seaweedfs/go.sum")"
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
kv="-X k8s.io/component-base/version.gitVersion=${KUBE_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor}"
kv="$kv -X k8s.io/client-go/pkg/version.gitVersion=${KUBE_VERSION} -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=${minor}"

if [ ! -x "$cache/tools/$kube_key/kubectl" ] || [ ! -x "$cache/tools/$helm_key/helm" ] || [ ! -x "$cache/tools/$weed_key/weed" ]; then
  echo "install-tools: downloading Go modules for kubernetes ${KUBE_VERSION}, etcd ${ETCD_VERSION}, helm ${HELM_VERSION}, SeaweedFS (several hundred MB on a cold machine)..."
  ( cd "$tools/kube" && go mod download ) && ( cd "$tools/helm" && go mod download ) && ( cd "$tools/seaweedfs" && go mod download )
fi
build "$tools/kube" "$cache/tools/$kube_key" etcd go.etcd.io/etcd/server/v3 ""
build "$tools/kube" "$cache/tools/$kube_key" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kv"
build "$tools/kube" "$cache/tools/$kube_key" kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kv"
build "$tools/kube" "$cache/tools/$kube_key" kubectl k8s.io/kubernetes/cmd/kubectl "$kv"
build "$tools/helm" "$cache/tools/$helm_key" helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=${HELM_VERSION}"
build "$tools/seaweedfs" "$cache/tools/$weed_key" weed github.com/seaweedfs/seaweedfs/weed ""

# Prometheus + promtool: Debian's package, extracted (no root needed once downloaded).
prom_dir="$cache/prometheus-${PROMETHEUS_DEB_VERSION}"
if [ -x "$prom_dir/usr/bin/prometheus" ] && [ -x "$prom_dir/usr/bin/promtool" ]; then
  echo "install-tools: prometheus ${PROMETHEUS_DEB_VERSION} is cached ($prom_dir)"
else
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "install-tools: prometheus comes from Debian's package; apt-get and dpkg-deb are required" >&2; exit 1; }
  echo "install-tools: downloading Debian package prometheus=${PROMETHEUS_DEB_VERSION} (about 20 MB)..."
  tmp=$(mktemp -d)
  if ! ( cd "$tmp" && apt-get download "prometheus=${PROMETHEUS_DEB_VERSION}" ); then
    if [ "$(id -u)" = 0 ]; then
      echo "install-tools: refreshing apt's package lists and retrying..."
      apt-get update -qq
      ( cd "$tmp" && apt-get download "prometheus=${PROMETHEUS_DEB_VERSION}" )
    else
      echo "install-tools: apt-get download prometheus=${PROMETHEUS_DEB_VERSION} failed; run 'sudo apt-get update' and retry" >&2
      exit 1
    fi
  fi
  rm -rf "$prom_dir.tmp" && mkdir -p "$prom_dir.tmp"
  dpkg-deb -x "$tmp"/prometheus_*.deb "$prom_dir.tmp"
  rm -rf "$tmp" "$prom_dir" && mv "$prom_dir.tmp" "$prom_dir"
  echo "install-tools: prometheus installed in $prom_dir"
fi
ln -sfn "$prom_dir/usr/bin/prometheus" "$cache/bin/prometheus"
ln -sfn "$prom_dir/usr/bin/promtool" "$cache/bin/promtool"

# The Prometheus Operator's CRDs, from its Go module (only three YAML files are kept).
crd_dir="$cache/crds/prometheus-operator-${PROMETHEUS_OPERATOR_VERSION}"
if [ -f "$crd_dir/monitoring.coreos.com_prometheusrules.yaml" ]; then
  echo "install-tools: Prometheus Operator CRDs ${PROMETHEUS_OPERATOR_VERSION} are cached ($crd_dir)"
else
  echo "install-tools: downloading the Prometheus Operator ${PROMETHEUS_OPERATOR_VERSION} Go module for its CRDs..."
  moddir=$(cd "$tools/kube" && go mod download -json "github.com/prometheus-operator/prometheus-operator@${PROMETHEUS_OPERATOR_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$moddir" ] || { echo "install-tools: could not download the Prometheus Operator module" >&2; exit 1; }
  mkdir -p "$crd_dir.tmp"
  for kind in servicemonitors podmonitors prometheusrules; do
    cp "$moddir/example/prometheus-operator-crd/monitoring.coreos.com_${kind}.yaml" "$crd_dir.tmp/"
  done
  chmod -R u+w "$crd_dir.tmp" && rm -rf "$crd_dir" && mv "$crd_dir.tmp" "$crd_dir"
fi
ln -sfn "$crd_dir" "$cache/crds/prometheus-operator"
echo "install-tools: ready in $cache/bin ($(ls "$cache/bin" | tr '\n' ' '))"
