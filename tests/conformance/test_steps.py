"""Synchronized steps: the ranks of a step (threads, each with its own gRPC
call) send their shards; the oracle is one torch.nn.BatchNorm*d in train mode
run on torch.cat of the shards in rank order — every rank's output slice, the
global statistics, the running statistics, num_batches_tracked and the
version (one per step). Failures are atomic (ABORTED naming the missing or
invalid rank, nothing applied), retries of an applied step are answered
again, an older step is FAILED_PRECONDITION, kill -9 during a barrier leaves
no partial step, and ReduceStatistics matches the same oracle."""

import contextlib
import math
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from normserve.v1 import batch_norm_pb2 as bn, batch_norm_pb2_grpc

import wire
from conftest import ServerProcess, free_port
from sessions import KINDS, get

TRAIN = bn.MODE_TRAIN
_names = iter(range(1_000_000))


def new_id(prefix="steps"):
    return f"{prefix}-{next(_names)}"


def create(stub, kind, module, step_timeout=None, dtype=torch.float32):
    """A session with `module`'s configuration and state (made through the raw
    CreateSession request, which carries step_timeout_seconds)."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    fields = dict(
        session_id=new_id(),
        kind=KINDS[kind][0],
        num_features=module.num_features,
        eps=module.eps,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        param_dtype=wire.DTYPES[dtype],
    )
    if module.momentum is None:
        fields["cumulative_average"] = True
    else:
        fields["momentum"] = module.momentum
    if module.affine:
        fields["weight"] = wire.to_proto(state["weight"].to(dtype))
        fields["bias"] = wire.to_proto(state["bias"].to(dtype))
    if step_timeout is not None:
        fields["step_timeout_seconds"] = step_timeout
    return stub.CreateSession(bn.CreateSessionRequest(**fields)).session


def step_request(session_id, x, step, world_size, rank, **fields):
    return bn.ForwardRequest(
        session_id=session_id, input=wire.to_proto(x), mode=TRAIN,
        step=bn.StepSpec(step=step, world_size=world_size, rank=rank), **fields)


def run_ranks(stub, requests, timeout=60, method="Forward"):
    """Sends the requests concurrently (one thread each); returns each one's
    reply or grpc.RpcError, in the requests' order."""
    call = getattr(stub, method)

    def one(request):
        try:
            return call(request, timeout=timeout)
        except grpc.RpcError as error:
            return error

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


def assert_step_matches(replies, shards, module, step):
    """Each rank's reply is its slice of module(torch.cat(shards)); the step's
    statistics are the concatenation's."""
    x = torch.cat(shards)
    with torch.no_grad():
        expected = module(x)
    at = 0
    for reply, shard in zip(replies, shards):
        assert not isinstance(reply, grpc.RpcError), reply
        torch.testing.assert_close(wire.from_proto(reply.output), expected[at:at + shard.shape[0]])
        at += shard.shape[0]
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    stats = replies[0].step_statistics
    assert stats.step == step
    assert stats.count == x.numel() // x.shape[1]
    torch.testing.assert_close(torch.tensor(list(stats.mean), dtype=torch.float64), x64.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(list(stats.var), dtype=torch.float64), x64.var(dims, unbiased=False), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(list(stats.unbiased_var), dtype=torch.float64), x64.var(dims, unbiased=True), rtol=1e-10, atol=1e-12)
    for reply in replies:
        assert reply.step_statistics == stats
        assert reply.version == replies[0].version and not reply.replayed


def assert_state(stub, session_id, module, version):
    session = get(stub, session_id)
    assert session.version == version
    state = module.state_dict()
    if module.track_running_stats:
        torch.testing.assert_close(wire.from_proto(session.running_mean), state["running_mean"])
        torch.testing.assert_close(wire.from_proto(session.running_var), state["running_var"])
        assert session.num_batches_tracked == int(state["num_batches_tracked"])


SHAPES = {"1d": (5,), "2d": (5, 3, 2), "3d": (3, 2, 2, 2)}


