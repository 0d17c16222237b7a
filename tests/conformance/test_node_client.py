"""The Node.js example client (examples/node/client.js, @grpc/grpc-js +
@grpc/proto-loader) against a real server, with PyTorch as the oracle.

The test draws the batches, hands them to the Node client as a JSON file, runs
it as a subprocess (it creates a session, trains, runs eval, reads the state)
and compares the JSON it prints with torch.nn.BatchNorm1d/2d on the same
batches. scripts/ensure-node-packages.sh installs Node.js (when missing) and the
locked npm packages.
"""

import json
import os
import subprocess

import pytest
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLIENT = os.path.join(REPO, "examples", "node", "client.js")


@pytest.fixture(scope="module")
def node_env():
    node_modules = subprocess.run(
        [os.path.join(REPO, "scripts", "ensure-node-packages.sh")],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout.strip()
    return {**os.environ, "NODE_PATH": node_modules}


def run_client(node_env, *args):
    return subprocess.run(["node", CLIENT, *args], env=node_env, capture_output=True, text=True, timeout=120)


def tensor(found):
    return torch.tensor(found["values"], dtype=torch.float32).reshape(found["shape"])


@pytest.mark.parametrize(
    "kind, module, shape",
    [
        ("1d", torch.nn.BatchNorm1d, (6, 4)),
        ("1d", torch.nn.BatchNorm1d, (5, 3, 7)),
        ("2d", torch.nn.BatchNorm2d, (4, 3, 5, 5)),
    ],
)
def test_node_client_trains_and_evaluates_like_pytorch(server, node_env, tmp_path, kind, module, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    steps = 4
    # Off-centre, scaled batches: the running statistics move visibly.
    train = [torch.randn(shape, generator=generator) * 3 + 1.5 for _ in range(steps)]
    evaluate = torch.randn(shape, generator=generator) * 2 - 0.5
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({
        "shape": list(shape),
        "train": [x.flatten().tolist() for x in train],
        "eval": evaluate.flatten().tolist(),
    }))

    done = run_client(node_env, "--addr", server.address, "--kind", kind,
                      "--num-features", str(shape[1]), "--inputs", str(inputs))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    oracle = module(shape[1])
    with torch.no_grad():
        oracle.train()
        for step, (x, reply) in enumerate(zip(train, result["train"], strict=True)):
            torch.testing.assert_close(tensor(reply["output"]), oracle(x), msg=f"train step {step}")
            assert reply["num_batches_tracked"] == step + 1
            assert reply["version"] == step + 2  # 1 after creation
        oracle.eval()
        torch.testing.assert_close(tensor(result["eval"]["output"]), oracle(evaluate))

    state = result["state"]
    assert state["num_batches_tracked"] == steps == oracle.num_batches_tracked.item()
    assert state["version"] == steps + 1  # eval changes nothing
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(tensor(state[name]), getattr(oracle, name).detach(), msg=name)
    assert state["eps"] == oracle.eps and state["momentum"] == pytest.approx(oracle.momentum)


def test_node_client_reports_the_servers_error(server, node_env, tmp_path):
    # A (2, 5) batch for a BatchNorm1d(3): exit code 1 and PyTorch's own message.
    with pytest.raises(RuntimeError) as pytorch:
        torch.nn.BatchNorm1d(3)(torch.full((2, 5), 0.5))
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"shape": [2, 5], "train": [[0.5] * 10], "eval": [0.5] * 10}))
    done = run_client(node_env, "--addr", server.address, "--kind", "1d", "--num-features", "3",
                      "--inputs", str(inputs))
    assert done.returncode == 1, done.stderr
    assert "forward: INVALID_ARGUMENT" in done.stderr
    assert str(pytorch.value) in done.stderr


def test_node_client_refuses_bad_usage(node_env):
    done = run_client(node_env, "--kind", "4d")
    assert done.returncode == 2
    assert "--kind must be 1d, 2d or 3d" in done.stderr
