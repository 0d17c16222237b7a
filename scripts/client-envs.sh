#!/usr/bin/env bash
# Provisions, idempotently, the two small Python environments in which the
# Python client is tested at both ends of the runtimes it supports (no torch:
# numpy from wheels, grpcio, protobuf, pytest), outside the repository:
# ${XDG_CACHE_HOME:-~/.cache}/normserve/client-oldest and client-newest, from
# scripts/client-oldest-requirements.txt and client-newest-requirements.txt
# (created once; again when the file changes).
#
#   scripts/client-envs.sh                  install what is missing in both
#   scripts/client-envs.sh --python oldest  print that environment's python
#   scripts/client-envs.sh --python newest
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/normserve}

log() { echo "client-envs: $*" >&2; }

ensure_env() {
  local name=$1
  local venv=$cache/client-$name
  local requirements=$here/client-$name-requirements.txt
  local stamp=$venv/.normserve-requirements
  if [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
    return 0
  fi
  log "creating Python environment in $venv (first time only)"
  mkdir -p "$cache"
  local python=${NORMSERVE_BOOTSTRAP_PYTHON:-python3}
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" >&2; then
      log "python3 -m venv failed; installing python3-venv with apt-get"
      apt-get update -qq && apt-get install -y -qq python3-venv >&2
      "$python" -m venv "$venv" >&2
    fi
  fi
  # Wheels only: these environments must never compile grpcio or numpy.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    --only-binary=:all: -r "$requirements" >&2
  cp "$requirements" "$stamp"
}

case "${1:-}" in
  "") ensure_env oldest; ensure_env newest ;;
  --python)
    case "${2:-}" in
      oldest|newest) ensure_env "$2"; echo "$cache/client-$2/bin/python" ;;
      *) log "--python takes oldest or newest"; exit 2 ;;
    esac ;;
  *) log "unknown argument: $1"; exit 2 ;;
esac