@pytest.mark.parametrize("kind,spatial,sizes,make", [
    ("1d", (), [2, 0, 3], lambda c: torch.nn.BatchNorm1d(c)),
    ("1d", (4,), [1, 1, 1, 2], lambda c: torch.nn.BatchNorm1d(c, momentum=None)),
    ("2d", (3, 2), [2, 3, 0], lambda c: torch.nn.BatchNorm2d(c, momentum=0.3)),
    ("3d", (2, 2, 2), [1, 2], lambda c: torch.nn.BatchNorm3d(c, affine=False)),
    ("2d", (2, 2), [2, 2], lambda c: torch.nn.BatchNorm2d(c, track_running_stats=False)),
])
def test_every_rank_gets_its_slice_of_batchnorm_on_the_concatenated_shards(bn_stub, kind, spatial, sizes, make):
    torch.manual_seed(len(sizes) * 31 + len(spatial))
    channels = 3
    module = make(channels)
    if module.affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 2.0)
            module.bias.uniform_(-1.0, 1.0)
    module.train()
    session = create(bn_stub, kind, module)
    version = session.version
    for step in [3, 4, 10]:
        shards = [torch.randn(n, channels, *spatial) * 3 + 1 for n in sizes]
        # Ranks sent in reverse order: the result follows rank order anyway.
        requests = [step_request(session.session_id, shard, step, len(sizes), rank) for rank, shard in enumerate(shards)]
        replies = run_ranks(bn_stub, requests[::-1])[::-1]
        assert_step_matches(replies, shards, module, step)
        version += 1
        assert replies[0].version == version
        assert replies[0].num_batches_tracked == int(module.num_batches_tracked or 0) if module.track_running_stats else True
        assert_state(bn_stub, session.session_id, module, version)


def test_the_one_value_per_channel_check_applies_to_the_global_batch(bn_stub):
    module = torch.nn.BatchNorm1d(2)
    session = create(bn_stub, "1d", module)
    # One sample per rank is fine when there are two ranks...
    shards = [torch.randn(1, 2), torch.randn(1, 2)]
    replies = run_ranks(bn_stub, [step_request(session.session_id, s, 1, 2, r) for r, s in enumerate(shards)])
    assert_step_matches(replies, shards, module.train(), 1)
    # ...but one value in the whole step is refused, as PyTorch refuses it.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as torch_error:
        module(torch.cat([torch.randn(1, 2), torch.randn(0, 2)]))
    replies = run_ranks(bn_stub, [step_request(session.session_id, torch.randn(1, 2), 2, 2, 0),
                                  step_request(session.session_id, torch.randn(0, 2), 2, 2, 1)])
    for reply in replies:
        assert reply.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Expected more than 1 value per channel when training" in reply.details()
    assert str(torch_error.value).split(",")[0] in replies[0].details()
    assert get(bn_stub, session.session_id).version == session.version + 1


def test_an_eval_forward_with_a_step_needs_no_barrier(bn_stub):
    module = torch.nn.BatchNorm2d(3)
    session = create(bn_stub, "2d", module)
    x = torch.randn(2, 3, 2, 2)
    reply = bn_stub.Forward(bn.ForwardRequest(
        session_id=session.session_id, input=wire.to_proto(x), mode=bn.MODE_EVAL,
        step=bn.StepSpec(step=1, world_size=4, rank=2)), timeout=10)
    with torch.no_grad():
        torch.testing.assert_close(wire.from_proto(reply.output), module.eval()(x))
    assert reply.version == session.version and not reply.HasField("step_statistics")


def test_retries_of_an_applied_step_are_answered_again_and_older_steps_refused(bn_stub):
    module = torch.nn.BatchNorm1d(4).train()
    session = create(bn_stub, "1d", module)
    shards = [torch.randn(3, 4), torch.randn(2, 4)]
    requests = [step_request(session.session_id, s, 7, 2, r) for r, s in enumerate(shards)]
    first = run_ranks(bn_stub, requests)
    assert_step_matches(first, shards, module, 7)
    again = bn_stub.Forward(requests[1], timeout=10)
    assert again.replayed and again.version == first[1].version
    assert torch.equal(wire.from_proto(again.output), wire.from_proto(first[1].output))
    assert again.step_statistics == first[1].step_statistics
    with pytest.raises(grpc.RpcError) as older:
        bn_stub.Forward(step_request(session.session_id, shards[0], 6, 2, 0), timeout=10)
    assert older.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "last applied step 7" in older.value.details()
    assert_state(bn_stub, session.session_id, module, first[0].version)


def test_a_missing_rank_aborts_every_waiting_rank_and_nothing_is_applied(bn_stub):
    module = torch.nn.BatchNorm1d(3).train()
    session = create(bn_stub, "1d", module, step_timeout=0.5)
    shards = [torch.randn(2, 3) for _ in range(4)]
    replies = run_ranks(bn_stub, [step_request(session.session_id, shards[r], 1, 4, r) for r in (0, 2)])
    for reply in replies:
        assert reply.code() == grpc.StatusCode.ABORTED, reply
        assert "ranks 1, 3" in reply.details() and "nothing was applied" in reply.details()
    assert get(bn_stub, session.session_id).version == session.version
    # The step, sent again by every rank, completes.
    requests = [step_request(session.session_id, s, 1, 4, r) for r, s in enumerate(shards)]
    replies = run_ranks(bn_stub, requests)
    assert_step_matches(replies, shards, module, 1)
    assert_state(bn_stub, session.session_id, module, session.version + 1)


