"""Apache Beam transforms on normserve's exact statistics (`pip install
normserve[beam]`): the train pass of a preprocessing pipeline computes the
mean and variance of a whole PCollection in an `exact_statistics` session,
bitwise the same whatever the bundles, the workers and the retries; the eval
pass normalizes with them.

    import apache_beam as beam
    from normserve import beam as nsbeam

    server = nsbeam.Server("normserve.internal:50051")      # token=, tls= as normserve.connect
    with beam.Pipeline() as p:
        keyed = p | beam.Create(list(enumerate(rows)))       # (key, row): arrays or lists of C numbers
        stats = (keyed | beam.Values()
                 | nsbeam.ComputeStatistics("features-v1", server, num_features=C, dtype="float64"))
        normalized = keyed | nsbeam.Normalize("features-v1", server, statistics=stats, keyed=True)

`stats` holds one `Statistics` (mean, variances, n_samples_seen, the
session's version). How the train pass counts every element once:

1. Each bundle creates its own exact session (a shard, random id, labelled
   `normserve-beam: shard`) and sends its elements to it as train batches.
   At the end of the bundle it emits the shard's id. A bundle that fails and
   is retried leaves its shard behind unreferenced: the runner discards the
   failed attempt's outputs, so the orphaned shard is never merged
   (`delete_shards` removes such shards, as does a server whose idle TTL
   deletes: --session-ttl-action delete, with a TTL longer than a pipeline).
2. One step gathers the committed shard ids, merges them into a fresh
   session of its own, and merges that one into the target session with a
   single MergeSession whose request_id is a hash of the whole PCollection's
   contents (an order-independent sum of per-element SHA-256s, so it does
   not depend on bundles or workers). A retried step, or a rerun of the
   whole pipeline over the same data, sends the same request_id: the server
   replays it instead of adding the data again (as long as the target has
   not seen more than the server's --replay-window other mutations since).
3. The shards are deleted only after that step's output is committed (a
   Reshuffle keeps the deletion out of the step's retries).

A consequence of 2: a second pipeline over exactly the same elements into
the same session counts them once; use another session to count them again.

Batch norm needs two values per channel in a train batch; elements of one
value per channel ((C,) rows, or (C, 1, ...)) are therefore sent in batches
of at least two, and every bundle keeps up to three of them back for the
gathering step, which sends them together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

try:
    import apache_beam as beam
    from apache_beam.transforms.window import GlobalWindow, GlobalWindows
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from apache_beam.utils.windowed_value import WindowedValue
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("normserve.beam needs apache-beam: pip install 'normserve[beam]'") from error

import normserve
from normserve.client import Client, TLSConfig
from normserve.results import SessionInfo

__all__ = ["ComputeStatistics", "Normalize", "Server", "SessionSpec", "Statistics", "delete_shards"]

# Labels of the sessions the transforms create beside the target.
SHARD_LABEL = "normserve-beam"
TARGET_LABEL = "normserve-beam-target"
# The request_id of the merge into the target: this prefix and the data's hash.
REQUEST_ID_PREFIX = "beam-"
# The ranks of one element (a sample without the batch dimension) by kind.
_RANKS = {"1d": (1, 2), "2d": (3,), "3d": (4,)}


@dataclasses.dataclass(frozen=True)
class Server:
    """Where the workers connect, and how (picklable: it travels to them).

    address: "host:port". token, tls: as `normserve.connect`.
    timeout: seconds per call. retries: how often a call that failed with
        UNAVAILABLE (or ABORTED from a lost race) is retried; mutations
        carry request_ids, so a retry is never applied twice.
    """

    address: str
    token: str | None = None
    tls: bool | TLSConfig | None = None
    timeout: float | None = 60.0
    retries: int = 5

    def connect(self) -> Client:
        return normserve.connect(self.address, self.token, self.tls, timeout=self.timeout,
                                 retries=self.retries)


@dataclasses.dataclass(frozen=True)
class SessionSpec:
    """The configuration of the target session, and of the shards beside it
    (MergeSession needs the same configuration on both sides).

    kind: "1d" for (C,) rows or (C, L) elements, "2d" for (C, H, W), "3d"
        for (C, D, H, W). dtype: of the statistics, and of the values sent
        (elements are converted to it: the statistics are those of the
        values as rounded to dtype). eps: added to the variance by the eval
        pass. device: "" (the server's default), "cpu", "cuda", "cuda:N".
    """

    num_features: int
    kind: str = "1d"
    dtype: str = "float32"
    eps: float = 1e-5
    device: str = ""
    # False: the eval pass is exactly (x - mean) / sqrt(var + eps).
    affine: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _RANKS:
            raise ValueError(f"normserve.beam: kind must be '1d', '2d' or '3d', got {self.kind!r}")
        _numpy_dtype(self)

    @classmethod
    def of(cls, info: SessionInfo) -> SessionSpec:
        """The configuration of an existing session (which must be exact)."""
        if not info.exact_statistics:
            raise ValueError(f"normserve.beam: session {info.session_id!r} does not keep exact statistics "
                             f"(create it with exact_statistics=True, or let ComputeStatistics create it)")
        return cls(info.num_features, kind=info.kind, dtype=info.dtype, eps=info.eps, device=info.device,
                   affine=info.affine)

    def create(self, client: Client, session_id: str, labels: dict[str, str]) -> normserve.Session:
        """The exact session `session_id` with this configuration (created,
        or found with the same configuration; AlreadyExists otherwise)."""
        return client.create_session(self.kind, self.num_features, eps=self.eps, dtype=self.dtype,
                                     device=self.device, session_id=session_id, labels=labels,
                                     affine=self.affine, exact_statistics=True)

    def sample_shape_error(self, shape: tuple[int, ...]) -> str | None:
        """Why an element of `shape` cannot be sent, or None."""
        if len(shape) not in _RANKS[self.kind] or shape[0] != self.num_features:
            wanted = {"1d": "(C,) or (C, L)", "2d": "(C, H, W)", "3d": "(C, D, H, W)"}[self.kind]
            return (f"expected elements of shape {wanted} with C = num_features = {self.num_features} "
                    f"(BatchNorm{self.kind}), got shape {shape}")
        return None


@dataclasses.dataclass(frozen=True)
class Statistics:
    """An exact session's statistics after the train pass (float64 arrays,
    one value per channel).

    mean, var, scale, n_samples_seen: scikit-learn `StandardScaler`'s
        `mean_`, `var_` (ddof = 0), `scale_`, `n_samples_seen_`.
    running_mean, running_var: the session's own (its dtype; running_var is
        the unbiased variance, as PyTorch's), what the eval pass uses:
        (x - running_mean) / sqrt(running_var + eps).
    version: the target session's version after the pass; the eval pass
        (`Normalize(statistics=...)`) runs only at this version.
    """

    session_id: str
    version: int
    n_samples_seen: int
    mean: np.ndarray[Any, Any]
    var: np.ndarray[Any, Any]
    scale: np.ndarray[Any, Any]
    running_mean: np.ndarray[Any, Any]
    running_var: np.ndarray[Any, Any]
    eps: float
    dtype: str

    @classmethod
    def of(cls, info: SessionInfo) -> Statistics:
        """The statistics of one snapshot of an exact session (one reply:
        the version and the values agree)."""
        scaler = info.standard_scaler
        if scaler is None:
            raise ValueError(f"normserve.beam: session {info.session_id!r} does not keep exact statistics")
        return cls(session_id=info.session_id, version=info.version, n_samples_seen=scaler.n_samples_seen,
                   mean=np.array(scaler.mean), var=np.array(scaler.var), scale=np.array(scaler.scale),
                   running_mean=np.array(_array(info.running_mean, "running_mean", info)),
                   running_var=np.array(_array(info.running_var, "running_var", info)),
                   eps=info.eps, dtype=info.dtype)


def _array(value: Any, name: str, info: SessionInfo) -> np.ndarray[Any, Any]:
    if value is None:
        raise ValueError(f"session {info.session_id!r} has no {name} (track_running_stats is off)")
    return np.asarray(value)


@dataclasses.dataclass(frozen=True)
class _Shard:
    """A bundle's shard: its id, the elements it holds and their hash."""

    session_id: str
    # Elements sent, and values per channel sent (n_samples_seen).
    count: int
    values: int
    digest: int


