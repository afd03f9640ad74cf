#!/usr/bin/env bash
# The local federated demo: a hub and two member clusters (real etcd, kube-apiserver and
# kube-controller-manager processes on 127.0.0.1), the edgeloom operator, one edgeloom-agent
# per node running libtorch workloads, example jobs placed across both clusters, their
# results and rewards (ledger balance, verify, trust), a real Prometheus scraping it all
# with the Helm chart's alert rules, then everything torn down (pass --hold to keep it
# running until Ctrl-C). First run: builds the control plane (about 7 min)
# and installs libtorch from PyPI (about 2.7 GB); later runs start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
e2e/scripts/install-tools.sh
LIBTORCH=$(scripts/install-torch.sh | tail -n 1)
export LIBTORCH
echo "== building edgeloom (first build takes a few minutes)"
cargo build --locked --workspace --bins
exec target/debug/edgeloom-dev demo "$@"