def test_an_invalid_shard_is_invalid_argument_and_the_others_are_aborted_naming_it(bn_stub):
    module = torch.nn.BatchNorm2d(3).train()
    session = create(bn_stub, "2d", module, step_timeout=30)
    good = [step_request(session.session_id, torch.randn(2, 3, 2, 2), 1, 3, r) for r in (0, 2)]
    bad = step_request(session.session_id, torch.randn(2, 4, 2, 2), 1, 3, 1)
    replies = run_ranks(bn_stub, [good[0], bad, good[1]])
    assert replies[1].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "running_mean should contain 4 elements not 3" in replies[1].details()
    for reply in (replies[0], replies[2]):
        assert reply.code() == grpc.StatusCode.ABORTED, reply
        assert "rank 1 sent an invalid request" in reply.details()
    assert get(bn_stub, session.session_id).version == session.version


@pytest.mark.parametrize("case,expected", [
    (dict(world_size=2, rank=2), "rank 2 is not below world_size 2"),
    (dict(world_size=3, rank=1), "world_size 3 differs from the step's 2"),
])
def test_a_wrong_rank_or_world_size_fails_the_step_for_the_others(bn_stub, case, expected):
    session = create(bn_stub, "1d", torch.nn.BatchNorm1d(2), step_timeout=30)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(run_ranks, bn_stub, [step_request(session.session_id, torch.randn(2, 2), 1, 2, 0)])
        bad = step_request(session.session_id, torch.randn(2, 2), 1, case["world_size"], case["rank"])
        # The bad rank may reach the server before or after rank 0: either
        # way rank 0 hears of it (told on arrival, or while waiting).
        with pytest.raises(grpc.RpcError) as refused:
            bn_stub.Forward(bad, timeout=10)
        [reply] = waiting.result()
        refused = refused.value
    if case["rank"] < case["world_size"] and refused.code() == grpc.StatusCode.ABORTED:
        # Two world sizes: the rank that arrived second is the odd one out.
        refused, reply = reply, refused
        expected = "world_size 2 differs from the step's 3"
        case = dict(rank=0)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in refused.details()
    assert reply.code() == grpc.StatusCode.ABORTED
    assert f"rank {case['rank']} sent an invalid request" in reply.details()
    assert get(bn_stub, session.session_id).version == session.version


def metric(metrics_port, name):
    """The sum of a metric's samples on the server's /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def finished_requests(metrics_port):
    """The server's count of gRPC requests it has finished (any status)."""
    return metric(metrics_port, "normserve_requests_total")


def await_finished(metrics_port, count):
    """Waits until the server has finished `count` requests: a request it
    has finished has left any barrier it waited at (the waiter is dropped
    with the request). The client's own deadline or cancel says nothing of
    when the server notices, and a rank sent before that would complete the
    step with the departed rank's shard."""
    deadline = time.monotonic() + 30
    while finished_requests(metrics_port) < count:
        assert time.monotonic() < deadline, "the server never finished the abandoned request"
        time.sleep(0.01)


@contextlib.contextmanager
def metered_server():
    """A server of its own with its /metrics, for tests that must know when
    a request has reached it or left it: (stub, metrics port)."""
    metrics_port = free_port()
    server = ServerProcess("--metrics-addr", f"127.0.0.1:{metrics_port}")
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield batch_norm_pb2_grpc.BatchNormServiceStub(channel), metrics_port
    finally:
        assert server.stop() == 0


def await_at_server(metrics_port, future):
    """Waits until the server holds a request (the one `future` sent)."""
    deadline = time.monotonic() + 30
    while metric(metrics_port, "normserve_inflight_requests") < 1:
        assert time.monotonic() < deadline and not future.done()
        time.sleep(0.01)


