#!/usr/bin/env bash
# Regenerates e2e/tools/{kube,helm,seaweedfs}/go.mod and go.sum from versions.env.
# k8s.io/kubernetes requires its staging modules at v0.0.0, which the module proxy does not
# serve; every such line of its own go.mod becomes a replace to the matching v0.N.M release.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
. "$here/versions.env"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
staging_version="v0.${KUBE_VERSION#v1.}"

cd "$here/kube"
rm -f go.mod go.sum
go mod init edgeloom.io/e2e-tools/kube >/dev/null 2>&1
go mod edit -go=1.26.0
kube_gomod=$(go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$kube_gomod" | awk '{print $1}' | sort -u | while read -r m; do
  go mod edit -replace "${m}=${m}@${staging_version}"
done
go mod edit -require "k8s.io/kubernetes@${KUBE_VERSION}" -require "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
go get -tool k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
go mod tidy

cd "$here/helm"
rm -f go.mod go.sum
go mod init edgeloom.io/e2e-tools/helm >/dev/null 2>&1
go mod edit -go=1.26.0
go get -tool "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}"
go mod tidy

cd "$here/seaweedfs"
rm -f go.mod go.sum
go mod init edgeloom.io/e2e-tools/seaweedfs >/dev/null 2>&1
go mod edit -go=1.26.0
go get -tool "github.com/seaweedfs/seaweedfs/weed@${SEAWEEDFS_VERSION}"
go mod tidy
echo "regenerated e2e/tools/kube, helm and seaweedfs for kubernetes ${KUBE_VERSION}, etcd ${ETCD_VERSION}, helm ${HELM_VERSION}, SeaweedFS ${SEAWEEDFS_VERSION}"
