"""What the calls return, for the blocking and the asyncio client alike:
snapshots of sessions (SessionInfo), forward results, exported states and
the server's facts (ServerInfo), each built from the server's reply; and
the conversions between PyTorch state dicts and what the server stores.
No I/O here."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from normserve import codec
from normserve.codec import Array
from normserve.v1 import batch_norm_pb2 as bn, server_pb2

if TYPE_CHECKING:
    import torch

KINDS = {"1d": bn.BATCH_NORM_1D, "2d": bn.BATCH_NORM_2D, "3d": bn.BATCH_NORM_3D}
KIND_NAMES = {value: name for name, value in KINDS.items()}
# The keys of `module.state_dict()`, in PyTorch's order.
STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
TENSOR_KEYS = STATE_KEYS[:4]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


# "Not given", where None means something (momentum=None: the cumulative average).
UNSET = _Unset()


def kind_value(kind: str | int) -> int:
    """BatchNormKind of "1d"/"2d"/"3d" (or 1/2/3, the enum values)."""
    if isinstance(kind, str) and kind.lower() in KINDS:
        return KINDS[kind.lower()]
    if isinstance(kind, int) and not isinstance(kind, bool) and kind in KIND_NAMES:
        return kind
    raise ValueError(f"unknown batch norm kind {kind!r}: expected '1d', '2d' or '3d'")


def _timestamp(message: bn.Session, field: str) -> datetime.datetime | None:
    if not message.HasField(field):
        return None
    value: datetime.datetime = getattr(message, field).ToDatetime(tzinfo=datetime.timezone.utc)
    return value


def _optional_tensor(message: bn.Session, field: str) -> Array | None:
    return codec.decode(getattr(message, field)) if message.HasField(field) else None


@dataclasses.dataclass(frozen=True)
class StandardScalerStatistics:
    """An exact session's statistics as scikit-learn `StandardScaler`
    attributes (float64 arrays of shape (C,)):

    mean: `mean_`, the session's running_mean.
    var: `var_`, the population variance (ddof = 0) of every value seen,
        correctly rounded from the exact sums.
    scale: `scale_`, what the session's eval forward divides by:
        sqrt(running_var + eps), with the session's unbiased running_var.
        So `(x - mean) / scale` is the eval forward of an affine = false
        session (up to rounding), and scale is not sqrt(var).
    n_samples_seen: `n_samples_seen_`, values seen per channel.
    """

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray
    n_samples_seen: int

    @classmethod
    def from_proto(cls, message: bn.StandardScalerStatistics) -> StandardScalerStatistics:
        def array(values: Any) -> np.ndarray:
            out = np.array(values, dtype=np.float64)
            out.flags.writeable = False
            return out

        return cls(array(message.mean), array(message.var), array(message.scale), int(message.n_samples_seen))

    def to_sklearn(self) -> Any:
        """A fitted `sklearn.preprocessing.StandardScaler` with these
        attributes (with_mean and with_std true): its `transform(X)` of an
        (N, C) array is the session's eval forward with affine = false.
        ImportError without scikit-learn."""
        try:
            # Imported by name: scikit-learn is optional and ships no type stubs.
            preprocessing = importlib.import_module("sklearn.preprocessing")
        except ImportError as error:
            raise ImportError("standard_scaler() needs scikit-learn (pip install scikit-learn); "
                              "standard_scaler_statistics() gives the same attributes as numpy "
                              "arrays without it") from error
        scaler = preprocessing.StandardScaler()
        scaler.mean_ = np.array(self.mean)
        scaler.var_ = np.array(self.var)
        scaler.scale_ = np.array(self.scale)
        scaler.n_samples_seen_ = np.int64(self.n_samples_seen)
        scaler.n_features_in_ = len(self.mean)
        return scaler


@dataclasses.dataclass(frozen=True, eq=False)
class SessionInfo:
    """A session's configuration and state, as one reply carried it.

    `weight`, `bias`, `running_mean` and `running_var` are numpy arrays
    (read-only views of the reply), except for bfloat16 sessions, whose
    tensors are torch.bfloat16 tensors (numpy has no bfloat16); they are
    decoded on first access, and None where the layer has no such tensor (no
    `affine`, no `track_running_stats`) or the reply carried no tensors
    (`list_sessions` without `include_tensors`). Two snapshots are equal
    when the server's messages are.
    """

    session_id: str
    kind: str
    num_features: int
    eps: float
    # None: PyTorch's momentum=None, the cumulative moving average (or, with
    # exact_statistics, no moving average at all).
    momentum: float | None
    affine: bool
    track_running_stats: bool
    dtype: str
    # The mode forwards use when they do not choose one (`module.training`).
    training: bool
    reject_non_finite: bool
    # Exact statistics (running_mean/running_var of every value seen, from
    # exact sums; see Client.create_session).
    exact_statistics: bool
    labels: dict[str, str]
    # "cpu" or "cuda:N".
    device: str
    # 1 after creation, +1 per mutation; send it as `expected_version`.
    version: int
    num_batches_tracked: int
    created_at: datetime.datetime | None
    updated_at: datetime.datetime | None
    # Last use (not GetSession/ListSessions); the server's idle TTL counts from it.
    last_used_at: datetime.datetime | None
    # True when this answers a request_id that had already been applied.
    replayed: bool
    # The server's message, for anything the fields above leave out.
    proto: bn.Session = dataclasses.field(repr=False)

    @classmethod
    def from_proto(cls, session: bn.Session, replayed: bool = False) -> SessionInfo:
        config = session.config
        return cls(
            session_id=session.session_id,
            kind=KIND_NAMES.get(config.kind, str(config.kind)),
            num_features=config.num_features,
            eps=config.eps,
            momentum=config.momentum if config.HasField("momentum") else None,
            affine=config.affine,
            track_running_stats=config.track_running_stats,
            dtype=codec.DTYPE_NAMES.get(config.param_dtype, str(config.param_dtype)),
            training=config.default_mode != bn.MODE_EVAL,
            reject_non_finite=config.reject_non_finite,
            exact_statistics=config.exact_statistics,
            labels=dict(config.labels),
            device=session.device,
            version=session.version,
            num_batches_tracked=session.num_batches_tracked,
            created_at=_timestamp(session, "created_at"),
            updated_at=_timestamp(session, "updated_at"),
            last_used_at=_timestamp(session, "last_used_at"),
            replayed=replayed,
            proto=session,
        )

    # Decoded on first access (a bfloat16 tensor needs torch).
    @functools.cached_property
    def weight(self) -> Array | None:
        return _optional_tensor(self.proto, "weight")

    @functools.cached_property
    def bias(self) -> Array | None:
        return _optional_tensor(self.proto, "bias")

    @functools.cached_property
    def running_mean(self) -> Array | None:
        return _optional_tensor(self.proto, "running_mean")

    @functools.cached_property
    def running_var(self) -> Array | None:
        return _optional_tensor(self.proto, "running_var")

    @functools.cached_property
    def standard_scaler(self) -> StandardScalerStatistics | None:
        """An exact session's statistics as StandardScaler attributes; None
        for other sessions, or when the reply carried no tensors."""
        if not self.proto.HasField("standard_scaler"):
            return None
        return StandardScalerStatistics.from_proto(self.proto.standard_scaler)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionInfo):
            return NotImplemented
        return (self.proto, self.replayed) == (other.proto, other.replayed)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking snapshots are not dict keys

    def state_dict(self) -> collections.OrderedDict[str, torch.Tensor]:
        """This snapshot as `module.state_dict()`: an OrderedDict of torch
        tensors with PyTorch's key names (needs torch)."""
        torch = codec.import_torch()
        wanted = [key for key in TENSOR_KEYS
                  if (self.affine if key in ("weight", "bias") else self.track_running_stats)]
        missing = [key for key in wanted if not self.proto.HasField(key)]
        if missing:
            raise ValueError(f"this snapshot of session {self.session_id!r} carries no tensors "
                             f"(missing {', '.join(missing)}); list with include_tensors=True")
        state = collections.OrderedDict(
            (key, codec.to_torch(getattr(self.proto, key))) for key in wanted)
        if self.track_running_stats:
            state["num_batches_tracked"] = torch.tensor(self.num_batches_tracked, dtype=torch.long)
        return state


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    """One forward: the output (None only in a replay whose output the server
    no longer holds), the session version and num_batches_tracked after it,
    and whether it was a replay of an already applied request_id."""

    output: Array | None
    version: int
    num_batches_tracked: int
    replayed: bool


