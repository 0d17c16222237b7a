#!/usr/bin/env bash
# Checks proto/ like the public API it is, with buf (scripts/ensure-buf.sh):
#
#   lint       buf lint, STANDARD rules (proto/buf.yaml names the exceptions)
#   released   buf breaking against proto/baseline/normserve-v1.json, the image of
#              the API as last released: works in any checkout, shallow or not
#   branch     buf breaking against the same files at the merge base with main
#              (on main itself: HEAD's first parent), so a change is also held
#              to what main already has; skipped with a note outside git or when
#              that commit is not in the clone (shallow)
#
#   scripts/proto-check.sh                    all three
#   scripts/proto-check.sh --update-baseline  rewrite the released image from proto/
#                                             (at a release, after review)
#
# NORMSERVE_PROTO_ROOT checks another copy (scripts/proto-check-selftest.sh),
# NORMSERVE_PROTO_MAIN names the main branch (default: origin/main, else main).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=${NORMSERVE_PROTO_ROOT:-$repo}
baseline=proto/baseline/normserve-v1.json
buf=$("$repo/scripts/ensure-buf.sh")
cd "$root"

if [ "${1:-}" = --update-baseline ]; then
  "$buf" build proto --exclude-source-info -o "$baseline.tmp.json"
  # One field per line, so that a baseline update reads as a diff in review.
  python3 -m json.tool --indent 1 "$baseline.tmp.json" >"$baseline"
  rm -f "$baseline.tmp.json"
  echo "proto-check: wrote $baseline"
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: scripts/proto-check.sh [--update-baseline]" >&2; exit 2; }

failed=()
echo "== proto-check: lint"
"$buf" lint proto || failed+=(lint)

echo "== proto-check: released ($baseline)"
"$buf" breaking proto --against "$baseline" || failed+=(released)

echo "== proto-check: branch"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && [ "$(git rev-parse --show-toplevel)" = "$(pwd -P)" ]; then
  main=${NORMSERVE_PROTO_MAIN:-}
  if [ -z "$main" ]; then
    for candidate in origin/main main; do
      if git rev-parse --verify --quiet "$candidate^{commit}" >/dev/null; then main=$candidate; break; fi
    done
  fi
  base=
  if [ -n "$main" ]; then
    base=$(git merge-base HEAD "$main" 2>/dev/null || true)
    # On main (or a branch with nothing of its own yet): the previous commit.
    if [ "$base" = "$(git rev-parse HEAD)" ]; then
      base=$(git rev-parse --verify --quiet 'HEAD^1^{commit}' || true)
    fi
  fi
  if [ -z "$base" ]; then
    echo "proto-check: note: no merge base with main and no parent commit in this clone; branch check skipped"
  elif ! git cat-file -e "$base:proto" 2>/dev/null; then
    echo "proto-check: note: $base has no proto/; branch check skipped"
  else
    echo "against $base ($(git log -1 --format=%s "$base" | cut -c1-60))"
    "$buf" breaking proto --against ".git#ref=$base,subdir=proto" || failed+=(branch)
  fi
else
  echo "proto-check: note: not a git checkout; branch check skipped"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "proto-check: failed: ${failed[*]}"
  exit 1
fi
echo "proto-check: lint and breaking checks passed"
