"""normserve.torch.SyncBatchNorm and convert_sync_batchnorm against PyTorch:
ranks (threads, or worker processes that know nothing of torch.distributed)
share a session, and every rank's outputs, input gradients, parameter
gradients and the running statistics are those of one nn.BatchNorm*d (and
one model) applied to the concatenation of all ranks' batches.

Per-rank parameter gradients are each rank's part, as in nn.SyncBatchNorm:
the oracle's gradient of the same parameter with grad_output kept on that
rank's rows only (torch.autograd.grad with a mask); they sum to the
gradient on the concatenated batch."""

import multiprocessing
import re
import threading
import time
import uuid

import normserve
import pytest
import torch
from torch import nn

import sync_workers
from conftest import ServerProcess
from normserve.torch import SyncBatchNorm, convert_sync_batchnorm

FLOAT64 = {"rtol": 1e-10, "atol": 1e-10}
TOLERANCE = {torch.float32: {}, torch.float64: FLOAT64}
LOCAL = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# Worker processes fork from a server that has imported torch once.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch"])


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:12]}"


def run_ranks(functions, timeout=120):
    """Runs one callable per rank in threads; their results in rank order
    (the first exception is raised)."""
    results = [None] * len(functions)
    failures = []

    def run(rank):
        try:
            results[rank] = functions[rank]()
        except BaseException as error:  # noqa: BLE001 - raised below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a rank did not finish"
    if failures:
        raise failures[0]
    return results


def rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def masked(tensor, sizes, rank):
    mask = torch.zeros_like(tensor)
    mask[rows(sizes, rank)] = 1
    return tensor * mask


def oracle_layer_step(local, xs, grad_outputs):
    """nn.BatchNorm on torch.cat(xs): (output, input grad, per-rank
    [(weight grad, bias grad)] or None without affine)."""
    sizes = [len(x) for x in xs]
    x = torch.cat(xs).requires_grad_(True)
    output = local(x)
    grad_output = torch.cat(grad_outputs)
    (grad_input,) = torch.autograd.grad(output, x, grad_output, retain_graph=True)
    per_rank = None
    if local.affine:
        per_rank = [torch.autograd.grad(output, [local.weight, local.bias], masked(grad_output, sizes, rank),
                                        retain_graph=True) for rank in range(len(xs))]
    return output.detach(), grad_input, per_rank


def check_layer_steps(client, shape, affine, dtype, device):
    """Three ranks, two train steps (shards of different sizes, one of them
    empty), then eval, against one nn.BatchNorm*d on the concatenation."""
    world_size, channels, n = 3, shape[1], shape[0]
    session_id = unique("sbn")
    generator = torch.Generator().manual_seed(hash((shape, affine)) % 1000)
    local = LOCAL[len(shape)](channels, momentum=0.25, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            local.weight.copy_(torch.rand(channels, generator=generator, dtype=dtype) + 0.5)
            local.bias.copy_(torch.randn(channels, generator=generator, dtype=dtype))
    modules = [SyncBatchNorm(client, session_id, channels, world_size, rank, momentum=0.25, affine=affine,
                             dtype=dtype, device=device) for rank in range(world_size)]
    for module in modules:
        if affine:
            with torch.no_grad():
                module.weight.copy_(local.weight)
                module.bias.copy_(local.bias)
    tol = TOLERANCE[dtype]

    for step, sizes in enumerate([[n, n + 1, 1], [n, 0, 2]], start=1):
        xs = [torch.randn((size, *shape[1:]), generator=generator, dtype=dtype) * 2 + 1 for size in sizes]
        grad_outputs = [torch.randn((size, *shape[1:]), generator=generator, dtype=dtype) for size in sizes]

        def rank_step(rank):
            module = modules[rank]
            module.zero_grad()
            x = xs[rank].to(device).requires_grad_(True)
            output = module(x)
            assert output.device == x.device and output.dtype == dtype
            output.backward(grad_outputs[rank].to(device))
            grads = (module.weight.grad.cpu(), module.bias.grad.cpu()) if affine else None
            return output.detach().cpu(), x.grad.cpu(), grads

        results = run_ranks([lambda rank=rank: rank_step(rank) for rank in range(world_size)])
        expected_output, expected_grad_input, expected_grads = oracle_layer_step(local, xs, grad_outputs)
        for rank, (output, grad_input, grads) in enumerate(results):
            torch.testing.assert_close(output, expected_output[rows(sizes, rank)], **tol)
            torch.testing.assert_close(grad_input, expected_grad_input[rows(sizes, rank)], **tol)
            if affine:
                torch.testing.assert_close(grads[0], expected_grads[rank][0], **tol)
                torch.testing.assert_close(grads[1], expected_grads[rank][1], **tol)
        assert [module.step for module in modules] == [step] * world_size

    for module in modules:
        torch.testing.assert_close(module.running_mean, local.running_mean, **tol)
        torch.testing.assert_close(module.running_var, local.running_var, **tol)
        assert int(module.num_batches_tracked) == 2
    probe = torch.randn((n, *shape[1:]), generator=generator, dtype=dtype)
    local.eval()
    with torch.no_grad():
        expected = local(probe)
        for module in modules:
            torch.testing.assert_close(module.eval()(probe.to(device)).cpu(), expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 4, 3), (2, 2, 3, 2, 3)],
                         ids=["2d_input", "3d_input", "4d_input", "5d_input"])