def test_a_client_that_goes_away_while_waiting_counts_as_missing():
    with metered_server() as (stub, metrics_port):
        module = torch.nn.BatchNorm1d(2).train()
        session = create(stub, "1d", module, step_timeout=1.0)
        shards = [torch.randn(2, 2), torch.randn(3, 2)]
        requests = [step_request(session.session_id, s, 1, 2, r) for r, s in enumerate(shards)]
        # Rank 0 gives up (its own deadline) before rank 1 arrives: without the
        # withdrawal rank 1 would complete the step with rank 0's shard.
        done = finished_requests(metrics_port)
        with pytest.raises(grpc.RpcError) as gone:
            stub.Forward(requests[0], timeout=0.3)
        assert gone.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        await_finished(metrics_port, done + 1)
        [reply] = run_ranks(stub, [requests[1]])
        assert reply.code() == grpc.StatusCode.ABORTED
        assert "rank 0" in reply.details()
        assert get(stub, session.session_id).version == session.version
        # The same with a caller that cancels.
        done = finished_requests(metrics_port)
        future = stub.Forward.future(requests[0], timeout=30)
        await_at_server(metrics_port, future)  # rank 0 is at the server
        future.cancel()
        await_finished(metrics_port, done + 1)
        [reply] = run_ranks(stub, [requests[1]])
        assert reply.code() == grpc.StatusCode.ABORTED and "rank 0" in reply.details()
        replies = run_ranks(stub, requests)
        assert_step_matches(replies, shards, module, 1)


