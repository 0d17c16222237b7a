#!/usr/bin/env bash
# The GPU check, run from a folder made by scripts/gpu-bundle.sh (this file
# is its gpu-check.sh) on a host with a GPU, python3 with torch 2.11 (a CUDA
# build), grpcio, protobuf, numpy and pytest; no Rust toolchain and no
# network needed:
#
#   ./gpu-check.sh [RESULTS_DIR]        (default: ./results)
#
# Parts, each under its own time limit, each appending its outcome to
# RESULTS_DIR/results.txt as soon as it ends (a later part's hang or kill
# loses nothing before it); the logs and JSON beside it:
#   facts     the GPU, torch, the bundle
#   cuda-ipc  tests/conformance/test_cuda_ipc.py (CUDA IPC regions)
#   cuda      conformance tests whose sessions run on the GPU (the server's
#             default device is the GPU where there is one)
#   bench-*   normserve-bench --device cuda, one run per scenario
#   ipc-bench scripts/gpu-ipc-bench.py: CUDA IPC vs gRPC vs host shared
#             memory vs in-process torch
# Without CUDA every GPU part reports "no CUDA" and the script still exits 0.
# Exit status: 0 when every part that ran passed, 1 otherwise.
#
# Environment: PYTHON (default python3); GPU_CHECK_TESTS (the conformance
# files of the cuda part); GPU_CHECK_SCENARIOS (comma-separated, default all);
# GPU_CHECK_ROUNDS (bench rounds, default 3).
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
out=${1:-$here/results}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
results=$out/results.txt
: > "$results"
failed=0

note() { echo "$*" | tee -a "$results"; }

# part NAME SECONDS COMMAND...: runs COMMAND with its output in NAME.log,
# killed past SECONDS; its status, time and last summary line go to results.
part() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    local summary
    summary=$(grep -v '^[[:space:]]*$' "$out/$name.log" | tail -n 1)
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        note "$name: TIMEOUT after ${limit}s | $summary"
        failed=1
    elif [[ $rc -ne 0 ]]; then
        note "$name: FAILED (exit $rc, ${took}s) | $summary"
        failed=1
    else
        note "$name: ok (${took}s) | $summary"
    fi
}

torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
if [[ -z $torch_lib ]]; then
    note "facts: FAILED | $python cannot import torch"
    exit 1
fi
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NORMSERVE_BIN=$here/bin/normserve
export PYTHONDONTWRITEBYTECODE=1
cuda=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)

note "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
[[ -f $here/BUNDLE ]] && sed 's/^/bundle: /' "$here/BUNDLE" | tee -a "$results"
note "torch: $("$python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
if [[ $cuda == 1 ]]; then
    note "gpu: $("$python" -c 'import torch; print(torch.cuda.device_count(), "x", torch.cuda.get_device_name(0))' 2>&1)"
else
    note "gpu: no CUDA (torch.cuda.is_available() is False): the GPU parts report no CUDA"
fi
part server-starts 60 "$NORMSERVE_BIN" --version

cd "$here"
# The IPC tests run (and pass their refusal checks) without CUDA too; their
# GPU tests are skipped there, with the reason in the log.
part cuda-ipc 300 "$python" -m pytest -q -rs -p no:cacheprovider tests/conformance/test_cuda_ipc.py

if [[ $cuda == 1 ]]; then
    tests=${GPU_CHECK_TESTS:-tests/conformance/test_client.py tests/conformance/test_foundation.py tests/conformance/test_sessions.py tests/conformance/test_shared_memory.py tests/conformance/test_kernels.py}
    # shellcheck disable=SC2086
    part cuda 600 "$python" -m pytest -q -rs -p no:cacheprovider $tests

    scenarios=${GPU_CHECK_SCENARIOS:-$("$here/bin/normserve-bench" --list | awk '{print $1}' | paste -sd, -)}
    IFS=, read -r -a names <<< "$scenarios"
    for scenario in "${names[@]}"; do
        part "bench-$scenario" 120 "$here/bin/normserve-bench" --server-bin "$NORMSERVE_BIN" \
            --device cuda --scenarios "$scenario" --rounds "${GPU_CHECK_ROUNDS:-3}" --idle-sessions 0 \
            --json "$out/bench-$scenario.json"
    done
    part ipc-bench 300 "$python" scripts/gpu-ipc-bench.py --server-bin "$NORMSERVE_BIN" \
        --json "$out/ipc-bench.json"
else
    note "cuda: no CUDA, skipped"
    note "bench: no CUDA, skipped (normserve-bench --device cuda needs a GPU)"
    part ipc-bench 120 "$python" scripts/gpu-ipc-bench.py --server-bin "$NORMSERVE_BIN"
fi

note "done: $([[ $failed == 0 ]] && echo 'every part passed' || echo 'some parts FAILED') (logs in $out)"
exit "$failed"
