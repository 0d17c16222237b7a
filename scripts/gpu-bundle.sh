#!/usr/bin/env bash
# Puts what a GPU check needs into one folder (default target/gpu-bundle), to
# build on one host and test on another that has a GPU but no Rust toolchain
# and no network: the release binaries of this checkout, stripped (normserve,
# normserve-bench), the Python client with its stubs, the conformance tests,
# and the check itself (gpu-check.sh at the folder's root; see
# docs/operations.md, "Checking a GPU host").
#
#   scripts/gpu-bundle.sh [DIR]
#
# Build first (make build): the binaries are taken as built, never rebuilt
# here. The folder is replaced whole.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/target/gpu-bundle}
for binary in normserve normserve-bench; do
    if [[ ! -x $repo/target/release/$binary ]]; then
        echo "gpu-bundle: target/release/$binary is missing; run make build first" >&2
        exit 2
    fi
done
rm -rf "$out"
mkdir -p "$out/bin" "$out/clients/python" "$out/tests" "$out/scripts"
for binary in normserve normserve-bench; do
    strip -o "$out/bin/$binary" "$repo/target/release/$binary"
done
cp -a "$repo/clients/python/normserve" "$out/clients/python/"
cp -a "$repo/tests/conformance" "$out/tests/"
find "$out" -name __pycache__ -type d -prune -exec rm -rf {} +
cp "$repo/scripts/gpu-check.sh" "$out/gpu-check.sh"
cp "$repo/scripts/gpu-ipc-bench.py" "$out/scripts/"
{
    echo "commit $(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "libtorch $("$repo/target/release/normserve" --version 2>/dev/null | head -n1 || true)"
} > "$out/BUNDLE"
echo "gpu-bundle: $out ($(du -sh "$out" | cut -f1))"
