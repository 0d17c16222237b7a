#!/usr/bin/env bash
# Pins the images listed in deploy/checks/unpinned-images.txt by digest, on a
# machine that reaches their registry: for each NAME:TAG it reads the digest
# the registry serves for that tag (the multi-platform index when there is
# one) with skopeo, rewrites every reference in deploy/ as
# NAME:TAG@sha256:..., and removes the line from the list. Review the diff,
# then run `make deploy-check`.
#
#   scripts/pin-image-digests.sh        (needs skopeo: apt-get install skopeo)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
list=$repo/deploy/checks/unpinned-images.txt
command -v skopeo >/dev/null || { echo "pin-image-digests: needs skopeo (apt-get install skopeo)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mapfile -t images < <(sed 's/#.*//; s/[[:space:]]*$//' "$list" | grep -v '^$' || true)
for image in "${images[@]}"; do
  skopeo inspect --raw "docker://$image" >"$work/manifest"
  digest=$(skopeo manifest-digest "$work/manifest")
  [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "pin-image-digests: $image: unexpected digest $digest" >&2; exit 1; }
  echo "$image -> $digest"
  # Every reference, whether or not a (stale) digest follows it already.
  mapfile -t files < <(grep -rlF --include='Dockerfile*' --include='*.yaml' --include='*.yml' -- "$image" "$repo/deploy" || true)
  for file in "${files[@]}"; do
    python3 - "$file" "$image" "$digest" <<'PY'
import re, sys
path, image, digest = sys.argv[1:]
text = open(path).read()
text = re.sub(re.escape(image) + r"(@sha256:[0-9a-f]{64})?(?![\w.-])", f"{image}@{digest}", text)
open(path, "w").write(text)
PY
  done
  python3 - "$list" "$image" <<'PY'
import sys
path, image = sys.argv[1:]
lines = open(path).read().splitlines(keepends=True)
open(path, "w").writelines(l for l in lines if l.split("#", 1)[0].strip() != image)
PY
done
