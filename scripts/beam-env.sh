#!/usr/bin/env bash
# Provisions, idempotently, the Python environment in which normserve.beam is
# tested (tests/beam) and its example runs (examples/beam): apache-beam, the
# Python client's runtimes (grpcio, protobuf, numpy) and pytest, pinned in
# scripts/beam-env-requirements.txt, installed from wheels outside the
# repository: ${XDG_CACHE_HOME:-~/.cache}/normserve/beam-<hash of the
# requirements>, so a changed pin gets a fresh environment and an old one is
# never half-upgraded. No torch here. The client itself is not installed: the
# tests and the example import it from clients/python.
#
#   scripts/beam-env.sh           install what is missing
#   scripts/beam-env.sh --python  print the environment's python
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/normserve}
requirements=$here/beam-env-requirements.txt
venv=$cache/beam-$(sha256sum "$requirements" | cut -c1-12)
stamp=$venv/.normserve-requirements

log() { echo "beam-env: $*" >&2; }

ensure_env() {
  if [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
    return 0
  fi
  log "creating Python environment in $venv (apache-beam; first time only)"
  mkdir -p "$cache"
  local python=${NORMSERVE_BOOTSTRAP_PYTHON:-python3}
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" >&2; then
      log "python3 -m venv failed; installing python3-venv with apt-get"
      apt-get update -qq && apt-get install -y -qq python3-venv >&2
      "$python" -m venv "$venv" >&2
    fi
  fi
  # Wheels only: this environment must never compile grpcio, numpy or pyarrow.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    --only-binary=:all: -r "$requirements" >&2
  cp "$requirements" "$stamp"
}

case "${1:-}" in
  "") ensure_env ;;
  --python) ensure_env; echo "$venv/bin/python" ;;
  *) log "unknown argument: $1"; exit 2 ;;
esac
