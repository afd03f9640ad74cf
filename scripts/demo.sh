#!/usr/bin/env bash
# The local federated demo: a hub and two member clusters (real etcd, kube-apiserver and
# kube-controller-manager processes on 127.0.0.1), the edgeloom CRDs installed, the
# examples in manifests/ applied and shown with kubectl, then everything torn down.
set -euo pipefail
cd "$(dirname "$0")/.."
e2e/scripts/install-tools.sh
echo "== building edgeloom (first build takes a few minutes)"
cargo build --locked -p edgeloom-e2e -p edgeloom-operator --bins
exec target/debug/edgeloom-dev demo "$@"
