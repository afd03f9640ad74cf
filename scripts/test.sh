#!/usr/bin/env bash
# Runs every test of edgeloom: formatting, lints, unit and property tests, and the
# end-to-end tests against real kube-apiservers. Installs what the tests need first
# (idempotent; cached outside the repository under ${EDGELOOM_CACHE:-~/.cache/edgeloom}).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "prerequisites (Go-built etcd, kube-apiserver, kube-controller-manager, kubectl, helm, SeaweedFS)"
e2e/scripts/install-tools.sh

step "prerequisites (libtorch 2.11.0 from PyPI, for edgeloom-runner)"
LIBTORCH=$(scripts/install-torch.sh | tail -n 1)
export LIBTORCH

step "prerequisites (FastAPI + uvicorn from PyPI, the serving benchmark's reference arm)"
scripts/install-fastapi.sh > /dev/null

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --bins (the e2e tests run the operator, agent and runner binaries)"
cargo build --workspace --bins --locked

step "cargo test (unit, property and end-to-end tests)"
cargo test --workspace --locked
