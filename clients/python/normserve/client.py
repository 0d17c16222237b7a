"""The connection to a normserve server: channel, credentials, metadata,
retries, and the calls that are not about one session. This is the blocking
client; normserve.aio has the asyncio one, with the same calls."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc

from normserve import codec, errors, protocol
from normserve.codec import Array
from normserve.compare import CompareReport
from normserve.protocol import DEFAULT_OPTIONS  # noqa: F401  (re-exported)
from normserve.protocol import retryable as _retryable  # noqa: F401  (re-exported)
from normserve.results import UNSET, DeviceInfo, Limits, ServerInfo, SessionInfo, _Unset  # noqa: F401
from normserve.session import Session
from normserve.shm import SharedMemoryPool
from normserve.v1 import batch_norm_pb2_grpc, compare_pb2_grpc, server_pb2_grpc

T = TypeVar("T")
# The channel of a client: grpc.Channel (blocking) or grpc.aio.Channel.
ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)
Metadata = tuple[tuple[str, str], ...]
PEMSource = bytes | str | os.PathLike[str] | None


def _pem(value: PEMSource, what: str) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a path to a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode("ascii")
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as file:
                return file.read()
        except OSError as error:
            raise ValueError(f"{what}: cannot read {os.fspath(value)!r}: {error.strerror}") from error
    raise TypeError(f"{what}: expected PEM bytes or a file path, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """TLS settings. Each certificate or key is PEM bytes, PEM text, or the
    path of a PEM file.

    root_certificates: the CAs that may sign the server's certificate
        (None: the system's roots).
    client_certificate, client_key: for mutual TLS; both or neither.
    server_name: the name to expect in the server's certificate when it is
        not the host of the address (e.g. connecting by IP address).
    """

    root_certificates: PEMSource = None
    client_certificate: PEMSource = None
    client_key: PEMSource = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The grpc.ChannelCredentials these settings describe."""
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("TLSConfig: client_certificate and client_key go together (mutual TLS)")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates, "root_certificates"),
            private_key=_pem(self.client_key, "client_key"),
            certificate_chain=_pem(self.client_certificate, "client_certificate"),
        )


def auth_metadata(token: str | None) -> Metadata:
    """The metadata sent with every call: `authorization: Bearer <token>`, or
    none without a token."""
    if token is None:
        return ()
    if not isinstance(token, str) or not token:
        raise ValueError("token: expected a non-empty string")
    if any(not ("!" <= ch <= "~") for ch in token):
        raise ValueError("token: only visible ASCII characters are allowed (no spaces or newlines)")
    return (("authorization", f"Bearer {token}"),)