@dataclasses.dataclass(frozen=True)
class _HeldBack:
    """An element kept back for the gathering step (one value per channel)."""

    value: np.ndarray[Any, Any]
    digest: int


_DIGEST_MODULUS = 1 << 256


def _digest(value: np.ndarray[Any, Any]) -> int:
    """SHA-256 of one element (dtype, shape, bytes) as an integer; summed
    modulo 2**256 over a PCollection, the hash of its multiset of elements."""
    h = hashlib.sha256()
    h.update(f"{value.dtype.str}{value.shape}".encode("ascii"))
    h.update(np.ascontiguousarray(value).tobytes())
    return int.from_bytes(h.digest(), "big")


def _element(x: Any, spec: SessionSpec, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """One element as an array of the session's dtype, shape checked."""
    try:
        value = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"normserve.beam: cannot convert an element to {dtype}: {error}") from error
    problem = spec.sample_shape_error(value.shape)
    if problem:
        raise ValueError(f"normserve.beam: {problem}")
    return value


def _values_per_channel(value: np.ndarray[Any, Any]) -> int:
    """Values per channel in one element (C, *spatial): prod(spatial)."""
    return math.prod(value.shape[1:])


def _numpy_dtype(spec: SessionSpec) -> np.dtype[Any]:
    if spec.dtype not in ("float16", "float32", "float64"):
        raise ValueError(f"normserve.beam: dtype must be float16, float32 or float64, got {spec.dtype!r}")
    return np.dtype(spec.dtype)


