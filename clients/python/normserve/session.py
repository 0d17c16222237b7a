"""Sessions: one `torch.nn.BatchNorm{1,2,3}d` layer living in the server.

`Session` is a handle (an id and a client) with the layer's operations;
`SessionInfo` is a snapshot of a session's configuration and state as the
server returned it.
"""

import collections
import dataclasses
import datetime
import functools
import uuid

import grpc
import numpy as np

from normserve import codec, errors
from normserve.v1 import batch_norm_pb2 as bn

KINDS = {"1d": bn.BATCH_NORM_1D, "2d": bn.BATCH_NORM_2D, "3d": bn.BATCH_NORM_3D}
KIND_NAMES = {value: name for name, value in KINDS.items()}
# The keys of `module.state_dict()`, in PyTorch's order.
STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
TENSOR_KEYS = STATE_KEYS[:4]


class _Unset:
    def __repr__(self):
        return "UNSET"


UNSET = _Unset()


def kind_value(kind):
    """BatchNormKind of "1d"/"2d"/"3d" (or 1/2/3, the enum values)."""
    if isinstance(kind, str) and kind.lower() in KINDS:
        return KINDS[kind.lower()]
    if isinstance(kind, int) and not isinstance(kind, bool) and kind in KIND_NAMES:
        return kind
    raise ValueError(f"unknown batch norm kind {kind!r}: expected '1d', '2d' or '3d'")


def _timestamp(message, field):
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=datetime.timezone.utc)


