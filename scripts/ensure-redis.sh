#!/usr/bin/env bash
# Prints the path of redis-server, installing Debian's package when it is
# missing (the replica tests and the durability benchmark need a real Redis).
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  echo "ensure-redis: installing redis-server (Debian package)" >&2
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >&2
fi
command -v redis-server