def _shard_labels(target: str) -> dict[str, str]:
    return {SHARD_LABEL: "shard", TARGET_LABEL: target}


def _new_shard_id() -> str:
    return f"beam-shard-{uuid.uuid4().hex}"


class _Connected(beam.DoFn):  # type: ignore[misc]
    """A DoFn with one connection per instance (the runner keeps an
    instance per worker thread and reuses it for many bundles): opened in
    setup, closed in teardown."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self.client: Client | None = None

    def setup(self) -> None:
        self.client = self.server.connect()

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def connected(self) -> Client:
        assert self.client is not None, "the runner calls setup() first"
        return self.client


def _in_global_window(value: Any) -> WindowedValue:
    """What finish_bundle emits: the input was put in the global window."""
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


def _stack(values: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    try:
        return np.stack(values)
    except ValueError as error:
        raise ValueError(f"normserve.beam: the elements of a bundle differ in shape: {error}") from error


class _SendBundles(_Connected):
    """Each bundle's elements as train batches into a shard of its own;
    emits the shard (and the elements held back) at the end of the bundle."""

    def __init__(self, server: Server, target: str, spec: SessionSpec | None, batch_size: int) -> None:
        super().__init__(server)
        self.target, self.given_spec, self.batch_size = target, spec, batch_size

    def setup(self) -> None:
        super().setup()
        self.spec = self.given_spec or SessionSpec.of(self.connected().get_session(self.target).info())
        self.dtype = _numpy_dtype(self.spec)

    def start_bundle(self) -> None:
        self.shard: normserve.Session | None = None
        self.buffer: list[np.ndarray[Any, Any]] = []
        self.digests: list[int] = []
        self.sent, self.sent_values, self.sent_digest = 0, 0, 0
        # Whether elements have one value per channel (then a batch needs two).
        self.one_value: bool | None = None

    def process(self, element: Any) -> Iterator[Any]:
        value = _element(element, self.spec, self.dtype)
        if self.one_value is None:
            self.one_value = _values_per_channel(value) == 1
        self.buffer.append(value)
        self.digests.append(_digest(value))
        # One value per channel: the end of the bundle holds rows back, and
        # must still have them.
        if len(self.buffer) >= self.batch_size + (3 if self.one_value else 0):
            self._send(self.batch_size)
        return iter(())

    def _send(self, n: int) -> None:
        batch, self.buffer = _stack(self.buffer[:n]), self.buffer[n:]
        digests, self.digests = self.digests[:n], self.digests[n:]
        if self.shard is None:
            self.shard = self.spec.create(self.connected(), _new_shard_id(), _shard_labels(self.target))
        self.shard.forward(batch, train=True)
        self.sent += n
        self.sent_values += n * _values_per_channel(batch[0])
        self.sent_digest = (self.sent_digest + sum(digests)) % _DIGEST_MODULUS

    def finish_bundle(self) -> Iterator[WindowedValue]:
        # One value per channel: send all but two rows (so that the rows held
        # back by all bundles together make a batch), and never a single one.
        left = len(self.buffer)
        send = left - 2 if self.one_value else left
        if send > 1 or (send == 1 and not self.one_value):
            self._send(send)
        for value, digest in zip(self.buffer, self.digests):
            yield _in_global_window(_HeldBack(value, digest))
        if self.shard is not None:
            yield _in_global_window(_Shard(self.shard.session_id, self.sent, self.sent_values, self.sent_digest))
        self.shard, self.buffer, self.digests = None, [], []


CLEANUP = "cleanup"


class _MergeIntoTarget(_Connected):
    """All the shards (and the held-back elements) into one fresh session,
    that one into the target with a request_id hashed from the data; emits
    the target's Statistics, and on the CLEANUP output the sessions to
    delete once this step's output is committed."""

    def __init__(self, server: Server, target: str, spec: SessionSpec | None, labels: dict[str, str]) -> None:
        super().__init__(server)
        self.target, self.given_spec, self.labels = target, spec, labels

    def process(self, parts: Sequence[_Shard | _HeldBack]) -> Iterator[Any]:
        client = self.connected()
        shards = sorted((p for p in parts if isinstance(p, _Shard)), key=lambda s: s.session_id)
        held_back = [p for p in parts if isinstance(p, _HeldBack)]
        if self.given_spec is None:
            target = client.get_session(self.target)
            spec = SessionSpec.of(target.info())
        else:
            spec = self.given_spec
            target = spec.create(client, self.target, self.labels)
        if not shards and not held_back:
            yield Statistics.of(target.info())
            return
        if not shards and len(held_back) == 1:
            raise ValueError("normserve.beam: ComputeStatistics needs at least two values per channel; "
                             "the PCollection has one element, of one value per channel")
        # A fresh session per attempt: a retried attempt builds its own.
        gathered = spec.create(client, _new_shard_id(), _shard_labels(self.target))
        yield beam.pvalue.TaggedOutput(CLEANUP, gathered.session_id)
        for shard in shards:
            try:
                gathered.merge(shard.session_id)
            except normserve.NotFound as error:
                raise RuntimeError(f"normserve.beam: shard {shard.session_id!r} of a committed bundle is gone; "
                                   f"was it deleted, or is the server's idle TTL shorter than the "
                                   f"pipeline?") from error
            yield beam.pvalue.TaggedOutput(CLEANUP, shard.session_id)
        if held_back:
            gathered.forward(_stack([h.value for h in held_back]), train=True)
        # The shards hold what their bundles sent, no more, no less.
        seen = gathered.standard_scaler_statistics().n_samples_seen
        sent = sum(s.values for s in shards) + sum(_values_per_channel(h.value) for h in held_back)
        if seen != sent:
            raise RuntimeError(f"normserve.beam: the shards of session {self.target!r} hold {seen} values per "
                               f"channel, their bundles sent {sent}; was a shard changed during the pipeline?")
        # The data's hash: the same whatever the bundles, the workers and the
        # attempt, so the target adds it once.
        digest = (sum(s.digest for s in shards) + sum(h.digest for h in held_back)) % _DIGEST_MODULUS
        yield Statistics.of(target.merge(gathered.session_id, request_id=f"{REQUEST_ID_PREFIX}{digest:064x}"))


