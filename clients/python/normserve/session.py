"""Sessions: one `torch.nn.BatchNorm{1,2,3}d` layer living in the server.

`Session` is a handle (an id and a client) with the layer's operations;
`SessionInfo` (normserve.results) is a snapshot of a session's
configuration and state as the server returned it. `SessionHandle` is what
the blocking Session and the asyncio one (normserve.aio.Session) share: the
id, the mode, identity.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar

import grpc

from normserve import cuda_ipc, errors, protocol, shm as shm_module
from normserve.codec import Array
from normserve.results import (  # noqa: F401  (re-exported: normserve.session.STATE_KEYS, ...)
    KIND_NAMES,
    KINDS,
    STATE_KEYS,
    TENSOR_KEYS,
    UNSET,
    ForwardResult,
    SessionInfo,
    StandardScalerStatistics,
    StateExport,
    _Unset,
    kind_value,
    safetensors_from_state_dict,
    state_dict_from_safetensors,
)

if TYPE_CHECKING:
    import torch

    from normserve.client import Client


class _RetryingClient(Protocol):
    retries: int


C = TypeVar("C", bound=_RetryingClient)
H = TypeVar("H", bound="SessionHandle[Any]")


class SessionHandle(Generic[C]):
    """What a handle on a session is, blocking or asyncio: the session's id
    on a client, and the mode (`train()` / `eval()`) of the forwards that do
    not choose one, initially the session's default mode."""

    def __init__(self, client: C, session_id: str, *, training: bool = True, already_existed: bool = False,
                 initial_info: SessionInfo | None = None) -> None:
        self.client = client
        self.session_id = session_id
        self.training = training
        # True when create_session found the session with the same
        # configuration and returned it as it was.
        self.already_existed = already_existed
        # The SessionInfo of the call that made this handle.
        self.initial_info = initial_info

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return f"{type(self).__name__}({self.session_id!r}, {mode})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SessionHandle) and other.client is self.client
                and other.session_id == self.session_id)

    def __hash__(self) -> int:
        return hash(self.session_id)

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(f"a Session handle holds a connection and cannot be copied or pickled; pass its "
                        f"session_id ({self.session_id!r}) and use client.get_session(session_id)")

    def train(self: H, mode: bool = True) -> H:
        """Sets the mode of forwards that do not choose one; returns self."""
        self.training = bool(mode)
        return self

    def eval(self: H) -> H:
        """`train(False)`; returns self."""
        return self.train(False)

    def _training(self, train: bool | None) -> bool:
        return self.training if train is None else bool(train)

    def _request_id(self, request_id: str | None) -> str:
        return protocol.request_id_for(request_id, self.client.retries)

    def _forward_call(self, x: Array, train: bool | None, expected_version: int | None,
                      request_id: str | None) -> tuple[protocol.Call[ForwardResult], str]:
        training = self._training(train)
        request_id = self._request_id(request_id) if training else (request_id or "")
        return protocol.forward(self.session_id, x, training, expected_version=expected_version,
                                request_id=request_id), request_id