def test_train_steps_match_batch_norm_on_the_concatenated_batch(client, shape, affine, dtype):
    check_layer_steps(client, shape, affine, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cuda_tensors_match_batch_norm_on_the_concatenated_batch(client, dtype):
    if not torch.cuda.is_available():
        print("skipped: CUDA is not available to this PyTorch")
        pytest.skip("CUDA is not available to this PyTorch")
    check_layer_steps(client, (3, 4, 5, 2), True, dtype, "cuda")


class Workers:
    """Worker processes, one per rank, each with a pipe to this process."""

    def __init__(self, target, args_per_rank):
        self.conns, self.procs = [], []
        for args in args_per_rank:
            ours, theirs = _CONTEXT.Pipe()
            proc = _CONTEXT.Process(target=target, args=(theirs, *args), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    def recv(self, rank, timeout=120):
        conn = self.conns[rank]
        if not conn.poll(timeout):
            raise AssertionError(f"rank {rank} sent nothing for {timeout} s")
        try:
            message = conn.recv()
        except EOFError:
            raise AssertionError(f"rank {rank} exited with {self.procs[rank].exitcode}") from None
        if message[0] == "error":
            raise AssertionError(f"rank {rank} failed:\n{message[1]}")
        return message

    def send(self, rank, message):
        self.conns[rank].send(message)

    def kill(self, rank):
        self.procs[rank].kill()
        self.procs[rank].join()

    def close(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for conn in self.conns:
            conn.close()


def oracle_model_step(model, xs, targets):
    """One step of the model on torch.cat(xs), loss sum(output * target):
    (output, input grad, per rank {parameter name: that rank's part of its
    gradient}); leaves the full gradients in .grad."""
    sizes = [len(x) for x in xs]
    x = torch.cat(xs).requires_grad_(True)
    outputs = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, module in model.named_modules() if list(module.parameters(recurse=False))]
    output = model(x)
    for hook in hooks:
        hook.remove()
    loss = (output * torch.cat(targets)).sum()
    names = list(outputs)
    grad_input, *grad_outputs = torch.autograd.grad(loss, [x, *(outputs[name] for name in names)],
                                                    retain_graph=True)
    per_rank = []
    for rank in range(len(xs)):
        grads = {}
        for name, grad_output in zip(names, grad_outputs):
            parameters = dict(model.get_submodule(name).named_parameters(recurse=False))
            values = torch.autograd.grad(outputs[name], list(parameters.values()),
                                         masked(grad_output, sizes, rank), retain_graph=True)
            grads.update({f"{name}.{key}": value for key, value in zip(parameters, values)})
        per_rank.append(grads)
    loss.backward()
    return output.detach(), grad_input, per_rank


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_conv_net_trained_by_worker_processes_matches_one_process_on_the_concatenated_batches(
        server, world_size):
    seed, steps, prefix = 11, 3, unique("convnet")
    oracle = sync_workers.conv_net(seed)
    workers = Workers(sync_workers.train_conv_net,
                      [(server.address, prefix, world_size, rank, steps, seed) for rank in range(world_size)])
    try:
        for step in range(1, steps + 1):
            batches = [sync_workers.conv_batch(seed, step, rank) for rank in range(world_size)]
            sizes = [len(x) for x, _ in batches]
            expected_output, expected_grad_input, expected_grads = oracle_model_step(
                oracle, [x for x, _ in batches], [t for _, t in batches])
            replies = [sync_workers.unpack(workers.recv(rank)[1]) for rank in range(world_size)]
            for rank, (output, grad_input, grads) in enumerate(replies):
                torch.testing.assert_close(output, expected_output[rows(sizes, rank)], **FLOAT64)
                torch.testing.assert_close(grad_input, expected_grad_input[rows(sizes, rank)], **FLOAT64)
                assert grads.keys() == dict(oracle.named_parameters()).keys()
                for name, grad in grads.items():
                    torch.testing.assert_close(grad, expected_grads[rank][name], **FLOAT64, msg=name)
            # The gradients' sum, as DDP's all-reduce gives every rank.
            summed = {name: sum(reply[2][name] for reply in replies) for name in replies[0][2]}
            for name, parameter in oracle.named_parameters():
                torch.testing.assert_close(summed[name], parameter.grad, **FLOAT64, msg=name)
            for rank in range(world_size):
                workers.send(rank, sync_workers.pack(summed))
            sync_workers.sgd_step(oracle, {name: p.grad for name, p in oracle.named_parameters()})
        oracle.eval()
        with torch.no_grad():
            expected_probe = oracle(sync_workers.conv_probe(seed))
        expected_state = oracle.state_dict()
        for rank in range(world_size):
            probe_output, state = sync_workers.unpack(workers.recv(rank)[1])
            torch.testing.assert_close(probe_output, expected_probe, **FLOAT64)
            assert list(state) == list(expected_state)
            for key, value in expected_state.items():
                torch.testing.assert_close(state[key], value, **FLOAT64, msg=key)
        assert int(expected_state["1.num_batches_tracked"]) == steps
    finally:
        workers.close()


def test_a_worker_killed_mid_step_aborts_the_others_and_the_retried_step_completes(client, server):
    session_id, world_size, timeout = unique("killed"), 2, 5.0
    local = nn.BatchNorm1d(3, momentum=0.2, dtype=torch.float64)
    with torch.no_grad():
        local.weight.copy_(sync_workers.layer_parameters()[0])
        local.bias.copy_(sync_workers.layer_parameters()[1])
    ours = sync_workers.sync_layer(client, session_id, world_size, 0, timeout)

    def expect_step(step, theirs):
        """Rank 0 (here) and rank 1's reply for `step` against the oracle."""
        batches = [sync_workers.layer_batch(step, rank) for rank in range(world_size)]
        output, grad_input, grads = oracle_layer_step(local, [x for x, _ in batches], [g for _, g in batches])
        sizes = [len(x) for x, _ in batches]
        for rank, result in enumerate([sync_workers.layer_step(ours, step, 0), sync_workers.unpack(theirs()[1])]):
            torch.testing.assert_close(result[0], output[rows(sizes, rank)], **FLOAT64)
            torch.testing.assert_close(result[1], grad_input[rows(sizes, rank)], **FLOAT64)
            torch.testing.assert_close(result[2], grads[rank][0], **FLOAT64)
            torch.testing.assert_close(result[3], grads[rank][1], **FLOAT64)

    def session_state():
        info = client.get_session(session_id).info()
        return info.version, info.num_batches_tracked, info.state_dict()

    def assert_state_is_the_oracles(steps_applied):
        _, num_batches_tracked, state = session_state()
        assert num_batches_tracked == steps_applied
        torch.testing.assert_close(state["running_mean"], local.running_mean, **FLOAT64)
        torch.testing.assert_close(state["running_var"], local.running_var, **FLOAT64)

    def start_rank_1(completed_steps):
        return Workers(sync_workers.run_layer,
                       [(server.address, session_id, world_size, 1, completed_steps, timeout)])

    first = start_rank_1(0)
    second = third = None
    try:
        # Step 1, both ranks.
        first.send(0, ("step", 1))
        expect_step(1, lambda: first.recv(0))
        assert_state_is_the_oracles(1)
        before = session_state()

        # Step 2: rank 1 dies on its way into the forward's barrier; rank 0
        # is refused (ABORTED naming rank 1) and nothing is applied.
        first.send(0, ("announce", 2))
        assert first.recv(0) == ("calling",)
        first.kill(0)
        x, _ = sync_workers.layer_batch(2, 0)
        with pytest.raises(normserve.Aborted) as aborted:
            ours(x)
        assert re.search(r"\b1\b", aborted.value.details), aborted.value.details
        assert ours.step == 1
        after = session_state()
        assert after[:2] == before[:2]
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(after[2][key], before[2][key], rtol=0, atol=0)

        # A new rank 1 resumes after step 1; step 2 completes, applied once.
        second = start_rank_1(1)
        second.send(0, ("step", 2))
        expect_step(2, lambda: second.recv(0))
        assert_state_is_the_oracles(2)
        second.close()

        # Step 3: rank 1 dies after the forward's barrier, before the
        # backward's; rank 0's backward is refused and its step stays at 2.
        third_dying = start_rank_1(2)
        third_dying.send(0, ("forward only", 3))
        x, grad_output = sync_workers.layer_batch(3, 0)
        output = ours(x.requires_grad_(True))
        assert third_dying.recv(0) == ("forward done",)
        third_dying.kill(0)
        third_dying.close()
        with pytest.raises(normserve.Aborted) as aborted:
            output.backward(grad_output)
        assert re.search(r"\b1\b", aborted.value.details), aborted.value.details
        assert ours.step == 2
        # Both ranks redo step 3: the forward, already applied, is answered
        # from the server's record, and the running statistics moved once.
        third = start_rank_1(2)
        third.send(0, ("step", 3))
        expect_step(3, lambda: third.recv(0))
        assert_state_is_the_oracles(3)
    finally:
        for workers in (first, second, third):
            if workers is not None:
                workers.close()


def test_ranks_split_across_two_redis_replicas_share_one_step(redis_server):
    replicas = [ServerProcess("--store", redis_server.url) for _ in range(2)]
    clients = [normserve.connect(replica.address, timeout=60) for replica in replicas]
    try:
        world_size, session_id = 4, unique("replicas")
        generator = torch.Generator().manual_seed(3)
        local = nn.BatchNorm2d(3, momentum=0.5, dtype=torch.float64)
        with torch.no_grad():
            local.weight.copy_(torch.rand(3, generator=generator, dtype=torch.float64) + 0.5)
        modules = [SyncBatchNorm(clients[rank % 2], session_id, 3, world_size, rank, momentum=0.5,
                                 dtype=torch.float64, step_timeout=20.0) for rank in range(world_size)]
        for module in modules:
            with torch.no_grad():
                module.weight.copy_(local.weight)
        for step in (1, 2):
            sizes = [2, 1, 3, 2]
            xs = [torch.randn(size, 3, 4, 5, generator=generator, dtype=torch.float64) * 3 for size in sizes]
            grad_outputs = [torch.randn_like(x) for x in xs]

            def rank_step(rank):
                x = xs[rank].clone().requires_grad_(True)
                modules[rank].zero_grad()
                output = modules[rank](x)
                output.backward(grad_outputs[rank])
                return output.detach(), x.grad, modules[rank].weight.grad.clone(), modules[rank].bias.grad.clone()

            results = run_ranks([lambda rank=rank: rank_step(rank) for rank in range(world_size)])
            output, grad_input, grads = oracle_layer_step(local, xs, grad_outputs)
            for rank, result in enumerate(results):
                torch.testing.assert_close(result[0], output[rows(sizes, rank)], **FLOAT64)
                torch.testing.assert_close(result[1], grad_input[rows(sizes, rank)], **FLOAT64)
                torch.testing.assert_close(result[2], grads[rank][0], **FLOAT64)
                torch.testing.assert_close(result[3], grads[rank][1], **FLOAT64)
        # One update per step, whichever replica the ranks reached.
        for replica_client in clients:
            info = replica_client.get_session(session_id).info()
            assert info.num_batches_tracked == 2
            state = info.state_dict()
            torch.testing.assert_close(state["running_mean"], local.running_mean, **FLOAT64)
            torch.testing.assert_close(state["running_var"], local.running_var, **FLOAT64)
    finally:
        for replica_client in clients:
            replica_client.close()
        for replica in replicas:
            replica.stop()


def model_with_batch_norms(sync):
    """Four batch norms (2d, nested, 1d without affine, one in eval mode);
    `sync`: the nested one is an nn.SyncBatchNorm (else an nn.BatchNorm2d)."""
    torch.manual_seed(21)
    nested = nn.SyncBatchNorm(4, momentum=None) if sync else nn.BatchNorm2d(4, momentum=None)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(2, 4, 1))
    model.add_module("bn", nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    model.add_module("block", nn.Sequential(nested, nn.ReLU()))
    model.add_module("frozen", nn.BatchNorm2d(4))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4 * 3 * 2, 3))
    model.add_module("head", nn.BatchNorm1d(3, affine=False))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)
                if module.affine:
                    module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(module.num_features, generator=generator))
    model.frozen.eval()
    return model


