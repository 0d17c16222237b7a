"""The operator command line against a real server, through both binaries:
`normserve <command>` and `normserve-ctl <command>` (the same commands without
libtorch, the container health probe). Tables and --json (proto3 JSON, checked
against protobuf's own JSON mapping), exit codes, a closed pipe, export/import
interoperable with PyTorch, and Compare on .npy files checked against
PyTorch's F.batch_norm."""

import fcntl
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import ServerProcess
from google.protobuf import json_format
from normserve.v1 import batch_norm_pb2, batch_norm_pb2_grpc, server_pb2

BINARY = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
# The light binary is built beside the server's (same workspace, same target dir).
CTL = os.environ.get("NORMSERVE_CTL_BIN", os.path.join(os.path.dirname(BINARY) or ".", "normserve-ctl"))
BOTH = pytest.mark.parametrize("binary", [BINARY, CTL], ids=["normserve", "normserve-ctl"])


def cli(server, *args, binary=BINARY, check=True, env=None):
    result = subprocess.run([binary, *args, "--addr", server.address], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def protobuf_json(message):
    """protobuf's JSON mapping of a response, fields without presence included:
    what --json must print."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


@BOTH
def test_health_and_info(server, binary):
    assert cli(server, "health", binary=binary).stdout.strip() == "SERVING"
    assert json.loads(cli(server, "health", "--json", binary=binary).stdout) == {"status": "SERVING"}
    assert cli(server, "health", "--service", "normserve.v1.BatchNormService", binary=binary).returncode == 0
    unknown = cli(server, "health", "--service", "no.such.Service", binary=binary, check=False)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    info = json.loads(cli(server, "info", "--json", binary=binary).stdout)
    assert info["libtorchVersion"] == torch.__version__.split("+")[0]
    assert "sessions" in info["features"]


def test_info_table_has_one_plain_value_per_cell(server):
    lines = cli(server, "info", binary=CTL).stdout.splitlines()
    assert lines[0].split() == ["FIELD", "VALUE"]
    rows = {line.split(None, 1)[0]: line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
            for line in lines[1:]}
    assert rows["libtorch_version"] == torch.__version__.split("+")[0]
    info = json.loads(cli(server, "info", "--json", binary=CTL).stdout)
    assert rows["features"] == ", ".join(info["features"])
    assert rows["limits.max_sessions"] == info["limits"]["maxSessions"]
    for line in lines:
        assert not any(c in line for c in '{}[]"'), f"raw JSON in the table: {line!r}"


def test_json_is_protobufs_json_mapping(server, client, server_stub, bn_stub):
    """--json prints the response as protobuf's JSON mapping does (the Python
    protobuf library as the oracle): lowerCamelCase names, enums by name,
    64-bit integers as strings, defaults included."""
    info = json.loads(cli(server, "info", "--json", binary=CTL).stdout)
    assert info == protobuf_json(server_stub.GetServerInfo(server_pb2.GetServerInfoRequest()))
    session = client.create_session("2d", 3, labels={"team": "json-test"})
    try:
        got = json.loads(cli(server, "sessions", "get", session.session_id, "--json", binary=CTL).stdout)
        expected = protobuf_json(bn_stub.GetSession(batch_norm_pb2.GetSessionRequest(session_id=session.session_id)))
        for stamp in ("lastUsedAt",):  # a read may move it; the rest is fixed
            got["session"].pop(stamp, None)
            expected["session"].pop(stamp, None)
        assert got == expected
        assert got["session"]["numBatchesTracked"] == "0" and got["session"]["config"]["kind"] == "BATCH_NORM_2D"
        assert got["session"]["config"]["numFeatures"] == "3"
    finally:
        session.delete()


def test_no_server_is_exit_code_2():
    for binary in (BINARY, CTL):
        result = subprocess.run([binary, "health", "--addr", "127.0.0.1:1", "--timeout", "2"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "cannot connect" in result.stderr


@BOTH
def test_sessions_list_get_delete(server, client, binary):
    session = client.create_session("2d", 3, labels={"team": "cli-test", "run": "7"})
    listed = json.loads(cli(server, "sessions", "list", "--label", "team=cli-test", "--json", binary=binary).stdout)
    assert [s["sessionId"] for s in listed["sessions"]] == [session.session_id]
    assert listed["sessions"][0]["config"]["kind"] == "BATCH_NORM_2D"
    assert listed["sessions"][0]["config"]["labels"] == {"team": "cli-test", "run": "7"}
    table = cli(server, "sessions", "list", "--label", "team=cli-test", binary=binary).stdout.splitlines()
    assert table[0].split()[:3] == ["SESSION", "KIND", "FEATURES"]
    assert table[1].split()[:4] == [session.session_id, "BatchNorm2d", "3", "float32"]
    got = json.loads(cli(server, "sessions", "get", session.session_id, "--json", binary=binary).stdout)
    assert got["session"]["version"] == str(session.info().version)
    text = cli(server, "sessions", "get", session.session_id, binary=binary).stdout
    assert "labels" in text and "run=7,team=cli-test" in text
    assert cli(server, "sessions", "delete", session.session_id, binary=binary).stdout.strip() == f"deleted {session.session_id}"
    missing = cli(server, "sessions", "get", session.session_id, binary=binary, check=False)
    program = os.path.basename(binary)
    assert missing.returncode == 1 and missing.stderr.startswith(f"{program}: NOT_FOUND:")
    bad = cli(server, "sessions", "list", "--label", "nolabel", binary=binary, check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_export_and_import_interoperate_with_pytorch(server, client, tmp_path):
    module = torch.nn.BatchNorm1d(4)
    session = client.create_session_from_module(module)
    x = torch.randn(8, 4)
    module.train()(x)
    session.forward(x, train=True)
    path = tmp_path / "state.safetensors"
    exported_json = json.loads(cli(server, "sessions", "export", session.session_id, "--output", str(path),
                                   "--json", binary=CTL).stdout)
    assert exported_json["version"] == str(session.info().version)
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
    assert out["session"]["version"] == str(session.info().version) and session.info().version > 1
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
    run = cli(server, *args, "--json", check=False)
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    explaining = [h["name"] for h in report["diagnosis"]["hypotheses"] if h["explains"]]
    assert "unbiased_variance" in explaining
    assert report["diagnosis"]["matchesReference"] is False
    reference = next(r for r in report["reports"] if r["implementation"] == "IMPLEMENTATION_REFERENCE")
    expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    candidate_report = next(r for r in report["reports"] if r["implementation"] == "IMPLEMENTATION_CANDIDATE")
    diff = (candidate - expected).abs().max().item()
    assert candidate_report["output"]["vsReference"]["maxAbsDiff"] == pytest.approx(diff, rel=1e-6)
    assert reference["output"]["vsFloat64Reference"]["maxAbsDiff"] < 1e-12
    assert isinstance(candidate_report["output"]["vsReference"]["mismatchedElements"], str)
    text = cli(server, *args, check=False).stdout
    assert "Diagnosis:" in text and "unbiased_variance" in text
    np.save(tmp_path / "ints.npy", np.arange(6).reshape(2, 3))
    bad = cli(server, "compare", "--input", str(tmp_path / "ints.npy"), check=False)
    assert bad.returncode == 2 and "not supported" in bad.stderr


@BOTH
def test_compare_exit_code_says_whether_the_candidate_matches(server, tmp_path, binary):
    """Oracle: PyTorch's F.batch_norm on the same array is a matching
    candidate (exit 0); the same off by 1e-3 is not (exit 1, report printed);
    --report-only prints the same report and exits 0."""
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    np.save(tmp_path / "x.npy", x.numpy())
    good = torch.nn.functional.batch_norm(x, None, None, training=True)
    np.save(tmp_path / "good.npy", good.numpy())
    np.save(tmp_path / "bad.npy", (good + 1e-3).numpy())
    base = ["compare", "--input", str(tmp_path / "x.npy"), "--candidate-output"]
    matching = cli(server, *base, str(tmp_path / "good.npy"), binary=binary, check=False)
    assert matching.returncode == 0, matching.stderr
    mismatching = cli(server, *base, str(tmp_path / "bad.npy"), binary=binary, check=False)
    assert mismatching.returncode == 1
    assert "does not match" in mismatching.stderr and "Diagnosis:" in mismatching.stdout
    only = cli(server, *base, str(tmp_path / "bad.npy"), "--report-only", binary=binary, check=False)
    assert only.returncode == 0 and only.stdout == mismatching.stdout


def pytorch_error(*args, **kwargs):
    with pytest.raises(RuntimeError) as error:
        torch.nn.functional.batch_norm(*args, **kwargs)
    return str(error.value)


def test_compare_eval_follows_pytorch_without_running_statistics(server, tmp_path):
    """F.batch_norm(training=False) refuses missing running statistics; so does
    `compare --eval` (it does not fall back to batch statistics), and with them
    it compares against F.batch_norm in eval mode."""
    x = torch.randn(6, 4, dtype=torch.float64)
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    for name, value in [("x", x), ("mean", mean), ("var", var)]:
        np.save(tmp_path / f"{name}.npy", value.numpy())
    base = ["compare", "--input", str(tmp_path / "x.npy"), "--eval"]
    neither = cli(server, *base, binary=CTL, check=False)
    assert neither.returncode == 2
    assert pytorch_error(x, None, None, training=False) in neither.stderr
    only_mean = cli(server, *base, "--running-mean", str(tmp_path / "mean.npy"), binary=CTL, check=False)
    assert only_mean.returncode == 2
    assert pytorch_error(x, mean, None, training=False) in only_mean.stderr
    expected = torch.nn.functional.batch_norm(x, mean.clone(), var.clone(), training=False)
    np.save(tmp_path / "y.npy", expected.numpy())
    run = cli(server, *base, "--running-mean", str(tmp_path / "mean.npy"), "--running-var", str(tmp_path / "var.npy"),
              "--candidate-output", str(tmp_path / "y.npy"), "--json", binary=CTL, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["diagnosis"]["matchesReference"] is True


@pytest.fixture(scope="module")
def many_sessions():
    """A server of its own holding enough sessions that a listing outgrows a
    4 KiB pipe several times over."""
    proc = ServerProcess("--durability", "none")
    with grpc.insecure_channel(proc.address) as channel:
        stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
        for i in range(300):
            stub.CreateSession(batch_norm_pb2.CreateSessionRequest(
                session_id=f"pipe-{i:03d}", kind=batch_norm_pb2.BATCH_NORM_1D, num_features=2))
    yield proc
    assert proc.stop() == 0


def run_into_closed_pipe(command, read_first_line):
    """Runs `command` with its stdout on a 4 KiB pipe; reads one line (or
    nothing) and closes the pipe while the command still has output to write,
    as `| head -1` does. Returns (exit status, stderr)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    if not read_first_line:
        os.close(read_end)  # `| head -c0`: closed before the first write
    proc = subprocess.Popen(command, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    if read_first_line:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(read_end, 1)
            assert chunk, "the command printed nothing"
            line += chunk
        os.close(read_end)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr.decode()


@BOTH
@pytest.mark.parametrize("args", [["sessions", "list"], ["sessions", "list", "--json"], ["info", "--json"]],
                         ids=["list", "list-json", "info-json"])
def test_a_closed_pipe_ends_the_output_quietly(many_sessions, binary, args):
    command = [binary, *args, "--addr", many_sessions.address]
    for read_first_line in (True, False):
        if read_first_line and args[0] == "info":
            continue  # fits in the pipe: only the closed-before-writing case applies
        status, stderr = run_into_closed_pipe(command, read_first_line)
        assert status == 0 and stderr == "", (status, stderr)


def test_help_separates_the_server_from_the_commands():
    top = subprocess.run([BINARY, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0
    assert "serve" in top.stdout and "sessions" in top.stdout and "health" in top.stdout
    assert "--data-dir" not in top.stdout and "NORMSERVE_DATA_DIR" not in top.stdout
    serve = subprocess.run([BINARY, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 0 and "--data-dir" in serve.stdout and "NORMSERVE_DATA_DIR" in serve.stdout
    assert "sessions" not in serve.stdout.split("Options:")[0]
    ctl = subprocess.run([CTL, "--help"], capture_output=True, text=True, timeout=60)
    assert ctl.returncode == 0 and "health" in ctl.stdout and "--data-dir" not in ctl.stdout


def test_serve_subcommand_serves_like_no_subcommand(tmp_path):
    proc = subprocess.Popen([BINARY, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("normserve listening on "), proc.stderr.read()
        address = line.split()[3]
        health = subprocess.run([CTL, "health", "--addr", address], capture_output=True, text=True, timeout=60)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def needed_libraries(path):
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


def test_the_light_binary_does_not_link_libtorch():
    assert any("torch" in lib for lib in needed_libraries(BINARY)), "the check cannot tell: the server has no libtorch"
    light = needed_libraries(CTL)
    assert not any("torch" in lib or "c10" in lib for lib in light), light


# Forks and execs its arguments, then prints the child's exit code and peak RSS
# (getrusage through wait4). Linux keeps a forked child's pre-exec peak, so the
# child must come from a small process (this bare interpreter, a few MiB), not
# from the test's own (PyTorch loaded, hundreds of MiB): the figure is an upper
# bound of the binary's own peak.
PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


@pytest.mark.parametrize("args", [["health"], ["sessions", "list"], ["info", "--json"]],
                         ids=["health", "sessions-list", "info-json"])
def test_the_light_binary_stays_under_20_mib(server, args):
    """Peak RSS of the light binary's process, a property of the binary (not a
    timing): libtorch alone maps hundreds of MiB."""
    measured = subprocess.run([sys.executable, "-I", "-S", "-c", PEAK_RSS, CTL, *args, "--addr", server.address],
                              capture_output=True, text=True, timeout=60)
    status, max_rss_kib = (int(field) for field in measured.stdout.split())
    assert status == 0, measured.stderr
    assert max_rss_kib < 20 * 1024, f"{max_rss_kib} KiB"