class Session(SessionHandle["Client"]):
    """A handle on one session of a normserve server.

    Like an `nn.BatchNorm` module it has a mode: `train()` / `eval()` set the
    mode of the forwards that do not choose one (initially the session's
    default mode). Mutating calls take `expected_version` (apply only at that
    version, else `Aborted`) and `request_id` (a retry of an applied id is
    answered with the original result, `replayed` set, instead of being
    applied twice). With a client made with `retries > 0`, mutating calls get
    a fresh request_id when none is given, so that retries are safe.
    """

    # ---------------------------------------------------------- forward

    def forward(self, x: Array, train: bool | None = None, *, expected_version: int | None = None,
                request_id: str | None = None, shm: bool = False, out: Array | None = None) -> Array:
        """The layer applied to `x`: `module.train()(x)` for `train=True`,
        `module.eval()(x)` for `train=False`, the handle's mode for None.

        `x` is a numpy array or a torch tensor, (N, C[, spatial...]); the
        output has its type, dtype, shape and (torch) device. A numpy output
        is a read-only view of the reply (`np.array(y)` copies it).

        `shm=True` (server on this host) passes the tensors through shared
        memory instead of gRPC (normserve.shm): numpy arrays and CPU tensors;
        the output is a fresh array, or `out` (an array from
        `client.shared_array`, which the server writes in place). A CUDA
        tensor goes through CUDA IPC (normserve.cuda_ipc): the server reads
        it in place on its device and writes a fresh tensor on that device,
        or `out` (a CUDA tensor; `out=x` normalizes in place)."""
        if shm or out is not None:
            result, request_id = self._forward_shared(x, train, expected_version, request_id, out)
            return protocol.forward_output(result, request_id)
        call, request_id = self._forward_call(x, train, expected_version, request_id)
        return protocol.forward_output(self.client._run(call), request_id)

    def _forward_shared(self, x: Array, train: bool | None, expected_version: int | None,
                        request_id: str | None, out: Array | None) -> tuple[ForwardResult, str]:
        training = self._training(train)
        request_id = self._request_id(request_id) if training else (request_id or "")
        pool = self.client.shared_memory
        if cuda_ipc.is_cuda_tensor(x) or cuda_ipc.is_cuda_tensor(out):
            return self._forward_cuda(x, training, expected_version, request_id, out), request_id
        shared = shm_module.SharedCall(pool, x, out)
        try:
            call = protocol.forward_shared(self.session_id, shared.header, training, shared.input_range,
                                           shared.output_range, expected_version=expected_version,
                                           request_id=request_id)
            try:
                result, written = self.client._run(call)
            except errors.NormserveError as error:
                if not shm_module.is_region_gone(error):
                    raise
                pool.reregister()
                result, written = self.client._run(call)
            output = shared.output() if written else None
            return ForwardResult(output, result.version, result.num_batches_tracked, result.replayed), request_id
        finally:
            shared.finish()

    def _forward_cuda(self, x: Array, training: bool, expected_version: int | None,
                      request_id: str, out: Array | None) -> ForwardResult:
        if not cuda_ipc.is_cuda_tensor(x):
            raise ValueError("out: a CUDA tensor needs a CUDA input (on its device)")
        pool = self.client.shared_memory.cuda
        shared = cuda_ipc.CudaCall(pool, x, out)
        call = protocol.forward_shared(self.session_id, shared.header, training, shared.input_range,
                                       shared.output_range, expected_version=expected_version,
                                       request_id=request_id)
        try:
            result, written = self.client._run(call)
        except errors.NormserveError as error:
            if not shm_module.is_region_gone(error):
                raise
            pool.reregister()
            shared = cuda_ipc.CudaCall(pool, x, out)
            call = protocol.forward_shared(self.session_id, shared.header, training, shared.input_range,
                                           shared.output_range, expected_version=expected_version,
                                           request_id=request_id)
            result, written = self.client._run(call)
        output = shared.output() if written else None
        return ForwardResult(output, result.version, result.num_batches_tracked, result.replayed)

    __call__ = forward

    def forward_result(self, x: Array, train: bool | None = None, *, expected_version: int | None = None,
                       request_id: str | None = None, shm: bool = False,
                       out: Array | None = None) -> ForwardResult:
        """`forward`, with the version and num_batches_tracked after it and
        the replay flag (a ForwardResult)."""
        if shm or out is not None:
            return self._forward_shared(x, train, expected_version, request_id, out)[0]
        call, _ = self._forward_call(x, train, expected_version, request_id)
        return self.client._run(call)

    def forward_stream(self, inputs: Iterable[Array], train: bool | None = None, *,
                       return_exceptions: bool = False, shm: bool = False) -> Iterator[Any]:
        """Forwards every input of an iterable on one bidirectional stream and
        yields the outputs in order, as `forward` would return them; inputs
        are read as the stream goes (a generator may produce them lazily).

        A request the server refuses is answered in-band and the stream goes
        on: by default its error is raised (ending the iteration); with
        `return_exceptions=True` the exception is yielded in its place (its
        `index` says which input it answers) and the outputs keep coming.

        `shm=True`: each input and output through shared memory, as
        `forward(x, shm=True)` (at most the pool's scratch objects in flight)."""
        if shm:
            yield from self._forward_stream_shared(inputs, self._training(train), return_exceptions)
            return
        stream = protocol.StreamRequests(self.session_id, self._training(train))
        replies = self.client._forward_stream(stream.requests(inputs), metadata=self.client.metadata)
        try:
            for reply in replies:
                output = stream.reply(reply)
                if isinstance(output, errors.NormserveError) and not return_exceptions:
                    raise output
                yield output
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from error
        finally:
            replies.cancel()  # a no-op once the stream is complete
        if stream.failed:
            raise stream.failed[0]

    def _forward_stream_shared(self, inputs: Iterable[Array], training: bool,
                               return_exceptions: bool) -> Iterator[Any]:
        pool = self.client.shared_memory
        pending: collections.deque[shm_module.SharedCall] = collections.deque()
        failed: list[Exception] = []

        def requests() -> Iterator[Any]:
            for x in inputs:
                try:
                    shared = shm_module.SharedCall(pool, x, None)
                except Exception as error:  # raised after the replies before it
                    failed.append(error)
                    return
                pending.append(shared)
                yield protocol.forward_shared_request(self.session_id, shared.header, training,
                                                      shared.input_range, shared.output_range)

        replies = self.client._forward_stream(requests(), metadata=self.client.metadata)
        try:
            for reply in replies:
                shared = pending.popleft()
                try:
                    if reply.HasField("error"):
                        error = errors.from_status(reply.error.code, reply.error.message)
                        error.index = reply.index
                        if not return_exceptions:
                            raise error
                        yield error
                    else:
                        yield shared.output()
                finally:
                    shared.finish()
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from error
        finally:
            replies.cancel()
            while pending:
                pending.popleft().finish()
        if failed:
            raise failed[0]

    # ------------------------------------------------------ state and config

    def info(self) -> SessionInfo:
        """The session's configuration and state now (SessionInfo)."""
        return self.client._run(protocol.get_session(self.session_id))

    def reset_running_stats(self, *, expected_version: int | None = None,
                            request_id: str | None = None) -> SessionInfo:
        """`module.reset_running_stats()`: running_mean 0, running_var 1,
        num_batches_tracked 0; weight and bias are kept."""
        return self.client._run(protocol.reset_running_stats(
            self.session_id, expected_version=expected_version, request_id=self._request_id(request_id)))

    def update_parameters(self, *, weight: Array | None = None, bias: Array | None = None,
                          running_mean: Array | None = None, running_var: Array | None = None,
                          num_batches_tracked: int | None = None, eps: float | None = None,
                          momentum: float | None | _Unset = UNSET, expected_version: int | None = None,
                          request_id: str | None = None) -> SessionInfo:
        """Sets any of the tensors (shape (C,), converted to the session dtype),
        num_batches_tracked, eps and momentum (None: the cumulative average),
        validated as `load_state_dict` validates; all or nothing."""
        return self.client._run(protocol.update_parameters(
            self.session_id, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
            num_batches_tracked=num_batches_tracked, eps=eps, momentum=momentum,
            expected_version=expected_version, request_id=self._request_id(request_id)))

    def export_state(self) -> StateExport:
        """`module.state_dict()` as safetensors bytes, with its version (StateExport)."""
        return self.client._run(protocol.export_state(self.session_id))

    def import_state(self, safetensors: bytes, *, strict: bool = True, expected_version: int | None = None,
                     request_id: str | None = None) -> SessionInfo:
        """`module.load_state_dict(...)` from safetensors bytes. Strict by
        default (missing/unexpected keys fail with load_state_dict's text);
        nothing is loaded unless everything is valid."""
        return self.client._run(protocol.import_state(
            self.session_id, safetensors, strict=strict, expected_version=expected_version,
            request_id=self._request_id(request_id)))

    def state_dict(self) -> collections.OrderedDict[str, torch.Tensor]:
        """`module.state_dict()`: an OrderedDict of CPU torch tensors with
        PyTorch's key names and order; `nn.BatchNorm*d.load_state_dict`
        accepts it (needs torch and safetensors)."""
        return state_dict_from_safetensors(self.export_state().safetensors)

    def load_state_dict(self, state_dict: Mapping[str, Array], strict: bool = True, *,
                        expected_version: int | None = None, request_id: str | None = None) -> SessionInfo:
        """`module.load_state_dict(state_dict)`: torch tensors (or numpy
        arrays) by PyTorch's key names, e.g. another module's state_dict().
        Unlike PyTorch, nothing is loaded when anything is invalid."""
        return self.import_state(safetensors_from_state_dict(state_dict), strict=strict,
                                 expected_version=expected_version, request_id=request_id)

    # ------------------------------------------------- exact statistics

    def merge(self, source: SessionHandle[Any] | str, *, expected_version: int | None = None,
              request_id: str | None = None) -> SessionInfo:
        """Adds the exact accumulators of `source` (a session handle or an id;
        both sessions with exact_statistics, same num_features and dtype)
        into this session: afterwards its statistics are, bitwise, those it
        would have had after seeing every train batch `source` saw. `source`
        is unchanged. One mutation of this session; a retry with the same
        `request_id` is a replay, never a second merge."""
        return self.client._run(protocol.merge_session(
            self.session_id, protocol.session_id_of(source), expected_version=expected_version,
            request_id=self._request_id(request_id)))

    def standard_scaler_statistics(self) -> StandardScalerStatistics:
        """The exact statistics as scikit-learn StandardScaler attributes
        (mean_, var_ with ddof 0, scale_, n_samples_seen_), without needing
        scikit-learn; FailedPrecondition for a session without exact
        statistics."""
        return protocol.standard_scaler_statistics(self.info())

    def standard_scaler(self) -> Any:
        """A fitted `sklearn.preprocessing.StandardScaler` whose `transform`
        of an (N, C) array is this session's eval forward with affine =
        false (scale_ = sqrt(running_var + eps); see
        StandardScalerStatistics). ImportError without scikit-learn."""
        return self.standard_scaler_statistics().to_sklearn()

    def delete(self, *, expected_version: int | None = None) -> None:
        """Deletes the session and its state."""
        self.client.delete_session(self.session_id, expected_version=expected_version)
