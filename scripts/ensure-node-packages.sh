#!/usr/bin/env bash
# Installs what a Node.js program of the project needs, idempotently: Node.js
# (Debian's nodejs and npm through apt-get when `node` is missing) and the
# packages of DIR/package-lock.json (`npm ci`: exact versions and integrity
# hashes) into ${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/normserve}/node-<lock hash>,
# outside the repository. DIR: examples/node (the example client, default) or
# deploy/checks/crds (the PodMonitor validator of deploy/check.sh).
#
#   scripts/ensure-node-packages.sh [DIR]   install what is missing, print the
#                                           node_modules directory (NODE_PATH)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
example=${1:-$here/../examples/node}
[ -f "$example/package-lock.json" ] || { echo "ensure-node-packages: no package-lock.json in $example" >&2; exit 2; }
cache=${NORMSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/normserve}

log() { echo "ensure-node-packages: $*" >&2; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "node or npm is missing; installing Debian's nodejs and npm with apt-get"
  apt-get update -qq >&2 && apt-get install -y -qq nodejs npm >&2
fi
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 18 ] || { log "Node.js $(node --version) is too old: @grpc/grpc-js 1.14 needs 18 or newer"; exit 1; }

lock_hash=$(sha256sum "$example/package-lock.json" | cut -c1-16)
dir=$cache/node-$lock_hash
if [ ! -f "$dir/.installed" ]; then
  log "installing the packages of $example/package-lock.json into $dir (first time only)"
  rm -rf "$dir" && mkdir -p "$dir"
  cp "$example/package.json" "$example/package-lock.json" "$dir/"
  # --ignore-scripts: the locked packages are plain JavaScript; nothing needs
  # to run at install time.
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  touch "$dir/.installed"
fi
echo "$dir/node_modules"