def channel_settings(tls: bool | TLSConfig | None,
                     options: Sequence[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """connect()'s channel options and credentials (None: plaintext), for a
    blocking or an asyncio channel."""
    channel_options = list(DEFAULT_OPTIONS) + list(options)
    if tls is None or tls is False:
        return channel_options, None
    config = TLSConfig() if tls is True else tls
    if not isinstance(config, TLSConfig):
        raise TypeError(f"tls: expected None, True or a TLSConfig, got {type(tls).__name__}")
    if config.server_name:
        channel_options.append(("grpc.ssl_target_name_override", config.server_name))
    return channel_options, config.credentials()


def connect(address: str, token: str | None = None, tls: bool | TLSConfig | None = None, *,
            timeout: float | None = None, retries: int = 0, options: Sequence[tuple[str, Any]] = ()) -> Client:
    """A Client of the server at `address` ("host:port").

    token: sent as `authorization: Bearer <token>` with every call (send it
        over TLS beyond a trusted network).
    tls: None or False for plaintext; True for TLS with the system's roots;
        a TLSConfig for custom roots, mutual TLS or a server name override.
    timeout: seconds allowed for each unary call (None: no deadline).
    retries: how many times a call that failed with UNAVAILABLE (or ABORTED
        from lost compare-and-set races) is retried, with exponential backoff.
        Only calls that are safe to repeat are retried: reads, and mutations
        carrying a request_id (generated when none is given). 0: none.
    options: extra grpc channel options, (name, value) pairs.
    """
    channel_options, credentials = channel_settings(tls, options)
    if credentials is None:
        channel = grpc.insecure_channel(address, options=channel_options)
    else:
        channel = grpc.secure_channel(address, credentials, options=channel_options)
    return Client(channel, token=token, timeout=timeout, retries=retries, owns_channel=True)


@dataclasses.dataclass(frozen=True)
class Stubs:
    """The generated stubs on the client's channel: the raw protocol, for what
    the idiomatic layer leaves out. Pass `metadata=client.metadata`."""

    batch_norm: batch_norm_pb2_grpc.BatchNormServiceStub
    compare: compare_pb2_grpc.CompareServiceStub
    server: server_pb2_grpc.ServerServiceStub

    @classmethod
    def on(cls, channel: Any) -> Stubs:
        """The stubs on a blocking or an asyncio channel."""
        return cls(batch_norm_pb2_grpc.BatchNormServiceStub(channel),
                   compare_pb2_grpc.CompareServiceStub(channel),
                   server_pb2_grpc.ServerServiceStub(channel))


class ClientSettings(Generic[ChannelT]):
    """What the blocking and the asyncio client hold alike: the channel, its
    stubs and call objects, the token's metadata, the timeout and the retry
    policy."""

    def __init__(self, channel: ChannelT, *, token: str | None = None, timeout: float | None = None,
                 retries: int = 0, retry_backoff: float = 0.05, owns_channel: bool = False) -> None:
        if retries < 0:
            raise ValueError("retries: must be >= 0")
        self.channel: ChannelT = channel
        self.stubs = Stubs.on(channel)
        # Unary calls by path, made on first use; they take requests whose
        # tensor bytes are spliced in (codec.SplicedRequest) as well as plain
        # messages, so that the values skip protobuf's copies.
        self._unary: dict[str, Any] = {}
        self._forward_stream: Any = channel.stream_stream(
            protocol.FORWARD_STREAM.path, request_serializer=codec.serialize,
            response_deserializer=protocol.FORWARD_STREAM.response.FromString)
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._owns_channel = owns_channel


class Client(ClientSettings[grpc.Channel]):
    """A normserve client on a grpc channel. `normserve.connect(...)` makes
    one; `Client(channel)` wraps a channel you made yourself (it stays yours
    to close). Thread-safe, as the channel is; use it as a context manager
    or call close()."""

    _shared_memory: SharedMemoryPool | None = None

    def close(self) -> None:
        """Unregisters and unlinks the client's shared memory, if it used any;
        closes the channel if connect() made it."""
        if self._shared_memory is not None:
            self._shared_memory.close()
        if self._owns_channel:
            self.channel.close()

    # ---------------------------------------------------- shared memory

    def enable_shared_memory(self, *, mode: int = 0o600, max_scratch: int = 8) -> SharedMemoryPool:
        """Sets how this client's shared-memory objects are made (before the
        first `shm=True` call): file `mode` (the server's user must be able to
        read and write them) and at most `max_scratch` scratch objects for
        copied tensors (calls beyond wait for one)."""
        if self._shared_memory is not None:
            raise RuntimeError("shared memory is already in use on this client")
        self._shared_memory = SharedMemoryPool(self._run, mode=mode, max_scratch=max_scratch)
        return self._shared_memory

    @property
    def shared_memory(self) -> SharedMemoryPool:
        """The client's shared-memory objects (normserve.shm), made on first use."""
        if self._shared_memory is None:
            self._shared_memory = SharedMemoryPool(self._run)
        return self._shared_memory

    def shared_array(self, shape: tuple[int, ...], dtype: Any = "float32") -> Any:
        """A zeroed numpy array in shared memory registered with the server:
        as the input (or `out=`) of `session.forward(..., shm=True)` the
        server reads (writes) it in place, with no copy on either side.
        `torch.from_numpy` views it as a CPU tensor."""
        return self.shared_memory.array(tuple(shape), dtype)

    def shared_memory_status(self) -> list[Any]:
        """The caller's tenant's registered regions (SharedMemoryRegion
        messages: name, offset, byte_size, idle_seconds)."""
        return self._run(protocol.shared_memory_status())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until the channel is connected (Unavailable after `timeout` s)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                     f"not connected after {timeout} s") from None

    def _run(self, call: protocol.Call[T]) -> T:
        """One unary call with the client's metadata and timeout, retried as
        the client's retries allow; failures become NormserveErrors."""
        rpc = self._unary.get(call.method.path)
        if rpc is None:
            rpc = self._unary[call.method.path] = self.channel.unary_unary(
                call.method.path, request_serializer=codec.serialize,
                response_deserializer=call.method.response.FromString)
        attempt = 0
        while True:
            try:
                reply = rpc(call.request, metadata=self.metadata, timeout=self.timeout)
                break
            except grpc.RpcError as error:
                if call.retry and attempt < self.retries and protocol.retryable(error, call.request):
                    time.sleep(protocol.backoff(self.retry_backoff, attempt))
                    attempt += 1
                    continue
                raise errors.from_rpc_error(error) from error
        return call.parse(reply)

    # ---------------------------------------------------------- sessions

    def create_session(self, kind: str | int, num_features: int, *, eps: float = 1e-5,
                       momentum: float | None | _Unset = UNSET, affine: bool = True,
                       track_running_stats: bool = True,
                       dtype: Any = "float32", device: str | None = "", session_id: str | None = None,
                       labels: Mapping[str, str] | None = None, training: bool = True,
                       reject_non_finite: bool = False, weight: Array | None = None, bias: Array | None = None,
                       running_mean: Array | None = None, running_var: Array | None = None,
                       num_batches_tracked: int | None = None, exact_statistics: bool = False) -> Session:
        """A new session: `torch.nn.BatchNorm{kind}(num_features, eps, momentum,
        affine, track_running_stats, dtype=dtype)` living in the server.

        kind: "1d", "2d" or "3d". momentum None: the cumulative average;
            not given: 0.1 (none for exact statistics).
        dtype: of the parameters and running statistics (float32, float64,
            float16, bfloat16; a name, numpy or torch dtype).
        device: "" or "auto" (the server's default), "cpu", "cuda", "cuda:N".
        session_id: your own id (1-128 of [A-Za-z0-9._-]); creating it again
            with the same configuration returns it (`already_existed`),
            with another fails with AlreadyExists. None: the server picks one.
        labels: str -> str, for list_sessions filters.
        training: the mode of forwards that do not choose one.
        reject_non_finite: refuse NaN/Inf input instead of propagating it.
        weight, bias, running_mean, running_var (shape (C,)) and
            num_batches_tracked: the initial state (PyTorch's defaults otherwise).
        exact_statistics: running_mean/running_var are the exact mean and
            unbiased variance of every value train forwards have seen,
            correctly rounded, whatever the batches, their order, the workers
            or the replica (see Session.merge and Session.standard_scaler).
            Needs track_running_stats; momentum must not be given; the
            initial running statistics must not be given.
        """
        created = self._run(protocol.create_session(
            kind, num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, dtype=dtype, device=device, session_id=session_id,
            labels=labels, training=training, reject_non_finite=reject_non_finite, weight=weight, bias=bias,
            running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
            exact_statistics=exact_statistics))
        return Session(self, created.info.session_id, training=created.info.training,
                       already_existed=created.already_existed, initial_info=created.info)

    def create_session_from_module(self, module: Any, *, dtype: Any = None, **options: Any) -> Session:
        """A session with a local `nn.BatchNorm{1,2,3}d`'s configuration, state
        and mode. dtype: the session's (default: the module's); other options
        as create_session (device, session_id, labels, reject_non_finite)."""
        return self.create_session(**protocol.module_options(module, dtype, options))

    @contextlib.contextmanager
    def temporary_session(self, kind: str | int, num_features: int, **options: Any) -> Iterator[Session]:
        """A new session (create_session's arguments) for the `with` block,
        deleted when the block ends, also when it raises:

            with client.temporary_session("2d", 3) as session:
                y = session.forward(x)

        A session_id that names an existing session is refused
        (AlreadyExists): the block would delete what it did not create."""
        session = self.create_session(kind, num_features, **options)
        protocol.temporary_session_created(session)
        try:
            yield session
        except BaseException as error:
            try:
                session.delete()
            except errors.NotFound:
                pass
            except Exception as cleanup_error:
                protocol.cleanup_failed(error, cleanup_error, session.session_id)
            raise
        with contextlib.suppress(errors.NotFound):  # the block may have deleted it itself
            session.delete()

    @contextlib.contextmanager
    def temporary_session_from_module(self, module: Any, *, dtype: Any = None,
                                      **options: Any) -> Iterator[Session]:
        """`temporary_session` with a local module's configuration, state and
        mode (as create_session_from_module)."""
        with self.temporary_session(**protocol.module_options(module, dtype, options)) as session:
            yield session

    def get_session(self, session_id: str) -> Session:
        """A handle on an existing session (NotFound otherwise), in the
        session's default mode."""
        info = self._run(protocol.get_session(session_id))
        return Session(self, session_id, training=info.training, initial_info=info)

    def list_sessions(self, labels: Mapping[str, str] | None = None, *, include_tensors: bool = False,
                      page_size: int | None = None) -> Iterator[SessionInfo]:
        """Every session carrying all of `labels`, in id order, as SessionInfo;
        pages (page_size, server default 100) are fetched as the iteration
        goes. Tensors only with include_tensors."""
        token = ""
        while True:
            page = self._run(protocol.list_sessions_page(labels, include_tensors, page_size, token))
            yield from page.sessions
            token = page.next_page_token
            if not token:
                return

    def delete_session(self, session_id: str, *, expected_version: int | None = None) -> None:
        """Deletes a session (NotFound when there is none)."""
        self._run(protocol.delete_session(session_id, expected_version))

    # ------------------------------------------------------- the others

    def server_info(self) -> ServerInfo:
        """Versions, devices, limits and features of the server (ServerInfo)."""
        return self._run(protocol.server_info())

    def health(self, service: str = "") -> str:
        """The server's health (grpc.health.v1 Check, which needs no token):
        "SERVING" or "NOT_SERVING" for the server (""), or for a service such
        as "normserve.v1.BatchNormService"; NotFound for an unknown service."""
        return self._run(protocol.health(service))

    def compare(self, x: Array, *, module: Any = None, weight: Array | None = None, bias: Array | None = None,
                running_mean: Array | None = None, running_var: Array | None = None,
                num_batches_tracked: int | None = None, training: bool | None = None, eps: float | None = None,
                momentum: float | None | _Unset = UNSET, grad_output: Array | None = None,
                candidate: Array | Mapping[str, Array] | None = None, rtol: float | None = None,
                atol: float | None = None, implementations: Sequence[str | int] | None = None,
                return_tensors: bool = False, device: str = "") -> CompareReport:
        """PyTorch's batch norm of `x` beside the textbook formulas and your
        own results (`candidate`), with a diagnosis: a CompareReport, whose
        `print()` shows the table and the diagnosis.

        x: (N, C[, spatial...]); its rank picks BatchNorm1d/2d/3d.
        module: a local nn.BatchNorm*d whose parameters, running statistics,
            num_batches_tracked, eps, momentum and mode fill in what is not
            given explicitly.
        weight, bias, running_mean, running_var: (C,); absent ones are
            absent in the reference too (running statistics come in pairs).
        training: default True (or the module's mode). eps: default 1e-5.
        momentum: default 0.1; None for the cumulative average.
        grad_output: dL/d(output); gradients are compared too.
        candidate: your output, or a dict of any of output, running_mean,
            running_var, grad_input, grad_weight, grad_bias.
        rtol, atol: both or neither (default: assert_close's for x's dtype).
        implementations: names to report ("reference", "float64_reference",
            "manual_biased", "manual_unbiased", "candidate"); default all.
        return_tensors: each report carries its tensors (as x: numpy/torch).
        """
        return self._run(protocol.compare(
            x, module=module, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
            num_batches_tracked=num_batches_tracked, training=training, eps=eps, momentum=momentum,
            grad_output=grad_output, candidate=candidate, rtol=rtol, atol=atol,
            implementations=implementations, return_tensors=return_tensors, device=device))
