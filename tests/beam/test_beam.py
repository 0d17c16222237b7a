"""normserve.beam on Apache Beam's DirectRunner in multi-processing mode
against a real normserve server (NORMSERVE_BIN), in the environment of
scripts/beam-env.sh (apache-beam, no torch; `make test-beam`).

The oracle is exact arithmetic: fractions.Fraction over every value of the
PCollection, rounded once to float64 (the statistics must be bitwise those),
and numpy's (x - mean) / sqrt(var + eps) for the eval pass. The statistics
must also be bitwise the same across runs with other bundles, batch sizes,
worker counts and element orders, and a pipeline that fails after sending
(a DoFn that fails once, then succeeds when the pipeline is run again: the
DirectRunner itself does not retry bundles) counts nothing twice."""

import fractions
import glob
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import uuid

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLIENT_DIR = os.path.join(ROOT, "clients", "python")
EXAMPLE_DIR = os.path.join(ROOT, "examples", "beam")
sys.path[:0] = [CLIENT_DIR, EXAMPLE_DIR]
# The workers of the multi-processing DirectRunner are subprocesses: they
# import the client, the example and this module (the DoFns below) by this path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [CLIENT_DIR, EXAMPLE_DIR, os.path.dirname(__file__)]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

import normserve  # noqa: E402
from normserve import beam as nsbeam  # noqa: E402
from normalize_features import normalize_features  # noqa: E402

assert normserve.__file__.startswith(CLIENT_DIR), f"normserve imported from {normserve.__file__}, not {CLIENT_DIR}"

C = 4
EPS = 1e-5


class Server:
    """A normserve process on an ephemeral loopback port (NORMSERVE_BIN)."""

    def __init__(self, *args):
        binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
        self.data_dir = tempfile.mkdtemp(prefix="normserve-beam-")
        self.proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--data-dir", self.data_dir, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The server prints one line once it is bound; no sleeps, no polling.
        line = self.proc.stdout.readline()
        if not line.startswith("normserve listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[3]
        for stream in (self.proc.stdout, self.proc.stderr):  # a full pipe would block the server
            threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    process = Server("--compute-threads", "2")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with normserve.connect(server.address) as c:
        c.wait_ready(timeout=30)
        yield c


def make_rows(n, seed):
    """(n, C) float64 rows whose sums lose bits in floating point: a large
    offset, values across many magnitudes, negative and positive."""
    rng = np.random.default_rng(seed)
    rows = np.empty((n, C))
    rows[:, 0] = 1e8 + rng.standard_normal(n)
    rows[:, 1] = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 7, n)
    rows[:, 2] = rng.uniform(-1, 1, n) / 3
    rows[:, 3] = rng.integers(0, 5, n).astype(np.float64)  # repeated values: duplicates in the data
    return rows


def oracle(rows):
    """Mean, unbiased and population variance per channel: exact, rounded once."""
    n = rows.shape[0]
    mean, unbiased, population = [], [], []
    for column in rows.T:
        values = [fractions.Fraction(float(v)) for v in column]
        m = sum(values) / n
        m2 = sum((v - m) ** 2 for v in values)
        mean.append(float(m))
        unbiased.append(float(m2 / (n - 1)))
        population.append(float(m2 / n))
    return np.array(mean), np.array(unbiased), np.array(population)


class Collect(beam.DoFn):
    """Writes what reaches it to pickle files in `directory` (one per bundle),
    so that the test process reads the outputs of every worker process."""

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def start_bundle(self):
        self.items = []

    def process(self, element):
        self.items.append(element)

    def finish_bundle(self):
        if self.items:
            with open(os.path.join(self.directory, f"{uuid.uuid4().hex}.pickle"), "wb") as f:
                pickle.dump((os.getpid(), self.items), f)


def collected(directory):
    pids, items = set(), []
    for path in glob.glob(os.path.join(directory, "*.pickle")):
        with open(path, "rb") as f:
            pid, part = pickle.load(f)
        pids.add(pid)
        items.extend(part)
    return pids, items


class FailOnce(beam.DoFn):
    """Raises once in the whole test (the marker file is created atomically
    by whichever worker gets there first), after `after` elements."""

    def __init__(self, marker, after):
        self.marker, self.after = marker, after

    def setup(self):
        self.seen = 0

    def process(self, element):
        self.seen += 1
        if self.seen > self.after:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                raise RuntimeError(f"injected failure ({self.marker})")
        yield element


