"""A short chaos run (tests/chaos/chaos.py; `make chaos` runs the long one):
kill -9 under load, then each kind of damage to the store in turn, and
restarts, every session checked against a PyTorch replay of the steps the
server acknowledged."""

import json
import os
import subprocess
import sys

CHAOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "chaos", "chaos.py")


def test_short_chaos_loses_nothing_silently(tmp_path):
    report_path = tmp_path / "chaos.json"
    run = subprocess.run(
        [sys.executable, CHAOS, "--rounds", "4", "--seconds", "45", "--clients", "2", "--sessions", "3",
         "--seed", "15", "--damages", "none,flip-record,truncate,delete", "--json", str(report_path)],
        capture_output=True, text=True, timeout=150,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["failures"] == []
    assert report["rounds"] == report["kills"] == 4
    assert report["acknowledged"] > 0
    # The plain kill restarted; the emptied and deleted stores were refused.
    assert report["outcomes"]["started"] >= 1
    refused = sum(n for outcome, n in report["outcomes"].items() if outcome.startswith("refused"))
    assert refused >= 2, report["outcomes"]