def _optional_tensor(message, field):
    return codec.decode(getattr(message, field)) if message.HasField(field) else None


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
    # None: PyTorch's momentum=None, the cumulative moving average.
    momentum: float | None
    affine: bool
    track_running_stats: bool
    dtype: str
    # The mode forwards use when they do not choose one (`module.training`).
    training: bool
    reject_non_finite: bool
    labels: dict
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
    def from_proto(cls, session, replayed=False):
        config = session.config
        return cls(
            session_id=session.session_id,
            kind=KIND_NAMES.get(config.kind, str(config.kind)),
            num_features=config.num_features,
            eps=config.eps,
            momentum=None if config.cumulative_average else config.momentum,
            affine=config.affine,
            track_running_stats=config.track_running_stats,
            dtype=codec.DTYPE_NAMES.get(config.param_dtype, str(config.param_dtype)),
            training=config.default_mode != bn.MODE_EVAL,
            reject_non_finite=config.reject_non_finite,
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
    def weight(self):
        return _optional_tensor(self.proto, "weight")

    @functools.cached_property
    def bias(self):
        return _optional_tensor(self.proto, "bias")

    @functools.cached_property
    def running_mean(self):
        return _optional_tensor(self.proto, "running_mean")

    @functools.cached_property
    def running_var(self):
        return _optional_tensor(self.proto, "running_var")

    def __eq__(self, other):
        if not isinstance(other, SessionInfo):
            return NotImplemented
        return (self.proto, self.replayed) == (other.proto, other.replayed)

    __hash__ = None

    def state_dict(self):
        """This snapshot as `module.state_dict()`: an OrderedDict of torch
        tensors with PyTorch's key names (needs torch)."""
        torch = codec._torch()
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

    output: object
    version: int
    num_batches_tracked: int
    replayed: bool


@dataclasses.dataclass(frozen=True)
class StateExport:
    """`module.state_dict()` as safetensors bytes, and the version it is of."""

    safetensors: bytes
    version: int


def tensor_or_none(message, field, value):
    if value is not None:
        getattr(message, field).CopyFrom(codec.encode(value))


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError("state_dict()/load_state_dict() need safetensors (pip install safetensors); "
                          "export_state()/import_state() work on the bytes without it") from error
    return safetensors.torch


def state_dict_from_safetensors(blob):
    """An exported state as `module.state_dict()`: torch tensors in PyTorch's
    key order."""
    loaded = _safetensors_torch().load(blob)
    return collections.OrderedDict((key, loaded[key]) for key in STATE_KEYS if key in loaded)


class Session:
    """A handle on one session of a normserve server.

    Like an `nn.BatchNorm` module it has a mode: `train()` / `eval()` set the
    mode of the forwards that do not choose one (initially the session's
    default mode). Mutating calls take `expected_version` (apply only at that
    version, else `Aborted`) and `request_id` (a retry of an applied id is
    answered with the original result, `replayed` set, instead of being
    applied twice). With a client made with `retries > 0`, mutating calls get
    a fresh request_id when none is given, so that retries are safe.
    """

    def __init__(self, client, session_id, *, training=True, already_existed=False, initial_info=None):
        self.client = client
        self.session_id = session_id
        self.training = training
        # True when create_session found the session with the same
        # configuration and returned it as it was.
        self.already_existed = already_existed
        # The SessionInfo of the call that made this handle.
        self.initial_info = initial_info

    def __repr__(self):
        mode = "train" if self.training else "eval"
        return f"Session({self.session_id!r}, {mode})"

    def __eq__(self, other):
        return (isinstance(other, Session) and other.client is self.client
                and other.session_id == self.session_id)

    def __hash__(self):
        return hash(self.session_id)

    def __reduce_ex__(self, protocol):
        raise TypeError(f"a Session handle holds a connection and cannot be copied or pickled; pass its "
                        f"session_id ({self.session_id!r}) and use client.get_session(session_id)")

    # ------------------------------------------------------------- mode

    def train(self, mode=True):
        """Sets the mode of forwards that do not choose one; returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """`train(False)`; returns self."""
        return self.train(False)

    def _mode(self, train):
        training = self.training if train is None else bool(train)
        return bn.MODE_TRAIN if training else bn.MODE_EVAL

    def _request_id(self, request_id):
        if request_id is None and self.client.retries > 0:
            return uuid.uuid4().hex
        return request_id or ""

    # ---------------------------------------------------------- forward

    def forward(self, x, train=None, *, expected_version=None, request_id=None):
        """The layer applied to `x`: `module.train()(x)` for `train=True`,
        `module.eval()(x)` for `train=False`, the handle's mode for None.

        `x` is a numpy array or a torch tensor, (N, C[, spatial...]); the
        output has its type, dtype, shape and (torch) device. A numpy output
        is a read-only view of the reply (`np.array(y)` copies it)."""
        if self._mode(train) == bn.MODE_TRAIN:
            request_id = self._request_id(request_id)
        result = self.forward_result(x, train, expected_version=expected_version, request_id=request_id)
        if result.output is None:
            raise errors.ReplayWithoutOutput(request_id, result.version, result.num_batches_tracked)
        return result.output

    __call__ = forward

    def forward_result(self, x, train=None, *, expected_version=None, request_id=None):
        """`forward`, with the version and num_batches_tracked after it and
        the replay flag (a ForwardResult)."""
        mode = self._mode(train)
        if mode == bn.MODE_TRAIN:
            request_id = self._request_id(request_id)
        request = bn.ForwardRequest(session_id=self.session_id, mode=mode, request_id=request_id or "")
        if expected_version is not None:
            request.expected_version = expected_version
        # Eval changes nothing, and a train step with an id is applied once.
        safe = mode == bn.MODE_EVAL or bool(request_id)
        reply = self.client._call(self.client._forward, codec.SplicedRequest(request, "input", x), retry=safe)
        output = codec.decode_like(reply.output, x) if reply.HasField("output") else None
        return ForwardResult(output, reply.version, reply.num_batches_tracked, reply.replayed)

    def forward_stream(self, inputs, train=None, *, return_exceptions=False):
        """Forwards every input of an iterable on one bidirectional stream and
        yields the outputs in order, as `forward` would return them; inputs
        are read as the stream goes (a generator may produce them lazily).

        A request the server refuses is answered in-band and the stream goes
        on: by default its error is raised (ending the iteration); with
        `return_exceptions=True` the exception is yielded in its place (its
        `index` says which input it answers) and the outputs keep coming."""
        mode = self._mode(train)
        pending = collections.deque()  # how to decode each reply, in order
        failed = []

        def requests():
            for x in inputs:
                try:
                    request = codec.SplicedRequest(bn.ForwardRequest(session_id=self.session_id, mode=mode),
                                                   "input", x)
                except Exception as error:  # end the stream; re-raised below, in order
                    failed.append(error)
                    return
                pending.append(x if codec.is_torch_tensor(x) else None)
                yield request

        replies = self.client._forward_stream(requests(), metadata=self.client.metadata)
        try:
            for reply in replies:
                like = pending.popleft()
                if reply.HasField("error"):
                    error = errors.from_status(reply.error.code, reply.error.message)
                    error.index = reply.index
                    if not return_exceptions:
                        raise error
                    yield error
                else:
                    yield codec.decode_like(reply.response.output, like)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from error
        finally:
            replies.cancel()  # a no-op once the stream is complete
        if failed:
            raise failed[0]

    # ------------------------------------------------------ state and config

    def info(self):
        """The session's configuration and state now (SessionInfo)."""
        reply = self.client._call(self.client.stubs.batch_norm.GetSession,
                                  bn.GetSessionRequest(session_id=self.session_id), retry=True)
        return SessionInfo.from_proto(reply.session)

    def reset_running_stats(self, *, expected_version=None, request_id=None):
        """`module.reset_running_stats()`: running_mean 0, running_var 1,
        num_batches_tracked 0; weight and bias are kept."""
        request_id = self._request_id(request_id)
        request = bn.ResetRunningStatsRequest(session_id=self.session_id, request_id=request_id)
        if expected_version is not None:
            request.expected_version = expected_version
        reply = self.client._call(self.client.stubs.batch_norm.ResetRunningStats, request,
                                  retry=bool(request_id))
        return SessionInfo.from_proto(reply.session, reply.replayed)

    def update_parameters(self, *, weight=None, bias=None, running_mean=None, running_var=None,
                          num_batches_tracked=None, eps=None, momentum=UNSET, expected_version=None,
                          request_id=None):
        """Sets any of the tensors (shape (C,), converted to the session dtype),
        num_batches_tracked, eps and momentum (None: the cumulative average),
        validated as `load_state_dict` validates; all or nothing."""
        request_id = self._request_id(request_id)
        request = bn.UpdateParametersRequest(session_id=self.session_id, request_id=request_id)
        for field, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                             ("running_var", running_var)):
            tensor_or_none(request, field, value)
        if num_batches_tracked is not None:
            request.num_batches_tracked = int(num_batches_tracked)
        if eps is not None:
            request.eps = float(eps)
        if momentum is None:
            request.cumulative_average = True
        elif momentum is not UNSET:
            request.momentum = float(momentum)
        if expected_version is not None:
            request.expected_version = expected_version
        reply = self.client._call(self.client.stubs.batch_norm.UpdateParameters, request,
                                  retry=bool(request_id))
        return SessionInfo.from_proto(reply.session, reply.replayed)

    def export_state(self):
        """`module.state_dict()` as safetensors bytes, with its version (StateExport)."""
        reply = self.client._call(self.client.stubs.batch_norm.ExportState,
                                  bn.ExportStateRequest(session_id=self.session_id), retry=True)
        return StateExport(reply.safetensors, reply.version)

    def import_state(self, safetensors, *, strict=True, expected_version=None, request_id=None):
        """`module.load_state_dict(...)` from safetensors bytes. Strict by
        default (missing/unexpected keys fail with load_state_dict's text);
        nothing is loaded unless everything is valid."""
        request_id = self._request_id(request_id)
        request = bn.ImportStateRequest(session_id=self.session_id, safetensors=bytes(safetensors),
                                        strict=strict, request_id=request_id)
        if expected_version is not None:
            request.expected_version = expected_version
        reply = self.client._call(self.client.stubs.batch_norm.ImportState, request, retry=bool(request_id))
        return SessionInfo.from_proto(reply.session, reply.replayed)

    def state_dict(self):
        """`module.state_dict()`: an OrderedDict of CPU torch tensors with
        PyTorch's key names and order; `nn.BatchNorm*d.load_state_dict`
        accepts it (needs torch and safetensors)."""
        return state_dict_from_safetensors(self.export_state().safetensors)

    def load_state_dict(self, state_dict, strict=True, *, expected_version=None, request_id=None):
        """`module.load_state_dict(state_dict)`: torch tensors (or numpy
        arrays) by PyTorch's key names, e.g. another module's state_dict().
        Unlike PyTorch, nothing is loaded when anything is invalid."""
        torch = codec._torch()
        tensors = {}
        for key, value in state_dict.items():
            tensor = value if codec.is_torch_tensor(value) else torch.tensor(np.asarray(value))
            tensors[key] = tensor.detach().cpu().contiguous()
        blob = _safetensors_torch().save(tensors)
        return self.import_state(blob, strict=strict, expected_version=expected_version, request_id=request_id)

    def delete(self, *, expected_version=None):
        """Deletes the session and its state."""
        self.client.delete_session(self.session_id, expected_version=expected_version)
