"""Worker processes of test_sync_batchnorm.py: each is one rank that talks to
the server only through normserve.torch (no torch.distributed, no process
group). The test process coordinates them over pipes: it sends commands,
receives each step's tensors, and hands back the sums of the ranks'
parameter gradients, as DDP's all-reduce would.

Every input is derived from (seed, step, rank), so the test process builds
the same batches for its oracle (one nn.BatchNorm on the concatenation)."""

import io
import os
import sys
import traceback

import torch
from torch import nn

CLIENT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))
if CLIENT_DIR not in sys.path:
    sys.path.insert(0, CLIENT_DIR)


def pack(value):
    """Tensors (in any structure) as bytes for a pipe: torch's own pickling
    would share their memory through a socket that closes with the sender."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def unpack(data):
    return torch.load(io.BytesIO(data), weights_only=True)


def conv_net(seed, dtype=torch.float64):
    """A small conv net with batch norms of three kinds and configurations."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False, momentum=0.3))
    return model.to(dtype)


def sgd_step(model, grads, lr=0.05):
    """Plain SGD with the given gradients (torch.optim's first use costs
    seconds of imports in every fresh process); clears .grad."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter -= lr * grads[name]
            parameter.grad = None


def shard_size(step, rank):
    # Ranks hold batches of different sizes.
    return 2 + (rank + step) % 3


def conv_batch(seed, step, rank, dtype=torch.float64):
    """Rank `rank`'s input and loss weights of `step`: x (N, 3, 5, 6), target (N, 5)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + step * 1009 + rank)
    n = shard_size(step, rank)
    x = torch.randn(n, 3, 5, 6, generator=generator, dtype=dtype) * 2 + 0.5
    target = torch.randn(n, 5, generator=generator, dtype=dtype)
    return x, target


def conv_probe(seed, dtype=torch.float64):
    return torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(seed + 7), dtype=dtype)


def train_conv_net(conn, address, prefix, world_size, rank, steps, seed):
    """Trains conv_net for `steps` steps as rank `rank`: per step sends
    ("step", packed (output, x.grad, {name: local grad})) and applies the
    gradient sums it gets back (packed) with SGD; then sends ("done", packed
    (eval output of the probe, state_dict))."""
    try:
        import normserve
        from normserve.torch import convert_sync_batchnorm

        torch.set_num_threads(1)
        client = normserve.connect(address, timeout=120)
        model = convert_sync_batchnorm(conv_net(seed), client, prefix, world_size, rank)
        for step in range(1, steps + 1):
            x, target = conv_batch(seed, step, rank)
            x.requires_grad_(True)
            output = model(x)
            (output * target).sum().backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            conn.send(("step", pack((output.detach(), x.grad, grads))))
            summed = unpack(conn.recv())
            sgd_step(model, summed)
        model.eval()
        with torch.no_grad():
            probe_output = model(conv_probe(seed))
        conn.send(("done", pack((probe_output, model.state_dict()))))
    except BaseException:  # noqa: BLE001 - the test shows it
        conn.send(("error", traceback.format_exc()))


def layer_batch(step, rank):
    """The kill test's shard: x (N, 3, 4) and grad_output, float64."""
    generator = torch.Generator().manual_seed(step * 31 + rank)
    n = 3 + rank
    return (torch.randn(n, 3, 4, generator=generator, dtype=torch.float64) * 3 - 1,
            torch.randn(n, 3, 4, generator=generator, dtype=torch.float64))


def layer_parameters():
    return torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64), torch.tensor([0.1, 0.0, 3.0], dtype=torch.float64)


def sync_layer(client, session_id, world_size, rank, step_timeout):
    from normserve.torch import SyncBatchNorm

    bn = SyncBatchNorm(client, session_id, 3, world_size, rank, momentum=0.2, dtype=torch.float64,
                       step_timeout=step_timeout)
    weight, bias = layer_parameters()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def layer_step(bn, step, rank):
    """One training step of a lone SyncBatchNorm: (output, x.grad, weight.grad, bias.grad)."""
    x, grad_output = layer_batch(step, rank)
    x.requires_grad_(True)
    bn.zero_grad()
    output = bn(x)
    output.backward(grad_output)
    return output.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


def run_layer(conn, address, session_id, world_size, rank, completed_steps, step_timeout):
    """A rank with one SyncBatchNorm that resumes after `completed_steps` and
    runs the steps it is told: ("step", s) runs step s whole and sends
    ("done", packed (output, x.grad, weight.grad, bias.grad)); ("announce", s) sends
    ("calling",) and then runs step s; ("forward only", s) runs step s's
    forward, sends ("forward done",) and waits (the test kills it there)."""
    try:
        import normserve

        torch.set_num_threads(1)
        client = normserve.connect(address, timeout=120)
        bn = sync_layer(client, session_id, world_size, rank, step_timeout)
        bn.step = completed_steps
        while True:
            command, step = conn.recv()
            assert bn.step + 1 == step, (bn.step, step)
            if command == "forward only":
                x, _ = layer_batch(step, rank)
                bn(x.requires_grad_(True))
                conn.send(("forward done",))
                conn.recv()  # never answered: the test kills this process
            if command == "announce":
                conn.send(("calling",))
            conn.send(("done", pack(layer_step(bn, step, rank))))
    except EOFError:
        pass
    except BaseException:  # noqa: BLE001 - the test shows it
        conn.send(("error", traceback.format_exc()))