class _DeleteSessions(_Connected):
    def process(self, session_id: str) -> Iterator[Any]:
        try:
            self.connected().delete_session(session_id)
        except normserve.NotFound:
            pass  # deleted by an earlier attempt
        return iter(())


class ComputeStatistics(beam.PTransform):  # type: ignore[misc]
    """The train pass: the exact statistics of every element of the input
    PCollection, added to the exact session `session`. Returns a PCollection
    of one `Statistics`: the session's statistics after the pass.

    Elements: numpy arrays or nested sequences of numbers, one sample each,
    (C,) or (C, L) for kind "1d" (C = num_features), (C, H, W) for "2d",
    (C, D, H, W) for "3d"; converted to the session's dtype. The input is
    taken in the global window (a batch pipeline's).

    server: a `Server`, or an address ("host:port").
    spec, or num_features (kind, dtype, eps, device): the session's
        configuration: it is created with it (affine = False, so that the
        eval pass is exactly (x - mean) / sqrt(var + eps)), or found when it
        exists with the same configuration. Neither: the session must exist
        (created with exact_statistics=True); its configuration is used.
    labels: of the session, when it is created here.
    batch_size: elements per train request (at least 2).
    """

    def __init__(self, session: str, server: Server | str, spec: SessionSpec | None = None, *,
                 num_features: int | None = None, kind: str = "1d", dtype: str = "float32", eps: float = 1e-5,
                 device: str = "", labels: dict[str, str] | None = None, batch_size: int = 1024) -> None:
        super().__init__()
        if spec is None and num_features is not None:
            spec = SessionSpec(num_features, kind=kind, dtype=dtype, eps=eps, device=device)
        if batch_size < 2:
            raise ValueError("ComputeStatistics: batch_size must be at least 2 (batch norm needs two values)")
        self.session = session
        self.server = Server(server) if isinstance(server, str) else server
        self.spec = spec
        self.labels = dict(labels or {})
        self.batch_size = batch_size

    def expand(self, pcoll: Any) -> Any:
        parts = (pcoll
                 | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
                 | "SendBundles" >> beam.ParDo(
                     _SendBundles(self.server, self.session, self.spec, self.batch_size)))
        merged = (parts
                  | "Gather" >> beam.combiners.ToList()
                  | "MergeIntoTarget" >> beam.ParDo(
                      _MergeIntoTarget(self.server, self.session, self.spec, self.labels)
                  ).with_outputs(CLEANUP, main="statistics"))
        # A Reshuffle commits the merge step's output before the deletions
        # run: they are never part of one of its retries.
        _ = (merged[CLEANUP]
             | "AfterMerge" >> beam.Reshuffle()
             | "DeleteShards" >> beam.ParDo(_DeleteSessions(self.server)))
        return merged["statistics"]


