#!/usr/bin/env bash
# Installs the buf CLI (lint, breaking-change detection and code generation for
# proto/), idempotently, outside the repository: the buf-bin wheel from PyPI,
# which carries buf's official static binary, in a virtual environment under
# ${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/normserve}/buf-$BUF_VERSION.
# Nothing is downloaded at check time.
#
#   scripts/ensure-buf.sh   install if missing, print the path of the buf binary
set -euo pipefail
BUF_VERSION=1.75.0
cache=${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/normserve}
venv=$cache/buf-$BUF_VERSION
buf=$venv/bin/buf

log() { echo "ensure-buf: $*" >&2; }

if ! { [ -x "$buf" ] && [ "$("$buf" --version 2>/dev/null)" = "$BUF_VERSION" ]; }; then
  log "installing buf $BUF_VERSION (PyPI: buf-bin) into $venv (first time only)"
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
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    --no-deps "buf-bin==$BUF_VERSION" >&2
  actual=$("$buf" --version)
  [ "$actual" = "$BUF_VERSION" ] || { log "installed buf reports $actual, expected $BUF_VERSION"; exit 1; }
fi
echo "$buf"