def stats_request(session_id, shard, step, world_size, rank, update=True):
    dims = [0] + list(range(2, shard.dim()))
    x = shard.double()
    count = shard.numel() // shard.shape[1]
    mean = x.mean(dims) if count else torch.zeros(shard.shape[1], dtype=torch.float64)
    m2 = ((x - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
    return bn.ReduceStatisticsRequest(
        session_id=session_id, step=bn.StepSpec(step=step, world_size=world_size, rank=rank),
        phase=bn.REDUCE_PHASE_FORWARD, count=count, mean=mean.tolist(), m2=m2.tolist(),
        update_running_stats=update)


def test_reduce_statistics_gives_the_concatenations_statistics_and_updates_once(bn_stub):
    torch.manual_seed(5)
    module = torch.nn.BatchNorm2d(4, momentum=0.2).train()
    session = create(bn_stub, "2d", module)
    for step in (1, 2):
        shards = [torch.randn(n, 4, 3, 3) * 2 - 1 for n in (2, 0, 5)]
        replies = run_ranks(bn_stub, [stats_request(session.session_id, s, step, 3, r) for r, s in enumerate(shards)],
                            method="ReduceStatistics")
        x = torch.cat(shards)
        with torch.no_grad():
            module(x)
        x64 = x.double()
        for reply in replies:
            assert not isinstance(reply, grpc.RpcError), reply
            assert reply.statistics.count == 7 * 9
            torch.testing.assert_close(torch.tensor(list(reply.statistics.mean), dtype=torch.float64), x64.mean([0, 2, 3]), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(torch.tensor(list(reply.statistics.var), dtype=torch.float64), x64.var([0, 2, 3], unbiased=False), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(torch.tensor(list(reply.statistics.unbiased_var), dtype=torch.float64), x64.var([0, 2, 3]), rtol=1e-10, atol=1e-12)
            assert reply.version == session.version + step
            assert reply.num_batches_tracked == step
        assert_state(bn_stub, session.session_id, module, session.version + step)
        # BACKWARD: the per-channel sums over all ranks.
        grads = [torch.randn_like(s) for s in shards]
        mean = x64.mean([0, 2, 3]).view(1, -1, 1, 1)
        requests = [bn.ReduceStatisticsRequest(
            session_id=session.session_id, step=bn.StepSpec(step=step, world_size=3, rank=r),
            phase=bn.REDUCE_PHASE_BACKWARD,
            sum_grad_output=g.double().sum([0, 2, 3]).tolist(),
            sum_grad_output_centered=(g.double() * (s.double() - mean)).sum([0, 2, 3]).tolist())
            for r, (s, g) in enumerate(zip(shards, grads))]
        replies = run_ranks(bn_stub, requests, method="ReduceStatistics")
        g, xc = torch.cat(grads).double(), x64 - mean
        for reply in replies:
            assert not isinstance(reply, grpc.RpcError), reply
            torch.testing.assert_close(torch.tensor(list(reply.sum_grad_output), dtype=torch.float64), g.sum([0, 2, 3]), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(torch.tensor(list(reply.sum_grad_output_centered), dtype=torch.float64), (g * xc).sum([0, 2, 3]), rtol=1e-12, atol=1e-12)
            assert reply.version == session.version + step  # no state change
        again = bn_stub.ReduceStatistics(requests[0], timeout=10)
        assert again.replayed and list(again.sum_grad_output) == list(replies[0].sum_grad_output)
    assert get(bn_stub, session.session_id).version == session.version + 2


def test_counts_that_add_up_past_int64_fail_the_step_and_apply_nothing(bn_stub):
    # Each count is a valid int64; their sum is not (Python's integers are
    # the oracle), so the step must fail rather than wrap into a negative count.
    int64_max = 2**63 - 1
    session = create(bn_stub, "1d", torch.nn.BatchNorm1d(3), step_timeout=30)
    for counts in ([int64_max, int64_max], [int64_max, 1], [2**62, 2**62]):
        assert sum(counts) > int64_max
        requests = [bn.ReduceStatisticsRequest(
            session_id=session.session_id, step=bn.StepSpec(step=1, world_size=2, rank=r),
            phase=bn.REDUCE_PHASE_FORWARD, count=count, mean=[1.0, 2.0, 3.0], m2=[1.0, 1.0, 1.0],
            update_running_stats=True) for r, count in enumerate(counts)]
        replies = run_ranks(bn_stub, requests, method="ReduceStatistics")
        for reply in replies:
            assert isinstance(reply, grpc.RpcError), reply
            assert reply.code() == grpc.StatusCode.INVALID_ARGUMENT, reply
            assert "add up to more than 9223372036854775807" in reply.details()
        assert get(bn_stub, session.session_id).version == session.version
    # The step, sent again with counts that fit, completes.
    module = torch.nn.BatchNorm1d(3).train()
    shards = [torch.randn(4, 3), torch.randn(2, 3)]
    replies = run_ranks(bn_stub, [stats_request(session.session_id, s, 1, 2, r) for r, s in enumerate(shards)],
                        method="ReduceStatistics")
    with torch.no_grad():
        module(torch.cat(shards))
    for reply in replies:
        assert not isinstance(reply, grpc.RpcError), reply
        assert reply.statistics.count == 6
    assert_state(bn_stub, session.session_id, module, session.version + 1)


def test_a_step_of_empty_shards_reports_torchs_statistics_of_an_empty_batch(bn_stub):
    module = torch.nn.BatchNorm1d(3).train()
    session = create(bn_stub, "1d", module)
    shards = [torch.empty(0, 3), torch.empty(0, 3)]
    replies = run_ranks(bn_stub, [stats_request(session.session_id, s, 1, 2, r) for r, s in enumerate(shards)],
                        method="ReduceStatistics")
    with torch.no_grad():
        module(torch.cat(shards))
    x = torch.cat(shards).double()
    # torch warns that an empty batch has no degrees of freedom, and says NaN.
    with pytest.warns(UserWarning, match="degrees of freedom"):
        expected = (x.mean(0), x.var(0, unbiased=False), x.var(0))
    for reply in replies:
        assert not isinstance(reply, grpc.RpcError), reply
        assert reply.statistics.count == 0
        got = [torch.tensor(list(values), dtype=torch.float64) for values in
               (reply.statistics.mean, reply.statistics.var, reply.statistics.unbiased_var)]
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert_state(bn_stub, session.session_id, module, session.version + 1)


def test_deleting_a_session_aborts_its_waiting_ranks_and_a_new_one_of_that_id_starts_clean():
    with metered_server() as (stub, metrics_port):
        session_id = new_id()
        fields = dict(session_id=session_id, kind=bn.BATCH_NORM_1D, num_features=3, step_timeout_seconds=60)
        for attempt in range(5):
            stub.CreateSession(bn.CreateSessionRequest(**fields), timeout=10)
            waiting = stub.Forward.future(step_request(session_id, torch.randn(2, 3), 1, 2, 0), timeout=30)
            await_at_server(metrics_port, waiting)  # rank 0 is at the server
            stub.DeleteSession(bn.DeleteSessionRequest(session_id=session_id), timeout=10)
            # Told now, not at its 60 s timeout (nor at its own 30 s deadline).
            error = waiting.exception()
            assert error is not None
            if error.code() == grpc.StatusCode.NOT_FOUND:
                continue  # deleted before rank 0 reached the barrier: again
            assert error.code() == grpc.StatusCode.ABORTED, error
            assert "was deleted while the step's ranks waited" in error.details()
            break
        else:
            pytest.fail("rank 0 never reached the barrier before the delete")
        # Created again under the id, with another configuration: the old
        # incarnation's step is not its step.
        module = torch.nn.BatchNorm1d(5).train()
        new = stub.CreateSession(bn.CreateSessionRequest(**dict(fields, num_features=5)), timeout=10).session
        shards = [torch.randn(3, 5), torch.randn(2, 5)]
        replies = run_ranks(stub, [step_request(session_id, s, 1, 2, r) for r, s in enumerate(shards)])
        assert_step_matches(replies, shards, module, 1)
        assert_state(stub, session_id, module, new.version + 1)


def crc32_twin(data, positions):
    """`data` with some of the given bits flipped so that its CRC-32 stays the
    same (CRC is linear over GF(2): a set of flips whose CRC differences XOR
    to zero leaves it unchanged), checked with zlib."""
    import zlib
    zero = zlib.crc32(bytes(len(data)))
    basis = {}
    for k, (byte, bit) in enumerate(positions):
        flip = bytearray(len(data))
        flip[byte] ^= 1 << bit
        vector, mask = zlib.crc32(bytes(flip)) ^ zero, 1 << k
        while vector:
            top = vector.bit_length() - 1
            if top not in basis:
                basis[top] = (vector, mask)
                break
            vector, mask = vector ^ basis[top][0], mask ^ basis[top][1]
        if vector == 0:
            twin = bytearray(data)
            for j, (b, bit) in enumerate(positions):
                if mask >> j & 1:
                    twin[b] ^= 1 << bit
            assert zlib.crc32(bytes(twin)) == zlib.crc32(data) and bytes(twin) != data
            return bytes(twin)
    raise AssertionError("no collision among these bits")


def test_a_rank_sent_twice_with_data_made_to_collide_in_crc32_is_still_refused(bn_stub):
    import struct
    channels = 8
    session = create(bn_stub, "1d", torch.nn.BatchNorm1d(channels), step_timeout=30)
    count, mean, m2 = 4, [float(c + 1) for c in range(channels)], [1.0] * channels
    # The request's values as one byte string (count, mean, m2, the flag);
    # only the low mantissa bytes of the means are flipped, so they stay finite.
    data = struct.pack(f"<q{channels}d{channels}d?", count, *mean, *m2, True)
    positions = [(8 + 8 * c + byte, bit) for c in range(channels) for byte in (0, 1) for bit in range(8)]
    twin = struct.unpack(f"<q{channels}d{channels}d?", crc32_twin(data, positions))
    twin_mean = list(twin[1:1 + channels])
    assert twin_mean != mean and all(math.isfinite(v) for v in twin_mean)

    def request(values):
        return bn.ReduceStatisticsRequest(
            session_id=session.session_id, step=bn.StepSpec(step=1, world_size=2, rank=0),
            phase=bn.REDUCE_PHASE_FORWARD, count=count, mean=values, m2=m2, update_running_stats=True)

    replies = run_ranks(bn_stub, [request(mean), request(twin_mean)], method="ReduceStatistics")
    codes = sorted(r.code().name for r in replies if isinstance(r, grpc.RpcError))
    assert codes == ["ABORTED", "INVALID_ARGUMENT"], replies
    for reply in replies:
        if reply.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert "rank 0 already arrived at step 1 with different data" in reply.details()
        else:
            assert "rank 0 sent an invalid request" in reply.details()
    assert get(bn_stub, session.session_id).version == session.version


def test_a_backward_reduction_needs_its_forward_first(bn_stub):
    session = create(bn_stub, "1d", torch.nn.BatchNorm1d(2))
    with pytest.raises(grpc.RpcError) as error:
        bn_stub.ReduceStatistics(bn.ReduceStatisticsRequest(
            session_id=session.session_id, step=bn.StepSpec(step=1, world_size=1, rank=0),
            phase=bn.REDUCE_PHASE_BACKWARD, sum_grad_output=[1, 2], sum_grad_output_centered=[3, 4]), timeout=10)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as error:
        bn_stub.ReduceStatistics(bn.ReduceStatisticsRequest(
            session_id=session.session_id, step=bn.StepSpec(step=1, world_size=1, rank=0),
            phase=bn.REDUCE_PHASE_FORWARD, count=3, mean=[0.0], m2=[1.0, 1.0]), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mean" in error.value.details()


def test_limits_are_resource_exhausted_or_invalid_argument():
    server = ServerProcess("--max-world-size", "4", "--max-open-steps", "1", "--max-step-waiting-bytes", "100")
    try:
        channel = grpc.insecure_channel(server.address)
        stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
        a = create(stub, "1d", torch.nn.BatchNorm1d(2), step_timeout=30)
        b = create(stub, "1d", torch.nn.BatchNorm1d(2), step_timeout=30)
        with pytest.raises(grpc.RpcError) as error:
            stub.Forward(step_request(a.session_id, torch.randn(2, 2), 1, 5, 0), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-world-size" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            stub.Forward(step_request(a.session_id, torch.randn(20, 2), 1, 2, 0), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-step-waiting-bytes" in error.value.details()
        a0 = step_request(a.session_id, torch.randn(2, 2), 1, 2, 0)
        waiting = None
        # Rank 0 of session b opens a second step: beyond --max-open-steps
        # once rank 0 of a waits. Retried until a's step is open (it is sent
        # concurrently; sent again if b's step held the one place first); a
        # refusal names the limit.
        for _ in range(200):
            if waiting is None or waiting.done():
                waiting = stub.Forward.future(a0, timeout=30)
            try:
                stub.Forward(step_request(b.session_id, torch.randn(2, 2), 1, 2, 0), timeout=0.2)
            except grpc.RpcError as refused:
                if refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "--max-open-steps" in refused.details()
                    break
        else:
            pytest.fail("no RESOURCE_EXHAUSTED for a second open step")
        reply = stub.Forward(step_request(a.session_id, torch.randn(2, 2), 1, 2, 1), timeout=10)
        assert waiting.result().version == reply.version == a.version + 1
        channel.close()
    finally:
        server.stop()


def test_kill_9_during_a_barrier_applies_nothing_and_the_retried_step_completes():
    server = ServerProcess()
    data_dir = server.data_dir
    module = torch.nn.BatchNorm2d(3).train()
    channel = grpc.insecure_channel(server.address)
    stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
    session = create(stub, "2d", module, step_timeout=30)
    shards = [torch.randn(2, 3, 2, 2), torch.randn(3, 3, 2, 2)]
    requests = [step_request(session.session_id, s, 1, 2, r) for r, s in enumerate(shards)]
    waiting = stub.Forward.future(requests[0], timeout=30)
    server.kill9()
    with pytest.raises(grpc.RpcError):
        waiting.result()
    channel.close()
    restarted = ServerProcess(data_dir=data_dir)
    try:
        channel = grpc.insecure_channel(restarted.address)
        stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
        assert get(stub, session.session_id).version == session.version
        replies = run_ranks(stub, requests)
        assert_step_matches(replies, shards, module, 1)
        assert_state(stub, session.session_id, module, session.version + 1)
        # Once more after a restart: the step is remembered (a retry is a
        # replay without the output, which is not stored), step 0 is older.
        restarted.kill9()
        channel.close()
        again = ServerProcess(data_dir=data_dir)
        channel = grpc.insecure_channel(again.address)
        stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
        reply = stub.Forward(requests[1], timeout=10)
        assert reply.replayed and reply.version == session.version + 1
        with pytest.raises(grpc.RpcError) as older:
            stub.Forward(step_request(session.session_id, shards[0], 0, 2, 0), timeout=10)
        assert older.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "step 1" in older.value.details()
        assert_state(stub, session.session_id, module, session.version + 1)
        channel.close()
        again.stop()
    finally:
        restarted.stop()


def test_ranks_split_between_two_redis_replicas_make_one_step(redis_server):
    replicas = [ServerProcess("--store", redis_server.url) for _ in range(2)]
    channels = [grpc.insecure_channel(r.address) for r in replicas]
    try:
        stubs = [batch_norm_pb2_grpc.BatchNormServiceStub(c) for c in channels]
        module = torch.nn.BatchNorm2d(3, momentum=0.25).train()
        session = create(stubs[0], "2d", module, step_timeout=30)
        for step in (1, 2, 3):
            shards = [torch.randn(n, 3, 2, 2) for n in (2, 1, 0, 3)]
            requests = [step_request(session.session_id, s, step, 4, r) for r, s in enumerate(shards)]

            # Ranks 0 and 2 through replica 0, ranks 1 and 3 through replica 1.
            def send(rank):
                try:
                    return stubs[rank % 2].Forward(requests[rank], timeout=60)
                except grpc.RpcError as error:
                    return error

            with ThreadPoolExecutor(max_workers=4) as pool:
                replies = list(pool.map(send, range(4)))
            assert_step_matches(replies, shards, module, step)
            assert {r.version for r in replies} == {session.version + step}
            for stub in stubs:
                assert_state(stub, session.session_id, module, session.version + step)
        # A retry through the other replica is answered again, not applied.
        again = stubs[1].Forward(requests[0], timeout=10)
        assert again.replayed and again.version == session.version + 3
        # A rank missing: the ranks on both replicas are ABORTED naming it.
        quick = create(stubs[0], "1d", torch.nn.BatchNorm1d(2), step_timeout=0.5)
        with ThreadPoolExecutor(max_workers=2) as pool:
            replies = list(pool.map(
                lambda rank: run_ranks(stubs[rank], [step_request(quick.session_id, torch.randn(2, 2), 1, 3, rank)])[0],
                range(2)))
        for reply in replies:
            assert reply.code() == grpc.StatusCode.ABORTED, reply
            assert "rank 2 of world_size 3" in reply.details()
        assert get(stubs[1], quick.session_id).version == quick.version
    finally:
        for c in channels:
            c.close()
        for r in replicas:
            r.stop()


def reduce_stream(stub, requests):
    """One ReduceStatisticsStream carrying `requests`; its answers."""
    return list(stub.ReduceStatisticsStream(iter(requests), timeout=60))


def test_reduce_statistics_stream_gives_each_ranks_steps_the_concatenations_statistics(bn_stub):
    """One stream per rank, each carrying all its steps of two sessions (two
    layers) at once, with an invalid message in band; every answer as
    BatchNorm on the concatenation, in order, each step applied once."""
    torch.manual_seed(11)
    modules = {name: torch.nn.BatchNorm1d(3, momentum=0.3).train() for name in ("a", "b")}
    sessions = {name: create(bn_stub, "1d", module) for name, module in modules.items()}
    steps = (1, 2, 3)
    shards = {(name, step): [torch.randn(n, 3) * 3 + 1 for n in (4, 1, 0)]
              for name in modules for step in steps}
    per_rank = []
    for rank in range(3):
        messages = []
        for step in steps:
            for name in modules:
                messages.append(stats_request(sessions[name].session_id, shards[name, step][rank], step, 3, rank))
            if rank == 1 and step == 1:
                wrong = stats_request(sessions["a"].session_id, torch.randn(2, 4), 9, 3, rank)
                messages.append(wrong)
        per_rank.append(messages)
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda messages: reduce_stream(bn_stub, messages), per_rank))

    for name, module in modules.items():
        for step in steps:
            with torch.no_grad():
                module(torch.cat(shards[name, step]))
    for rank, (messages, replies) in enumerate(zip(per_rank, answers)):
        assert [reply.index for reply in replies] == list(range(len(messages)))
        for message, reply in zip(messages, replies):
            if len(message.mean) == 4:
                assert reply.WhichOneof("result") == "error"
                assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert "expected num_features = 3 values, got 4" in reply.error.message
                continue
            assert reply.WhichOneof("result") == "response", reply
            name = "a" if message.session_id == sessions["a"].session_id else "b"
            step = message.step.step
            x = torch.cat(shards[name, step]).double()
            stats = reply.response.statistics
            assert stats.step == step and stats.count == x.shape[0]
            torch.testing.assert_close(torch.tensor(list(stats.mean), dtype=torch.float64), x.mean(0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(torch.tensor(list(stats.var), dtype=torch.float64), x.var(0, unbiased=False), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(torch.tensor(list(stats.unbiased_var), dtype=torch.float64), x.var(0), rtol=1e-10, atol=1e-12)
            assert reply.response.version == sessions[name].version + step
            assert reply.response.num_batches_tracked == step
    for name, module in modules.items():
        assert_state(bn_stub, sessions[name].session_id, module, sessions[name].version + len(steps))


def test_a_reduce_statistics_stream_cancelled_while_waiting_counts_as_missing(bn_stub):
    """Rank 0's stream message waits in a three-rank step; rank 1 (300 ms
    deadlines) hears only rank 2 missing; once rank 0 cancels its stream,
    rank 1 hears ranks 0 and 2 missing, and nothing was applied."""
    session = create(bn_stub, "1d", torch.nn.BatchNorm1d(2), step_timeout=30)
    shard = torch.randn(3, 2)
    hold = threading.Event()

    def rank0_messages():
        yield stats_request(session.session_id, shard, 1, 3, 0)
        hold.wait(60)  # the stream stays open, its message waiting

    call = bn_stub.ReduceStatisticsStream(rank0_messages(), timeout=60)

    def rank1_hears():
        try:
            bn_stub.ReduceStatistics(stats_request(session.session_id, shard, 1, 3, 1), timeout=0.3)
        except grpc.RpcError as error:
            return error.details() or ""
        raise AssertionError("the step completed without rank 2")

    for _ in range(100):
        if "waited for rank 2;" in rank1_hears():
            break
    else:
        raise AssertionError("rank 0's message never arrived")
    call.cancel()
    hold.set()
    for _ in range(100):
        if "waited for ranks 0, 2;" in rank1_hears():
            break
    else:
        raise AssertionError("rank 0 never withdrew")
    assert get(bn_stub, session.session_id).version == session.version
