#!/usr/bin/env bash
# Provisions what normserve needs, idempotently, outside the repository:
# a Python virtual environment with torch==2.11.0 (its bundled libtorch is what
# we link against) and the test dependencies from scripts/requirements.txt.
#
#   scripts/provision.sh            install what is missing
#   scripts/provision.sh --libtorch print the libtorch directory to build with
#   scripts/provision.sh --python   print the environment's python
#
# A user's own libtorch: set LIBTORCH=/path/to/libtorch (2.11.0). The Python
# environment is still created for the tests (PyTorch is their oracle).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/normserve}
venv=$cache/torch-2.11.0
requirements=$here/requirements.txt
stamp=$venv/.normserve-requirements

log() { echo "provision: $*" >&2; }

venv_python() { echo "$venv/bin/python"; }

ensure_venv() {
  if [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
    return 0
  fi
  log "creating Python environment in $venv (torch 2.11.0 and test dependencies; first time only)"
  mkdir -p "$cache"
  local python=${NORMSERVE_BOOTSTRAP_PYTHON:-python3}
  if ! command -v "$python" >/dev/null; then
    log "python3 is missing; installing it with apt-get"
    apt-get update -qq && apt-get install -y -qq python3 python3-venv >&2
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" >&2; then
      log "python3 -m venv failed; installing python3-venv with apt-get"
      apt-get update -qq && apt-get install -y -qq python3-venv >&2
      "$python" -m venv "$venv" >&2
    fi
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    -r "$requirements" >&2
  cp "$requirements" "$stamp"
}

libtorch_dir() {
  if [ -n "${LIBTORCH:-}" ]; then
    if [ ! -e "$LIBTORCH/lib/libtorch_cpu.so" ]; then
      log "LIBTORCH=$LIBTORCH has no lib/libtorch_cpu.so"
      exit 1
    fi
    echo "$LIBTORCH"
    return
  fi
  "$(venv_python)" -c 'import os, torch; print(os.path.dirname(torch.__file__))'
}

case "${1:-}" in
  "") ensure_venv ;;
  --libtorch) ensure_venv; libtorch_dir ;;
  --python) ensure_venv; venv_python ;;
  *) log "unknown argument: $1"; exit 2 ;;
esac