class _NormalizeBundles(_Connected):
    """Each bundle's elements through the session's eval forward, in batches."""

    def __init__(self, server: Server, session: str, batch_size: int, keyed: bool) -> None:
        super().__init__(server)
        self.session_id, self.batch_size, self.keyed = session, batch_size, keyed

    def setup(self) -> None:
        super().setup()
        self.session: normserve.Session | None = None

    def _session(self) -> normserve.Session:
        """The session and its dtype, read at first use: on a runner that
        sets DoFns up early, the train pass may not have created it yet."""
        if self.session is None:
            session = self.connected().get_session(self.session_id).eval()
            info = session.initial_info
            assert info is not None, "get_session reads the session"
            if info.dtype not in ("float16", "float32", "float64"):
                raise ValueError(f"normserve.beam: Normalize works on float16, float32 and float64 sessions; "
                                 f"{self.session_id!r} is {info.dtype}")
            self.dtype = np.dtype(info.dtype)
            self.session = session
        return self.session

    def start_bundle(self) -> None:
        self.keys: list[Any] = []
        self.values: list[np.ndarray[Any, Any]] = []
        self.version: int | None = None

    def process(self, element: Any, statistics: Statistics | None = None) -> Iterator[Any]:
        self.version = None if statistics is None else statistics.version
        self._session()
        key, value = element if self.keyed else (None, element)
        self.keys.append(key)
        self.values.append(np.asarray(value, dtype=self.dtype))
        if len(self.values) >= self.batch_size:
            yield from self._flush()

    def _flush(self) -> Iterator[Any]:
        if not self.values:
            return
        batch = _stack(self.values)
        # A copy: the reply's buffer is read-only, and the rows outlive it.
        output = np.array(self._session().forward(batch, train=False, expected_version=self.version))
        keys = self.keys
        self.keys, self.values = [], []
        for key, row in zip(keys, output):
            yield (key, row) if self.keyed else row

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for out in self._flush():
            yield _in_global_window(out)


class Normalize(beam.PTransform):  # type: ignore[misc]
    """The eval pass: every element through the session's eval forward,
    (x - running_mean) / sqrt(running_var + eps) per channel (times weight,
    plus bias, for affine sessions). Elements as ComputeStatistics takes
    them, or (key, element) pairs with keyed=True (the output keeps the
    key); outputs are numpy arrays of the session's dtype.

    statistics: ComputeStatistics' output. The eval pass then waits for the
        train pass and runs only at the version it left the session in
        (normserve.Aborted if the session changed since).
    batch_size: elements per eval request.
    """

    def __init__(self, session: str, server: Server | str, *, statistics: Any = None, keyed: bool = False,
                 batch_size: int = 1024) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("Normalize: batch_size must be at least 1")
        self.session = session
        self.server = Server(server) if isinstance(server, str) else server
        self.statistics = statistics
        self.keyed = keyed
        self.batch_size = batch_size

    def expand(self, pcoll: Any) -> Any:
        fn = _NormalizeBundles(self.server, self.session, self.batch_size, self.keyed)
        windowed = pcoll | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
        if self.statistics is None:
            return windowed | "Normalize" >> beam.ParDo(fn)
        return windowed | "Normalize" >> beam.ParDo(fn, statistics=beam.pvalue.AsSingleton(self.statistics))


def delete_shards(client: Client, session: str) -> list[str]:
    """Deletes the shard sessions the transforms left beside `session` (those
    of failed bundles and attempts) and returns their ids. Not while a pipeline on
    `session` runs: its shards would go too."""
    deleted = []
    for info in list(client.list_sessions(_shard_labels(session))):
        try:
            client.delete_session(info.session_id)
        except normserve.NotFound:
            continue
        deleted.append(info.session_id)
    return deleted
