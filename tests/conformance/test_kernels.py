"""Both CPU statistics kernels (--cpu-stats-kernel libtorch|native) give
torch.nn.BatchNorm's numbers, step after step, on inputs large enough to take
the native kernel's path (contiguous float32 of rank 3 to 5) and on (N, C)
inputs, which always take libtorch's. The oracle is a local PyTorch module."""

import pytest
import torch

import normserve
from conftest import ServerProcess

SHAPES = [(8, 16, 12, 12), (4, 8, 6, 6, 6), (3, 5, 17), (64, 64, 8, 8), (256, 32)]
MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


@pytest.fixture(scope="module", params=["libtorch", "native"])
def kernel_client(request):
    proc = ServerProcess("--cpu-stats-kernel", request.param, "--durability", "none")
    try:
        with normserve.connect(proc.address) as client:
            yield client
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_kernel_matches_pytorch(kernel_client, shape, momentum):
    gen = torch.Generator().manual_seed(hash((shape, momentum)) % 2**31)
    c = shape[1]
    module = MODULES[len(shape)](c, momentum=momentum)
    with torch.no_grad():
        module.weight.copy_(torch.randn(c, generator=gen) + 1)
        module.bias.copy_(torch.randn(c, generator=gen))
        module.running_mean.copy_(torch.randn(c, generator=gen))
        module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    session = kernel_client.create_session_from_module(module)
    for step, (offset, scale) in enumerate([(0.0, 1.0), (3.0, 0.5), (-2.0, 4.0)]):
        x = torch.randn(shape, generator=gen) * scale + offset
        expected = module.train()(x)
        torch.testing.assert_close(session.forward(x, train=True), expected, msg=f"step {step}")
        for key, value in module.state_dict().items():
            torch.testing.assert_close(session.state_dict()[key], value, msg=f"{key} after step {step}")
    x = torch.randn(shape, generator=gen)
    torch.testing.assert_close(session.forward(x, train=False), module.eval()(x))
    session.delete()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_stay_bit_identical_to_pytorch_over_many_steps(kernel_client, momentum):
    """The running-statistics update rounds as libtorch's does (float momentum,
    float mean update, float unbiased variance added in double): the same batch
    trained 1,500 times leaves exactly PyTorch's buffers, not ones drifting an
    ulp per step (with momentum=None a double-precision update was 3.7e-5 off
    after 20,000 steps)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 5, generator=gen) * 2 + 1
    module = torch.nn.BatchNorm1d(3, momentum=momentum)
    session = kernel_client.create_session_from_module(module)
    for step in range(1, 1501):
        session.forward(x, train=True)
        with torch.no_grad():
            module(x)
        if step % 250 == 0 or step <= 3:
            state = session.state_dict()
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(state[key], module.state_dict()[key]), (
                    f"{key} after {step} steps: {state[key].tolist()} != {module.state_dict()[key].tolist()}")
    session.delete()


@pytest.mark.parametrize("shape", [(7, 5, 3), (4, 3, 6, 6), (2, 4, 3, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_channels_whose_spread_is_tiny_against_their_mean_give_pytorchs_output(kernel_client, shape):
    """A channel of values 100 +- 1e-3 in float32 normalizes to numbers that
    are mostly rounding (x * alpha and beta are ~3e4 and cancel): torch's own
    error there is ~1e-3, and a kernel that rounds the variance or the
    multiply-add differently from libtorch lands ~1e-3 away from it. Both
    kernels must give PyTorch's numbers, not only its tolerance."""
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    spread = torch.tensor([1.0, 1e3, 1e-3, 1e6] + [1.0] * (c - 4))[:c].view(1, c, *[1] * (len(shape) - 2))
    module = MODULES[len(shape)](c)
    session = kernel_client.create_session_from_module(module)
    for step in range(3):
        x = torch.randn(shape, generator=gen) * spread + 100
        with torch.no_grad():
            expected = module.train()(x)
        assert torch.equal(session.forward(x, train=True), expected), f"step {step}"
    session.delete()