@dataclasses.dataclass(frozen=True)
class StateExport:
    """`module.state_dict()` as safetensors bytes, and the version it is of."""

    safetensors: bytes
    version: int


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str
    description: str
    total_memory_bytes: int


@dataclasses.dataclass(frozen=True)
class Limits:
    max_sessions: int
    max_tensor_elements: int
    max_num_features: int
    max_message_bytes: int
    # Shared memory (0 when off): the server-wide cap on mapped bytes, and
    # the bytes and regions mapped now (0 for a user of a server with tokens).
    shared_memory_max_bytes: int = 0
    shared_memory_mapped_bytes: int = 0
    shared_memory_regions: int = 0


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """Facts about the running server (GetServerInfo)."""

    server_version: str
    libtorch_version: str
    default_device: str
    devices: tuple[DeviceInfo, ...]
    cuda_device_count: int
    limits: Limits
    features: tuple[str, ...]
    intra_op_threads: int
    compute_threads: int
    sessions: int
    unreadable_sessions: int
    store: str
    proto: server_pb2.GetServerInfoResponse = dataclasses.field(repr=False)

    @classmethod
    def from_proto(cls, reply: server_pb2.GetServerInfoResponse) -> ServerInfo:
        limits = reply.limits
        return cls(
            server_version=reply.server_version,
            libtorch_version=reply.libtorch_version,
            default_device=reply.default_device,
            devices=tuple(DeviceInfo(d.name, d.description, d.total_memory_bytes) for d in reply.devices),
            cuda_device_count=reply.cuda_device_count,
            limits=Limits(limits.max_sessions, limits.max_tensor_elements, limits.max_num_features,
                          limits.max_message_bytes, limits.shared_memory_max_bytes,
                          limits.shared_memory_mapped_bytes, limits.shared_memory_regions),
            features=tuple(reply.features),
            intra_op_threads=reply.intra_op_threads,
            compute_threads=reply.compute_threads,
            sessions=reply.sessions,
            unreadable_sessions=reply.unreadable_sessions,
            store=reply.store,
            proto=reply,
        )


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError("state_dict()/load_state_dict() need safetensors (pip install safetensors); "
                          "export_state()/import_state() work on the bytes without it") from error
    return safetensors.torch


