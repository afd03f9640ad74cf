#!/usr/bin/env bash
# Installs libtorch for edgeloom-runner (tch 0.24 pairs with torch 2.11.0 exactly) from
# PyPI into a virtualenv outside the repository, once per machine:
#   ${EDGELOOM_CACHE:-~/.cache/edgeloom}/torch-2.11.0/
# Prints the LIBTORCH directory (the torch package inside the venv) on its last line.
# The wheel is about 2.7 GB with its CUDA libraries; a cold install takes a few minutes.
set -euo pipefail
TORCH_VERSION=2.11.0
cache="${EDGELOOM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeloom}"
venv="$cache/torch-$TORCH_VERSION"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "install-torch: python3 is required" >&2; exit 1; }
# One install at a time: a second run (the demo and the tests started together) waits for
# the first instead of removing the venv under it.
mkdir -p "$cache"
exec 9>"$cache/.torch-$TORCH_VERSION.lock"
flock -n 9 || { echo "install-torch: another install is running; waiting for it..." >&2; flock 9; }

if [ ! -f "$venv/.installed" ]; then
  echo "install-torch: installing torch==$TORCH_VERSION from PyPI into $venv (about 2.7 GB, once per machine)..." >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  start=$SECONDS
  "$venv/bin/python" -m pip install --progress-bar off "torch==$TORCH_VERSION" >&2 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    kill -0 "$pid" 2>/dev/null && echo "install-torch:   still installing ($((SECONDS - start))s)" >&2
  done
  wait "$pid"
  touch "$venv/.installed"
  echo "install-torch: installed in $((SECONDS - start))s" >&2
else
  echo "install-torch: torch $TORCH_VERSION is cached ($venv)" >&2
fi
# numpy only silences torch's "Failed to initialize NumPy" warning in the test's Python.
"$venv/bin/python" -c 'import numpy' 2>/dev/null || "$venv/bin/python" -m pip install --quiet numpy >&2
"$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))'
