"""A short soak (tests/soak/soak.py; `make soak` runs the full 60 s): a few
seconds of mixed load with failures, cancellations and shedding against a
fresh server, then every check of the long run — status codes by kind, RSS
growth, session consistency against PyTorch, recovery after a restart."""

import json
import os
import subprocess
import sys

SOAK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "soak", "soak.py")


def test_short_soak_passes_every_check(tmp_path):
    report_path = tmp_path / "soak.json"
    # One load process of 8 threads against a limit of 4 requests in
    # progress: every kind of call and outcome occurs, shedding included.
    run = subprocess.run(
        [sys.executable, SOAK, "--duration", "5", "--processes", "1", "--threads", "8",
         "--max-concurrent-requests", "4", "--json", str(report_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["calls"] > 0
    assert all(check["ok"] for check in report["checks"])