def test_convert_sync_batchnorm_swaps_every_batch_norm_and_trains_like_the_model_on_the_cat(client):
    world_size, prefix = 2, unique("converted")
    oracle = model_with_batch_norms(sync=False)
    models = [model_with_batch_norms(sync=True) for _ in range(world_size)]
    original_weights = [model.bn.weight for model in models]
    converted = [convert_sync_batchnorm(model, client, prefix, world_size, rank)
                 for rank, model in enumerate(models)]
    names = {"bn": "bn", "block.0": "block.0", "frozen": "frozen", "head": "head"}
    for rank, model in enumerate(converted):
        assert model is models[rank]
        for name, suffix in names.items():
            module = model.get_submodule(name)
            assert isinstance(module, SyncBatchNorm), name
            assert (module.session_id, module.world_size, module.rank) == (f"{prefix}.{suffix}", world_size, rank)
            assert module.training == oracle.get_submodule(name).training
        assert model.bn.weight is original_weights[rank]
        assert (model.bn.eps, model.bn.momentum, model.block[0].momentum) == (1e-3, 0.3, None)
        assert not model.head.affine and model.head.weight is None
        # The state, running statistics included, is the original's (read from the sessions once made).
        state = model.state_dict()
        assert list(state) == list(oracle.state_dict())
        for key, value in oracle.state_dict().items():
            torch.testing.assert_close(state[key], value, msg=key)

    generator = torch.Generator().manual_seed(8)
    sizes = [3, 2]
    xs = [torch.randn(size, 2, 3, 2, generator=generator) for size in sizes]
    targets = [torch.randn(size, 3, generator=generator) for size in sizes]

    def rank_step(rank):
        x = xs[rank].clone().requires_grad_(True)
        output = converted[rank](x)
        (output * targets[rank]).sum().backward()
        return output.detach(), x.grad, {name: p.grad for name, p in converted[rank].named_parameters()}

    results = run_ranks([lambda rank=rank: rank_step(rank) for rank in range(world_size)])
    output, grad_input, grads = oracle_model_step(oracle, xs, targets)
    for rank, (rank_output, rank_grad_input, rank_grads) in enumerate(results):
        torch.testing.assert_close(rank_output, output[rows(sizes, rank)])
        torch.testing.assert_close(rank_grad_input, grad_input[rows(sizes, rank)])
        for name, grad in rank_grads.items():
            torch.testing.assert_close(grad, grads[rank][name], msg=name)
    expected = oracle.state_dict()
    for model in converted:
        state = model.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, msg=key)
    assert int(expected["bn.num_batches_tracked"]) == 8 and int(expected["frozen.num_batches_tracked"]) == 7


