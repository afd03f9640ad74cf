#!/usr/bin/env bash
# Installs FastAPI and uvicorn (from PyPI) for the serving benchmark's reference arm (what a
# user would write instead of edgeloom: a FastAPI server around torch.jit.load), once per
# machine, into a virtualenv outside the repository:
#   ${EDGELOOM_CACHE:-~/.cache/edgeloom}/fastapi-<version>/
# PyTorch comes from the torch venv of scripts/install-torch.sh (a .pth file points at it),
# so both arms run the same libtorch. Prints the venv's python on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
FASTAPI_VERSION=0.165.0
UVICORN_VERSION=0.55.0
cache="${EDGELOOM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeloom}"
venv="$cache/fastapi-$FASTAPI_VERSION-uvicorn-$UVICORN_VERSION"
python="${PYTHON:-python3}"
libtorch=$(scripts/install-torch.sh | tail -n 1)
torch_site=$(dirname "$libtorch")
mkdir -p "$cache"
exec 9>"$cache/.fastapi-$FASTAPI_VERSION.lock"
flock -n 9 || { echo "install-fastapi: another install is running; waiting for it..." >&2; flock 9; }
if [ ! -f "$venv/.installed" ]; then
  echo "install-fastapi: installing fastapi==$FASTAPI_VERSION uvicorn==$UVICORN_VERSION from PyPI into $venv..." >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  start=$SECONDS
  "$venv/bin/python" -m pip install --quiet --progress-bar off "fastapi==$FASTAPI_VERSION" "uvicorn==$UVICORN_VERSION" >&2
  site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  echo "$torch_site" > "$site/edgeloom-torch.pth"
  "$venv/bin/python" -c 'import fastapi, uvicorn, torch; print("install-fastapi: fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__, "torch", torch.__version__)' >&2
  touch "$venv/.installed"
  echo "install-fastapi: installed in $((SECONDS - start))s" >&2
else
  echo "install-fastapi: fastapi $FASTAPI_VERSION is cached ($venv)" >&2
fi
echo "$venv/bin/python"