def options(workers):
    return PipelineOptions(flags=[], runner="DirectRunner", direct_num_workers=workers,
                           direct_running_mode="multi_processing")


def run_pipeline(address, session, rows, out, *, workers, batch_size, fail_before=None, fail_after=None):
    """The example pipeline (examples/beam): the train pass into `session`,
    then the eval pass with its statistics; returns the statistics, the
    worker processes that normalized, and the normalized rows by key.
    fail_before: a marker file; the first run that finds it absent fails
    while the bundles send (a quarter of a worker's elements in). fail_after:
    the same, once the statistics are merged into the session."""
    server = nsbeam.Server(address)
    with beam.Pipeline(options=options(workers)) as p:
        keyed = p | "Create" >> beam.Create(list(enumerate(rows)))
        if fail_before is not None:
            keyed = keyed | "FailWhileSending" >> beam.ParDo(FailOnce(fail_before, after=len(rows) // 4))
        stats, normalized = normalize_features(keyed, session, server, num_features=C, dtype="float64",
                                               eps=EPS, batch_size=batch_size)
        if fail_after is not None:
            stats = stats | "FailAfterMerge" >> beam.ParDo(FailOnce(fail_after, after=0))
        _ = stats | "CollectStats" >> beam.ParDo(Collect(os.path.join(out, "stats")))
        _ = normalized | "CollectRows" >> beam.ParDo(Collect(os.path.join(out, "rows")))
    _, (statistics,) = collected(os.path.join(out, "stats"))
    pids, pairs = collected(os.path.join(out, "rows"))
    return statistics, pids, dict(pairs)


def check_statistics(statistics, rows):
    mean, unbiased, population = oracle(rows)
    # Bitwise: the correctly rounded values, not close ones.
    assert statistics.n_samples_seen == rows.shape[0]
    assert statistics.running_mean.dtype == np.float64
    assert statistics.running_mean.tobytes() == mean.tobytes(), (statistics.running_mean, mean)
    assert statistics.running_var.tobytes() == unbiased.tobytes(), (statistics.running_var, unbiased)
    assert statistics.mean.tobytes() == mean.tobytes()
    assert statistics.var.tobytes() == population.tobytes(), (statistics.var, population)


def check_normalized(normalized, rows, statistics):
    assert sorted(normalized) == list(range(rows.shape[0]))
    got = np.stack([normalized[i] for i in range(rows.shape[0])])
    assert got.dtype == np.float64
    scale = np.sqrt(statistics.running_var + EPS)
    expected = (rows - statistics.running_mean) / scale
    # libtorch evaluates x * (1 / scale) - mean / scale: a few roundings of
    # numbers as large as |x| / scale, which the offset of channel 0 makes
    # far larger than the result.
    bound = 8 * np.finfo(np.float64).eps * (np.abs(rows) / scale + np.abs(expected))
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound)


def session_id(name):
    return f"beam-test-{name}-{uuid.uuid4().hex[:8]}"


def test_statistics_are_exact_and_the_same_whatever_the_bundles_and_workers(server, client, tmp_path):
    rows = make_rows(2000, seed=1)
    first, second = session_id("a"), session_id("b")
    stats_a, pids_a, normalized_a = run_pipeline(server.address, first, rows, str(tmp_path / "a"),
                                                 workers=2, batch_size=64)
    # Other workers, other batches, the rows in another order.
    shuffled = rows[np.random.default_rng(2).permutation(len(rows))]
    stats_b, pids_b, _ = run_pipeline(server.address, second, shuffled, str(tmp_path / "b"),
                                      workers=3, batch_size=7)
    assert len(pids_a) >= 2 and len(pids_b) >= 2, "the pipeline ran in one process"
    check_statistics(stats_a, rows)
    check_statistics(stats_b, rows)
    for name in ("running_mean", "running_var", "mean", "var", "scale"):
        assert getattr(stats_a, name).tobytes() == getattr(stats_b, name).tobytes(), name
    check_normalized(normalized_a, rows, stats_a)
    # The session itself holds those statistics; the shards are gone.
    info = client.get_session(first).info()
    assert info.exact_statistics and info.version == stats_a.version
    assert np.asarray(info.running_mean).tobytes() == stats_a.running_mean.tobytes()
    assert list(client.list_sessions(nsbeam._shard_labels(first))) == []


def test_rows_of_one_value_per_channel_in_tiny_bundles(server, tmp_path):
    # Three rows: whatever the bundles, no train batch may hold one row.
    rows = make_rows(3, seed=3)
    statistics, _, normalized = run_pipeline(server.address, session_id("tiny"), rows, str(tmp_path),
                                             workers=2, batch_size=2)
    check_statistics(statistics, rows)
    check_normalized(normalized, rows, statistics)


def test_a_failed_and_rerun_pipeline_counts_every_element_once(server, client, tmp_path):
    rows = make_rows(600, seed=4)
    target = session_id("retry")
    before, after = str(tmp_path / "fail-before-merge"), str(tmp_path / "fail-after-merge")

    # 1. A worker fails after its bundle sent batches, before the merge.
    with pytest.raises(Exception, match="injected failure"):
        run_pipeline(server.address, target, rows, str(tmp_path / "1"), workers=2, batch_size=16,
                     fail_before=before, fail_after=after)
    assert os.path.exists(before) and not os.path.exists(after)
    orphans = list(client.list_sessions(nsbeam._shard_labels(target), include_tensors=True))
    assert orphans and sum(o.standard_scaler.n_samples_seen for o in orphans) > 0, \
        "the failure did not happen after a send: the test would prove nothing"

    # 2. Run again: it fails once more, after merging into the target.
    with pytest.raises(Exception, match="injected failure"):
        run_pipeline(server.address, target, rows, str(tmp_path / "2"), workers=2, batch_size=16,
                     fail_before=before, fail_after=after)
    assert os.path.exists(after)
    merged_once = client.get_session(target).info()
    assert merged_once.standard_scaler.n_samples_seen == len(rows)

    # 3. And again, with other workers: the merge replays; nothing counted twice.
    statistics, _, normalized = run_pipeline(server.address, target, rows, str(tmp_path / "3"), workers=3,
                                             batch_size=5, fail_before=before, fail_after=after)
    check_statistics(statistics, rows)
    assert statistics.version == merged_once.version
    check_normalized(normalized, rows, statistics)
    assert nsbeam.delete_shards(client, target)  # the orphans of step 1
    assert list(client.list_sessions(nsbeam._shard_labels(target))) == []


def test_image_elements_with_many_values_per_channel(server, client, tmp_path):
    # (C, H, W) elements for a BatchNorm2d session: every value of a channel
    # over all images and positions counts; even a bundle of one image is a
    # valid train batch, so nothing is held back.
    rng = np.random.default_rng(5)
    images = (rng.standard_normal((60, 3, 2, 5)) * [[[1e-3]], [[1.0]], [[1e6]]] + [[[7.0]], [[0.0]], [[-3e9]]])
    # A session created beforehand: the transform takes its configuration.
    target = client.create_session("2d", 3, dtype="float64", exact_statistics=True, affine=False,
                                   session_id=session_id("images"), labels={"data": "images"}).session_id
    out = str(tmp_path)
    with beam.Pipeline(options=options(2)) as p:
        stats = (p | beam.Create(list(images))
                 | nsbeam.ComputeStatistics(target, nsbeam.Server(server.address), batch_size=4))
        _ = stats | beam.ParDo(Collect(out))
    _, (statistics,) = collected(out)
    values = images.transpose(1, 0, 2, 3).reshape(3, -1).T  # (values per channel, C)
    check_statistics(statistics, values)


def test_elements_of_the_wrong_shape_fail_the_pipeline_with_the_shape_expected(server):
    with pytest.raises(Exception, match=r"expected elements of shape \(C,\) or \(C, L\) with C = num_features = 4"):
        with beam.Pipeline(options=PipelineOptions(flags=[], runner="DirectRunner")) as p:
            _ = (p | beam.Create([np.zeros(3), np.ones(3)])
                 | nsbeam.ComputeStatistics(session_id("bad"), server.address, num_features=4))
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        nsbeam.ComputeStatistics("s", server.address, num_features=4, batch_size=1)
    with pytest.raises(ValueError, match="kind must be '1d', '2d' or '3d'"):
        nsbeam.ComputeStatistics("s", server.address, num_features=4, kind="4d")