def test_ranks_with_another_configuration_are_told_what_differs(client):
    session_id = unique("mismatch")
    first = SyncBatchNorm(client, session_id, 4, world_size=2, rank=0, momentum=0.1)
    first.ensure_session("2d")
    other = SyncBatchNorm(client, session_id, 4, world_size=3, rank=1, momentum=0.2, affine=False)
    with pytest.raises(normserve.AlreadyExists) as refused:
        other(torch.randn(2, 4, 3, 3))
    message = str(refused.value)
    assert "momentum=0.2" in message and "0.1" in message, message
    assert "world_size='3'" in message and "affine='false'" in message, message
    assert "num_features" not in message, message
    assert other.step == 0
    # The same configuration finds the session.
    same = SyncBatchNorm(client, session_id, 4, world_size=2, rank=1, momentum=0.1)
    assert same.ensure_session("2d").already_existed


def test_state_dicts_move_between_nn_batch_norm_and_sync_batchnorm(client):
    session_id = unique("state")
    generator = torch.Generator().manual_seed(4)

    def batch_norm_with_state(num_batches_tracked):
        local = nn.BatchNorm1d(3, momentum=None)
        with torch.no_grad():
            for tensor in (local.weight, local.bias, local.running_mean):
                tensor.copy_(torch.randn(3, generator=generator))
            local.running_var.copy_(torch.rand(3, generator=generator) + 0.5)
            local.num_batches_tracked.fill_(num_batches_tracked)
        return local.eval()

    first, second = batch_norm_with_state(4), batch_norm_with_state(9)
    module = SyncBatchNorm(client, session_id, 3, world_size=2, rank=0, momentum=None).eval()
    # Before the session exists: the loaded statistics are those it is created with.
    module.load_state_dict(first.state_dict())
    probe = torch.randn(5, 3, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(module(probe), first(probe))
    assert module.session is not None
    # Once it exists: loading writes the session, which every rank reads.
    module.load_state_dict(second.state_dict())
    other_rank = SyncBatchNorm(client, session_id, 3, world_size=2, rank=1, momentum=None)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(other_rank, key), getattr(second, key), msg=key)
    with torch.no_grad():
        torch.testing.assert_close(module(probe), second(probe))
    back = nn.BatchNorm1d(3, momentum=None)
    back.load_state_dict(module.state_dict())
    for key, value in second.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, msg=key)
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({"weight": torch.ones(3), "bias": torch.zeros(3)})


