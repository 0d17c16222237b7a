"""Exact statistics (SessionConfig.exact_statistics), MergeSession and the
scikit-learn view: the stored running_mean/running_var are the correctly
rounded mean and unbiased variance of every value seen, computed here with
Python's exact integers and fractions.Fraction; the state is bitwise the same
whatever the batch cuts, their order, the number of worker processes, a
restart, the Redis replica, or a merge of partitions; exports load into
PyTorch; scikit-learn's StandardScaler given the session's attributes
transforms as the eval forward does."""

import asyncio
import math
import multiprocessing
import sys
from fractions import Fraction

import grpc
import numpy as np
import pytest
import sklearn.preprocessing
import torch

import normserve
import normserve.aio
from normserve.v1 import batch_norm_pb2 as bn

from conftest import CLIENT_DIR, ServerProcess

# ----------------------------------------------------------------- oracle


def values_of(batches):
    """Every value of each channel over (N, C, *) batches, as Python floats."""
    columns = None
    for batch in batches:
        array = np.asarray(batch, dtype=np.float64)
        per_channel = np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)
        if columns is None:
            columns = [[] for _ in range(per_channel.shape[0])]
        for c, row in enumerate(per_channel):
            columns[c].extend(float(v) for v in row)
    return columns


def exact_moments(values):
    """(n, sum of x, sum of x²) as exact Fractions (integer sums over each
    float's as_integer_ratio, scaled to a common power of two)."""
    s1 = s2 = 0
    for v in values:
        num, den = v.as_integer_ratio()  # den is a power of two <= 2^1074
        s1 += num * (2 ** 1074 // den)
        s2 += (num * num) * (2 ** 2148 // (den * den))
    return len(values), Fraction(s1, 2 ** 1074), Fraction(s2, 2 ** 2148)


def round_to(q, precision, min_exponent, max_exponent):
    """A Fraction rounded once to nearest-even in a binary format (float32:
    24, -126, 127), as the float64 holding that value."""
    if q == 0:
        return 0.0
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if q < Fraction(2) ** e:
        e -= 1
    ulp = max(e, min_exponent) - (precision - 1)
    significand = round(q / Fraction(2) ** ulp)  # Fraction rounds half to even
    if significand.bit_length() - 1 + ulp > max_exponent:
        return sign * float("inf")
    return sign * math.ldexp(float(significand), ulp)  # exact: significand < 2^53


def oracle(values, dtype):
    """(mean, unbiased var, population var) as the session must store them."""
    n, s1, s2 = exact_moments(values)
    mean, spread = s1 / n, n * s2 - s1 * s1
    unbiased = spread / (n * (n - 1))
    population = spread / (n * n)
    float64 = (53, -1022, 1023)
    precision = float64 if dtype == "float64" else (24, -126, 127)
    return round_to(mean, *precision), round_to(unbiased, *precision), round_to(population, *float64)


def assert_exact(info, batches, dtype):
    """The session's running statistics are the oracle's, bit for bit."""
    columns = values_of(batches)
    expected = [oracle(column, dtype) for column in columns]
    mean = np.asarray(info.running_mean, dtype=np.float64)
    var = np.asarray(info.running_var, dtype=np.float64)
    assert mean.tobytes() == np.array([e[0] for e in expected]).tobytes(), (mean, expected)
    assert var.tobytes() == np.array([e[1] for e in expected]).tobytes(), (var, expected)
    scaler = info.standard_scaler
    assert scaler.n_samples_seen == len(columns[0])
    assert scaler.var.tobytes() == np.array([e[2] for e in expected]).tobytes()


def unchanged(info):
    """What a refused request must leave as it was (not the last use)."""
    return info.version, info.num_batches_tracked, state_bits(info)


def state_bits(info):
    """What must be identical between two sessions that saw the same values."""
    return (np.asarray(info.running_mean).tobytes(), np.asarray(info.running_var).tobytes(),
            info.proto.standard_scaler.SerializeToString(deterministic=True))


def exact_keys(session):
    """The exported exact.* tensors (the sums themselves)."""
    state = __import__("safetensors.torch").torch.load(session.export_state().safetensors)
    return {k: v for k, v in state.items() if k.startswith("exact.")}


def wide_batches(seed, count, rows, channels, dtype=np.float64, spatial=()):
    """Batches whose values span many magnitudes (so that any floating-point
    accumulation would depend on the order), some exactly cancelling."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        shape = (rows, channels, *spatial)
        magnitude = 10.0 ** rng.uniform(-8, 12, size=shape)
        batch = rng.standard_normal(shape) * magnitude + 3.0
        batches.append(batch.astype(dtype))
    return batches


def new_exact(client, channels, dtype="float64", kind="1d", **options):
    return client.create_session(kind, channels, dtype=dtype, exact_statistics=True, **options)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_running_statistics_are_the_correctly_rounded_mean_and_variance_of_every_value(client, dtype, kind):
    spatial = (3, 2) if kind == "2d" else ()
    batches = wide_batches(1, 5, 7, 3, np.dtype(dtype), spatial)
    session = new_exact(client, 3, dtype, kind)
    for batch in batches:
        session.forward(batch, train=True)
    info = session.info()
    assert info.num_batches_tracked == len(batches) and info.exact_statistics
    assert info.momentum is None and info.proto.config.cumulative_average is False
    assert_exact(info, batches, dtype)


def test_train_output_uses_the_batch_and_eval_the_exact_statistics(client):
    batches = wide_batches(2, 3, 16, 4)
    session = new_exact(client, 4, "float64", affine=True)
    module = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    for batch in batches:
        y = session.forward(batch, train=True)
        expected = module.train()(torch.from_numpy(batch))
        torch.testing.assert_close(torch.from_numpy(np.array(y)), expected.detach(), rtol=0, atol=0)
    info = session.info()
    x = batches[0][:5]
    expected = torch.nn.functional.batch_norm(
        torch.from_numpy(x), torch.from_numpy(np.array(info.running_mean)),
        torch.from_numpy(np.array(info.running_var)), torch.ones(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64), training=False, eps=info.eps)
    torch.testing.assert_close(torch.from_numpy(np.array(session.forward(x, train=False))), expected,
                               rtol=0, atol=0)


def test_before_any_value_the_statistics_are_pytorchs_initial_ones_and_reset_clears_the_sums(client):
    session = new_exact(client, 2, "float32")
    info = session.info()
    assert list(info.running_mean) == [0, 0] and list(info.running_var) == [1, 1]
    assert info.standard_scaler.n_samples_seen == 0
    session.forward(np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.float32), train=True)
    info = session.reset_running_stats()
    assert list(info.running_mean) == [0, 0] and list(info.running_var) == [1, 1]
    assert info.standard_scaler.n_samples_seen == 0 and info.num_batches_tracked == 0
    batch = np.array([[7.0, -1.0], [9.0, 4.0]], dtype=np.float32)
    session.forward(batch, train=True)
    assert_exact(session.info(), [batch], "float32")  # the sums started again from zero


def test_batch_cuts_and_orders_give_bitwise_identical_state(client):
    data = np.concatenate(wide_batches(3, 4, 30, 3))
    states = []
    for cuts, order in [((120,), None), ((2, 58, 3, 57), None), ((10,) * 12, "reverse"),
                        ((7, 13, 100), "shuffle")]:
        pieces, start = [], 0
        for size in cuts:
            pieces.append(data[start:start + size])
            start += size
        if order == "reverse":
            pieces.reverse()
        elif order == "shuffle":
            pieces = [pieces[i] for i in np.random.default_rng(0).permutation(len(pieces))]
        session = new_exact(client, 3)
        for piece in pieces:
            session.forward(piece, train=True)
        states.append((state_bits(session.info()), exact_keys(session)))
    for bits, keys in states[1:]:
        assert bits == states[0][0]
        assert keys.keys() == states[0][1].keys()
        for key in keys:
            assert torch.equal(keys[key], states[0][1][key]), key
    assert_exact(session.info(), [data], "float64")


def _worker(address, session_id, batches, request_prefix):
    """A worker process: its own connection, its share of the batches."""
    sys.path.insert(0, CLIENT_DIR)
    import normserve as client_module  # noqa: PLC0415  (in the child process)
    with client_module.connect(address, retries=3) as worker_client:
        session = worker_client.get_session(session_id)
        for i, batch in enumerate(batches):
            session.forward(batch, train=True, request_id=f"{request_prefix}-{i}")


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_concurrent_worker_processes_give_the_same_state_as_one(server, client, workers):
    batches = wide_batches(4, 8, 12, 3, np.float32)
    session = new_exact(client, 3, "float32", session_id=f"exact-workers-{workers}")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker,
                                 args=(server.address, session.session_id, batches[w::workers], f"w{w}"))
                 for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    info = session.info()
    assert info.num_batches_tracked == len(batches)
    assert_exact(info, batches, "float32")
    reference = new_exact(client, 3, "float32")
    for batch in reversed(batches):
        reference.forward(batch, train=True)
    assert state_bits(reference.info()) == state_bits(info)


def test_merge_of_partitions_equals_one_session_fed_everything(client):
    batches = wide_batches(5, 9, 10, 2)
    whole = new_exact(client, 2)
    for batch in batches:
        whole.forward(batch, train=True)
    parts = [new_exact(client, 2) for _ in range(3)]
    for i, batch in enumerate(batches):
        parts[i % 3].forward(batch, train=True)
    source_before = state_bits(parts[1].info())
    target = parts[0]
    version = target.info().version
    merged = target.merge(parts[1], request_id="merge-1")
    assert merged.version == version + 1 and not merged.replayed
    # A retry is a replay, not a second merge.
    again = target.merge(parts[1], request_id="merge-1")
    assert again.replayed and again.version == version + 1
    target.merge(parts[2].session_id)
    info = target.info()
    assert state_bits(info) == state_bits(whole.info())
    assert info.num_batches_tracked == len(batches)
    assert exact_keys(target).keys() == exact_keys(whole).keys()
    for key, value in exact_keys(target).items():
        assert torch.equal(value, exact_keys(whole)[key]), key
    assert state_bits(parts[1].info()) == source_before  # the source is unchanged
    assert_exact(info, batches, "float64")


def test_merge_refuses_what_it_cannot_merge_and_changes_nothing(client):
    target = new_exact(client, 2)
    target.forward(np.array([[1.0, 2.0], [3.0, 4.0]]), train=True)
    before = target.info()
    plain = client.create_session("1d", 2, dtype="float64")
    other_width = new_exact(client, 3)
    with pytest.raises(normserve.InvalidArgument, match="into itself"):
        target.merge(target)
    with pytest.raises(normserve.FailedPrecondition, match="exact"):
        target.merge(plain)
    with pytest.raises(normserve.FailedPrecondition, match="exact"):
        plain.merge(target)
    with pytest.raises(normserve.InvalidArgument, match="channels"):
        target.merge(other_width)
    with pytest.raises(normserve.NotFound):
        target.merge("no-such-session")
    with pytest.raises(normserve.Aborted):
        target.merge(other_width, expected_version=before.version + 5)
    assert unchanged(target.info()) == unchanged(before)
    # A merge applied before its source went away is still replayed.
    source = new_exact(client, 2)
    source.forward(np.array([[5.0, 6.0], [7.0, 9.0]]), train=True)
    applied = target.merge(source, request_id="gone-source")
    source.delete()
    replay = target.merge(source.session_id, request_id="gone-source")
    assert replay.replayed and replay.version == applied.version


def test_state_is_bitwise_the_same_after_a_restart(tmp_path):
    batches = wide_batches(6, 6, 8, 3, np.float32)
    server = ServerProcess(data_dir=str(tmp_path))
    try:
        with normserve.connect(server.address) as c:
            session = new_exact(c, 3, "float32", session_id="survivor")
            for batch in batches[:3]:
                session.forward(batch, train=True)
            before = state_bits(session.info())
            keys_before = exact_keys(session)
    finally:
        assert server.stop() == 0
    server = ServerProcess(data_dir=str(tmp_path))
    try:
        with normserve.connect(server.address) as c:
            session = c.get_session("survivor")
            assert state_bits(session.info()) == before
            for key, value in exact_keys(session).items():
                assert torch.equal(value, keys_before[key])
            for batch in batches[3:]:  # the sums go on where they were
                session.forward(batch, train=True)
            assert_exact(session.info(), batches, "float32")
    finally:
        assert server.stop() == 0


def test_redis_replicas_agree_bitwise(redis_server):
    batches = wide_batches(7, 8, 6, 2)
    replicas = [ServerProcess("--store", redis_server.url) for _ in range(2)]
    try:
        clients = [normserve.connect(r.address, retries=3) for r in replicas]
        new_exact(clients[0], 2, session_id="exact-replicated")
        sessions = [c.get_session("exact-replicated") for c in clients]
        for i, batch in enumerate(batches):
            sessions[i % 2].forward(batch, train=True, request_id=f"b{i}")
        infos = [s.info() for s in sessions]
        assert state_bits(infos[0]) == state_bits(infos[1])
        assert_exact(infos[1], batches, "float64")
        for c in clients:
            c.close()
    finally:
        for replica in replicas:
            assert replica.stop() == 0


def test_export_loads_into_pytorch_and_import_restores_the_sums(client):
    import safetensors.torch
    batches = wide_batches(8, 4, 9, 3)
    session = new_exact(client, 3, affine=True)
    for batch in batches:
        session.forward(batch, train=True)
    exported = session.export_state().safetensors
    state = safetensors.torch.load(exported)
    assert {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "exact.count",
            "exact.sum_x.positive", "exact.sum_x.negative", "exact.sum_x2"} == set(state)
    # Plain PyTorch loads it, the exact sums being unexpected keys.
    module = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    result = module.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == sorted(k for k in state if k.startswith("exact."))
    assert torch.equal(module.running_mean, torch.from_numpy(np.array(session.info().running_mean)))
    # The sums are what the documented encoding says: digits of 2^-1074 units.
    count = int(state["exact.count"])
    assert count == 4 * 9
    for c, column in enumerate(values_of(batches)):
        _, s1, s2 = exact_moments(column)
        digits = lambda key: sum(int(d) << (32 * j) for j, d in enumerate(state[key][c].tolist()))  # noqa: E731
        assert Fraction(digits("exact.sum_x.positive") - digits("exact.sum_x.negative"), 2 ** 1074) == s1
        assert Fraction(digits("exact.sum_x2"), 2 ** 2148) == s2
    # Import into a new exact session: the same state, and the sums go on.
    copy = new_exact(client, 3, affine=True)
    copy.import_state(exported)
    assert state_bits(copy.info()) == state_bits(session.info())
    extra = wide_batches(9, 1, 5, 3)[0]
    session.forward(extra, train=True)
    copy.forward(extra, train=True)
    assert state_bits(copy.info()) == state_bits(session.info())
    assert_exact(copy.info(), [*batches, extra], "float64")


def test_imports_that_would_break_the_sums_are_refused(client):
    import safetensors.torch
    session = new_exact(client, 2, affine=True)
    session.forward(np.array([[1.0, 2.0], [4.0, 8.0]]), train=True)
    before = session.info()
    plain = torch.nn.BatchNorm1d(2, dtype=torch.float64).state_dict()
    with pytest.raises(normserve.InvalidArgument, match=r"Missing key\(s\).*exact\.count"):
        session.load_state_dict(plain)  # strict: the sums are required keys
    with pytest.raises(normserve.InvalidArgument, match="exact sums"):
        session.load_state_dict(plain, strict=False)  # running stats without sums
    state = safetensors.torch.load(session.export_state().safetensors)
    tampered = dict(state, running_mean=state["running_mean"] + 1)
    with pytest.raises(normserve.InvalidArgument, match="running_mean"):
        session.load_state_dict(tampered)
    negative = dict(state, **{"exact.sum_x2": torch.zeros_like(state["exact.sum_x2"])})
    with pytest.raises(normserve.InvalidArgument, match="not those of any values"):
        session.load_state_dict(negative)
    partial = {k: v for k, v in state.items() if k != "exact.sum_x2"}
    with pytest.raises(normserve.InvalidArgument, match="exact sums need all"):
        session.load_state_dict(partial, strict=False)
    assert unchanged(session.info()) == unchanged(before)
    # Weight and bias alone load (non-strict) and keep the sums.
    info = session.load_state_dict({"weight": torch.tensor([2.0, 3.0], dtype=torch.float64)}, strict=False)
    assert state_bits(info) == state_bits(before)
    # An exact export into a plain session: the sums are unexpected keys.
    other = client.create_session("1d", 2, dtype="float64")
    with pytest.raises(normserve.InvalidArgument, match=r"Unexpected key\(s\).*exact\.count"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)


def test_standard_scaler_transforms_as_the_eval_forward(client):
    batches = wide_batches(10, 4, 25, 5)
    session = new_exact(client, 5, "float64")
    for batch in batches:
        session.forward(batch, train=True)
    scaler = session.standard_scaler()
    assert isinstance(scaler, sklearn.preprocessing.StandardScaler)
    info = session.info()
    assert scaler.mean_.tobytes() == np.asarray(info.running_mean).tobytes()
    assert scaler.n_samples_seen_ == 100
    expected_var = [oracle(column, "float64")[2] for column in values_of(batches)]
    assert scaler.var_.tolist() == expected_var
    # scikit-learn fitting the same data in floating point agrees to rounding.
    fitted = sklearn.preprocessing.StandardScaler().fit(np.concatenate(batches))
    np.testing.assert_allclose(fitted.mean_, scaler.mean_, rtol=1e-9, atol=1e-9 * np.abs(fitted.mean_).max())
    np.testing.assert_allclose(fitted.var_, scaler.var_, rtol=1e-9)
    x = np.concatenate([wide_batches(11, 1, 40, 5)[0], np.concatenate(batches)[:10]])
    served = np.asarray(session.forward(x, train=False))
    transformed = scaler.transform(x)
    # The same formula in another order of roundings (libtorch: x * a + b):
    # within a few ulps of the operands' scale.
    bound = 8 * np.finfo(np.float64).eps * (np.abs(x) + np.abs(scaler.mean_)) / scaler.scale_
    assert np.all(np.abs(served - transformed) <= bound)


def test_standard_scaler_needs_an_exact_session(client):
    plain = client.create_session("1d", 2)
    with pytest.raises(normserve.FailedPrecondition, match="exact"):
        plain.standard_scaler_statistics()
    assert plain.info().standard_scaler is None


def test_adversarial_values_are_summed_exactly(client):
    cases = [
        ("float64", [[1e16], [1.0], [-1e16], [1.0]]),                # cancellation: mean 0.5, not 0 or 1
        ("float64", [[1e150], [-1e150], [3.0], [5e-324]]),           # huge squares, a subnormal
        ("float64", [[2.0 ** -1074], [2.0 ** -1073], [-2.0 ** -1060], [0.0]]),  # squares below 2^-2000
        ("float64", [[1.7e308], [1.7e308], [-1e308]]),               # sums beyond the float64 range
        ("float32", [[3.0e38], [3.0e38], [-3.0e38]]),                # variance beyond float32: inf
        ("float32", [[1e-45], [-1e-45], [1.0], [16777217.0]]),       # subnormal and 2^24 + 1
        ("float32", [[0.1], [0.2], [0.3]]),                          # rounding to float32 once
    ]
    for dtype, rows in cases:
        batch = np.array(rows, dtype=np.dtype(dtype))
        session = new_exact(client, 1, dtype)
        session.forward(batch[:2], train=True)
        if len(batch) > 3:
            session.forward(batch[2:], train=True)
            batches = [batch[:2], batch[2:]]
        else:
            session.forward(batch[1:], train=True)
            batches = [batch[:2], batch[1:]]
        assert_exact(session.info(), batches, dtype)


def float32_spans(seed, rows, spans):
    """One float32 channel per (low, high) exponent-bits range: random
    significands and signs, the range's extremes present with all-ones
    significands (so that the lowest bit of the smallest value counts)."""
    rng = np.random.default_rng(seed)
    columns = []
    for low, high in spans:
        exponent = rng.integers(low, high + 1, size=rows, dtype=np.uint32)
        significand = rng.integers(0, 1 << 23, size=rows, dtype=np.uint32)
        significand[::7] = (1 << 23) - 1
        sign = rng.integers(0, 2, size=rows, dtype=np.uint32) << 31
        bits = sign | (exponent << 23) | significand
        bits[0] = (high << 23) | ((1 << 23) - 1)
        bits[1] = (1 << 31) | (low << 23) | ((1 << 23) - 1)
        columns.append(bits.view(np.float32))
    return np.stack(columns, axis=1)


def exported_sums(session):
    """Per channel (sum of the positive values · 2^1074, of |x| over the
    negative ones · 2^1074, of x² · 2^2148) from the exported digit tables."""
    keys = exact_keys(session)

    def numbers(key):
        return [sum(int(d) << (32 * i) for i, d in enumerate(row)) for row in keys[key].tolist()]

    return list(zip(numbers("exact.sum_x.positive"), numbers("exact.sum_x.negative"),
                    numbers("exact.sum_x2")))


def oracle_sums(column):
    """The same sums, from Python's exact integers."""
    positive = negative = squares = 0
    for v in column:
        num, den = float(v).as_integer_ratio()
        if num > 0:
            positive += num * (2 ** 1074 // den)
        else:
            negative += -num * (2 ** 1074 // den)
        squares += num * num * (2 ** 2148 // (den * den))
    return positive, negative, squares


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_float32_values_spanning_every_level_boundary_are_summed_exactly(client, kind):
    # Channels whose values span 0 to 120 binary orders (where the float32
    # accumulation switches between its exact methods), at the top, middle
    # and bottom of float32's range, plus subnormals, zeros and signed zeros;
    # as a (N, C) table and as (N, C, H, W) images, cut into two batches.
    spans = [(120, 120), (100, 126), (100, 127), (100, 128), (60, 112), (60, 113),
             (60, 114), (30, 108), (30, 109), (1, 121), (254 - 79, 254), (1, 27)]
    values = float32_spans(3, 4800, spans)
    subnormal = values[:, 0].view(np.uint32) & np.uint32((1 << 23) - 1)
    zeros = np.where(np.arange(4800) % 3 == 0, np.float32(0.0), values[:, 1])
    zeros[1::6] = -0.0
    values = np.concatenate([values, subnormal.view(np.float32)[:, None], zeros[:, None]], axis=1)
    channels = values.shape[1]
    batch = values if kind == "1d" else values.reshape(75, 64, channels).transpose(0, 2, 1).reshape(75, channels, 8, 8)
    session = new_exact(client, channels, "float32", kind)
    batches = [batch[:50], batch[50:]]
    for part in batches:
        session.forward(np.ascontiguousarray(part), train=True)
    assert_exact(session.info(), batches, "float32")
    columns = values_of(batches)
    assert exported_sums(session) == [oracle_sums(column) for column in columns]


def test_non_finite_train_input_is_refused_and_changes_nothing(client):
    session = new_exact(client, 2, "float32")
    session.forward(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), train=True)
    before = session.info()
    for bad in [np.nan, np.inf, -np.inf]:
        x = np.array([[1.0, bad], [3.0, 4.0]], dtype=np.float32)
        with pytest.raises(normserve.InvalidArgument, match="NaN or infinite"):
            session.forward(x, train=True)
        # Eval changes nothing, so NaN propagates there as in PyTorch.
        assert np.isnan(np.asarray(session.forward(np.where(np.isinf(x), np.nan, x), train=False))[0, 1])
    assert unchanged(session.info()) == unchanged(before)


def test_exact_sessions_refuse_options_that_contradict_them(client, bn_stub):
    for options, text in [({"momentum": 0.1}, "momentum"), ({"momentum": None}, "cumulative_average"),
                          ({"track_running_stats": False}, "track_running_stats"),
                          ({"running_mean": np.zeros(2, np.float32)}, "running_mean"),
                          ({"num_batches_tracked": 3}, "num_batches_tracked")]:
        with pytest.raises(normserve.InvalidArgument, match=text):
            client.create_session("1d", 2, exact_statistics=True, **options)
    session = new_exact(client, 2, "float32", affine=True)
    for update, text in [({"running_var": np.ones(2, np.float32)}, "running_var"), ({"momentum": 0.5}, "momentum"),
                         ({"num_batches_tracked": 1}, "num_batches_tracked")]:
        with pytest.raises(normserve.InvalidArgument, match=text):
            session.update_parameters(**update)
    assert session.update_parameters(eps=1e-3, weight=np.full(2, 2.0, np.float32)).eps == 1e-3
    # The same id with another exact option is another configuration.
    new_exact(client, 2, session_id="exact-or-not")
    with pytest.raises(normserve.AlreadyExists, match="exact_statistics"):
        client.create_session("1d", 2, session_id="exact-or-not", dtype="float64")
    # A raw MergeSession with a malformed source id names the field.
    with pytest.raises(grpc.RpcError) as error:
        bn_stub.MergeSession(bn.MergeSessionRequest(session_id=session.session_id, source_session_id="bad id!"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source_session_id" in error.value.details()


def test_asyncio_client_merges_and_reads_the_scaler_attributes(server):
    batches = wide_batches(12, 4, 6, 2)

    async def run():
        async with normserve.aio.connect(server.address) as aio_client:
            target = await aio_client.create_session("1d", 2, dtype="float64", exact_statistics=True)
            source = await aio_client.create_session("1d", 2, dtype="float64", exact_statistics=True)
            for i, batch in enumerate(batches):
                await (target if i % 2 else source).forward(batch, train=True)
            merged = await target.merge(source, request_id="aio-merge")
            assert (await target.merge(source, request_id="aio-merge")).replayed
            statistics = await target.standard_scaler_statistics()
            return merged, statistics

    merged, statistics = asyncio.run(run())
    assert_exact(merged, batches, "float64")
    assert statistics.n_samples_seen == 24
    assert statistics.mean.tobytes() == np.asarray(merged.running_mean).tobytes()
    assert statistics.scale.tolist() == [float(np.sqrt(v + merged.eps)) for v in merged.running_var]
