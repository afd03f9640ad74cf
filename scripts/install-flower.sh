#!/usr/bin/env bash
# Installs Flower (flwr, from PyPI) for the federated benchmark's reference arm, once per
# machine, into a virtualenv outside the repository:
#   ${EDGELOOM_CACHE:-~/.cache/edgeloom}/flwr-1.42.0/
# PyTorch comes from the torch venv of scripts/install-torch.sh (a .pth file points at it),
# so the Flower clients train the same model with the same libtorch as edgeloom's runner.
# Prints the venv's python on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
FLWR_VERSION=1.42.0
cache="${EDGELOOM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeloom}"
venv="$cache/flwr-$FLWR_VERSION"
python="${PYTHON:-python3}"
libtorch=$(scripts/install-torch.sh | tail -n 1)
torch_site=$(dirname "$libtorch")
mkdir -p "$cache"
exec 9>"$cache/.flwr-$FLWR_VERSION.lock"
flock -n 9 || { echo "install-flower: another install is running; waiting for it..." >&2; flock 9; }
if [ ! -f "$venv/.installed" ]; then
  echo "install-flower: installing flwr==$FLWR_VERSION from PyPI into $venv..." >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  start=$SECONDS
  "$venv/bin/python" -m pip install --progress-bar off "flwr==$FLWR_VERSION" >&2
  site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  echo "$torch_site" > "$site/edgeloom-torch.pth"
  "$venv/bin/python" -c 'import flwr, torch; print("install-flower: flwr", flwr.__version__, "torch", torch.__version__)' >&2
  touch "$venv/.installed"
  echo "install-flower: installed in $((SECONDS - start))s" >&2
else
  echo "install-flower: flwr $FLWR_VERSION is cached ($venv)" >&2
fi
echo "$venv/bin/python"
