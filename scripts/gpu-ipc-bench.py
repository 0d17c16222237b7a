"""Train-mode forwards of CUDA tensors through a normserve server on this
host, four ways, as medians over rounds (MB/s of input, and ms per call):

  in_process   torch.nn.BatchNorm on the GPU in this process (the baseline)
  cuda_ipc     session.forward(x, shm=True): the tensor stays on the GPU
  grpc         session.forward(x): copied to the host and sent over gRPC
  posix_shm    session.forward(x.cpu(), shm=True): host shared memory

Prints one line per (shape, way) and writes them as JSON (--json). Exits 0
with "no CUDA" when torch sees no GPU.

    python gpu-ipc-bench.py --server-bin bin/normserve [--json out.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))

import torch  # noqa: E402

import normserve  # noqa: E402

SHAPES = {"1m": (4096, 64), "16m": (65536, 64)}


def rate(run, nbytes, rounds, seconds):
    """Median MB/s and ms per call over `rounds` rounds of `seconds` each."""
    per_round = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            calls += 1
        elapsed = time.perf_counter() - start
        per_round.append((calls * nbytes / elapsed / 1e6, elapsed / calls * 1e3))
    return statistics.median(r[0] for r in per_round), statistics.median(r[1] for r in per_round)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-bin", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: torch.cuda.is_available() is False; nothing measured")
        return 0
    proc = subprocess.Popen([args.server_bin, "--listen", "127.0.0.1:0", "--durability", "none",
                             "--device", "cuda"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("normserve listening on "):
        proc.kill()
        print(f"the server did not start: {line!r}")
        return 1
    address = line.split()[3]
    rows = []
    try:
        with normserve.connect(address, timeout=60) as client:
            for label, shape in SHAPES.items():
                x = torch.randn(*shape, device="cuda")
                nbytes = x.numel() * x.element_size()
                module = torch.nn.BatchNorm1d(shape[1]).cuda()
                session = client.create_session("1d", shape[1], device="cuda")
                host = x.cpu()

                def in_process():
                    with torch.no_grad():
                        module(x)
                    torch.cuda.synchronize()

                ways = {
                    "in_process": in_process,
                    "cuda_ipc": lambda: session.forward(x, train=True, shm=True),
                    "grpc": lambda: session.forward(x, train=True),
                    "posix_shm": lambda: session.forward(host, train=True, shm=True),
                }
                for way, run in ways.items():
                    run()  # warm-up (registrations, kernels)
                    mbps, ms = rate(run, nbytes, args.rounds, args.round_seconds)
                    rows.append({"shape": label, "way": way, "mb_per_s": round(mbps, 1),
                                 "ms_per_call": round(ms, 3)})
                    print(f"{label:4} {way:11} {mbps:10.1f} MB/s {ms:9.3f} ms/call", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": device, "rounds": args.rounds, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
