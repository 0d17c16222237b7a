"""The operator command line (`normserve <command>`) against a real server:
tables and --json, exit codes, export/import interoperable with PyTorch, and
Compare on .npy files whose diagnosis names the classic x.var() mistake."""

import json
import os
import subprocess

import numpy as np
import pytest
import safetensors.torch
import torch

BINARY = os.environ.get("NORMSERVE_BIN", "target/release/normserve")


def cli(server, *args, check=True, env=None):
    result = subprocess.run([BINARY, *args, "--addr", server.address], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_health_and_info(server):
    assert cli(server, "health").stdout.strip() == "SERVING"
    assert json.loads(cli(server, "health", "--json").stdout)["status"] == "SERVING"
    assert cli(server, "health", "--service", "normserve.v1.BatchNormService").returncode == 0
    unknown = cli(server, "health", "--service", "no.such.Service", check=False)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    info = json.loads(cli(server, "info", "--json").stdout)
    assert info["libtorch_version"] == torch.__version__.split("+")[0]
    assert "sessions" in info["features"]
    assert "libtorch_version" in cli(server, "info").stdout


def test_no_server_is_exit_code_2():
    result = subprocess.run([BINARY, "health", "--addr", "127.0.0.1:1", "--timeout", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot connect" in result.stderr


def test_sessions_list_get_delete(server, client):
    session = client.create_session("2d", 3, labels={"team": "cli-test", "run": "7"})
    listed = json.loads(cli(server, "sessions", "list", "--label", "team=cli-test", "--json").stdout)
    assert [s["session_id"] for s in listed] == [session.session_id]
    assert listed[0]["kind"] == "BatchNorm2d" and listed[0]["labels"] == {"team": "cli-test", "run": "7"}
    table = cli(server, "sessions", "list", "--label", "team=cli-test").stdout.splitlines()
    assert table[0].split()[:3] == ["SESSION", "KIND", "FEATURES"]
    assert table[1].split()[:3] == [session.session_id, "BatchNorm2d", "3"]
    got = json.loads(cli(server, "sessions", "get", session.session_id, "--json").stdout)
    assert got["version"] == session.info().version and got["num_features"] == 3
    assert cli(server, "sessions", "delete", session.session_id).stdout.strip() == f"deleted {session.session_id}"
    missing = cli(server, "sessions", "get", session.session_id, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("normserve: NOT_FOUND:")
    bad = cli(server, "sessions", "list", "--label", "nolabel", check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_export_and_import_interoperate_with_pytorch(server, client, tmp_path):
    module = torch.nn.BatchNorm1d(4)
    session = client.create_session_from_module(module)
    x = torch.randn(8, 4)
    module.train()(x)
    session.forward(x, train=True)
    path = tmp_path / "state.safetensors"
    cli(server, "sessions", "export", session.session_id, "--output", str(path))
    exported = safetensors.torch.load_file(str(path))
    for key, value in module.state_dict().items():
        torch.testing.assert_close(exported[key], value)
    # Import a state PyTorch wrote.
    other = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        other.running_mean.fill_(2.5)
        other.weight.fill_(0.5)
    safetensors.torch.save_file(other.state_dict(), str(path))
    out = json.loads(cli(server, "sessions", "import", session.session_id, str(path), "--json").stdout)
    assert out["version"] == session.info().version > 1
    for key, value in session.state_dict().items():
        torch.testing.assert_close(value, other.state_dict()[key])
    wrong = cli(server, "sessions", "import", session.session_id, str(tmp_path / "missing.safetensors"), check=False)
    assert wrong.returncode == 2


def test_compare_on_npy_files_names_the_unbiased_variance_mistake(server, tmp_path):
    x = torch.randn(16, 5, dtype=torch.float64) * 2 + 1
    mean = x.mean(0)
    candidate = (x - mean) / torch.sqrt(x.var(0) + 1e-5)  # x.var(): unbiased, the classic mistake
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", candidate.numpy())
    args = ["compare", "--input", str(tmp_path / "x.npy"), "--candidate-output", str(tmp_path / "y.npy")]
    report = json.loads(cli(server, *args, "--json").stdout)
    explaining = [h["name"] for h in report["diagnosis"]["hypotheses"] if h["explains"]]
    assert "unbiased_variance" in explaining
    assert report["diagnosis"]["matches_reference"] is False
    reference = next(r for r in report["reports"] if r["implementation"] == "reference")
    expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    candidate_report = next(r for r in report["reports"] if r["implementation"] == "candidate")
    diff = (candidate - expected).abs().max().item()
    assert candidate_report["parts"]["output"]["vs_reference"]["max_abs_diff"] == pytest.approx(diff, rel=1e-6)
    assert reference["parts"]["output"]["vs_float64_reference"]["max_abs_diff"] < 1e-12
    text = cli(server, *args).stdout
    assert "Diagnosis:" in text and "unbiased_variance" in text
    np.save(tmp_path / "ints.npy", np.arange(6).reshape(2, 3))
    bad = cli(server, "compare", "--input", str(tmp_path / "ints.npy"), check=False)
    assert bad.returncode == 2 and "not supported" in bad.stderr