def test_each_ranks_steps_go_over_one_stream_shared_by_its_modules(channel):
    """A client without a per-call timeout sends every step of a rank (all its
    layers) over one ReduceStatisticsStream; the model still trains as the
    model on the concatenated batches."""
    from normserve import step_stream

    client = normserve.Client(channel)
    check_layer_steps(client, (4, 3), True, torch.float64, "cpu")
    assert all(step_stream.stream_open(client, rank) for rank in range(3))


def test_a_client_with_a_timeout_reduces_with_unary_calls(channel):
    """A per-call timeout keeps the unary ReduceStatistics (a stream could not
    bound each step's wait); the numbers are the same."""
    from normserve import step_stream

    client = normserve.Client(channel, timeout=60)
    check_layer_steps(client, (3, 2, 5), True, torch.float64, "cpu")
    assert not any(step_stream.stream_open(client, rank) for rank in range(3))


def test_a_stream_the_server_ended_for_idleness_is_reopened_for_the_next_step():
    """With --request-idle-timeout-seconds 1 the server ends a rank's stream
    after a pause between steps; the next step goes over a new stream and the
    numbers are still nn.BatchNorm's (one rank: the global batch is its own)."""
    from normserve import step_stream

    server = ServerProcess("--request-idle-timeout-seconds", "1")
    try:
        client = normserve.connect(server.address)
        local = nn.BatchNorm1d(3, dtype=torch.float64)
        module = SyncBatchNorm(client, unique("idle"), 3, 1, 0, dtype=torch.float64)
        generator = torch.Generator().manual_seed(3)
        for step in range(2):
            x = torch.randn(5, 3, generator=generator, dtype=torch.float64)
            torch.testing.assert_close(module(x), local(x), **FLOAT64)
            assert step_stream.stream_open(client, 0)
            if step == 0:
                # The server ends the idle stream (DEADLINE_EXCEEDED) within
                # about a second; wait until the client has seen it end.
                deadline = time.monotonic() + 30
                while step_stream.stream_open(client, 0):
                    assert time.monotonic() < deadline, "the idle stream was never ended"
                    time.sleep(0.05)
        torch.testing.assert_close(module.running_mean, local.running_mean, **FLOAT64)
        torch.testing.assert_close(module.running_var, local.running_var, **FLOAT64)
        client.close()
    finally:
        assert server.stop() == 0