def state_dict_from_safetensors(blob: bytes) -> collections.OrderedDict[str, torch.Tensor]:
    """An exported state as `module.state_dict()`: torch tensors in PyTorch's
    key order."""
    loaded = _safetensors_torch().load(blob)
    return collections.OrderedDict((key, loaded[key]) for key in STATE_KEYS if key in loaded)


def safetensors_from_state_dict(state_dict: Mapping[str, Array]) -> bytes:
    """`module.state_dict()` (torch tensors, or numpy arrays, by PyTorch's key
    names) as the safetensors bytes the server imports."""
    torch = codec.import_torch()
    tensors = {}
    for key, value in state_dict.items():
        tensor = value if codec.is_torch_tensor(value) else torch.tensor(np.asarray(value))
        tensors[key] = tensor.detach().cpu().contiguous()
    blob: bytes = _safetensors_torch().save(tensors)
    return blob


def module_kind(module: Any) -> str:
    """"1d", "2d" or "3d": the kind of a torch.nn.BatchNorm{1,2,3}d."""
    torch = codec.import_torch()
    for kind, cls in (("1d", torch.nn.BatchNorm1d), ("2d", torch.nn.BatchNorm2d), ("3d", torch.nn.BatchNorm3d)):
        if isinstance(module, cls):
            return kind
    raise TypeError(f"expected a torch.nn.BatchNorm1d, BatchNorm2d or BatchNorm3d, got {type(module).__name__}")
