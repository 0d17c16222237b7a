"""The connection to a normserve server: channel, credentials, metadata,
retries, and the calls that are not about one session."""

import dataclasses
import os
import time

import grpc

from normserve import codec, compare as compare_module, errors
from normserve.session import Session, SessionInfo, UNSET, kind_value, tensor_or_none
from normserve.v1 import (
    batch_norm_pb2 as bn,
    batch_norm_pb2_grpc,
    compare_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)

# The server enforces its own message limit (max_message_bytes); the client
# adds none (gRPC's default would refuse replies above 4 MiB).
DEFAULT_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Let the server send large HTTP/2 DATA frames: it writes one frame per
    # syscall, and with the 16 KiB default a 16 MiB reply costs ~1000 of them
    # (measured: a 16 MiB Forward 125 ms -> 76 ms on the 2-core dev machine).
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
)


def _pem(value, what):
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

    root_certificates: bytes | str | os.PathLike | None = None
    client_certificate: bytes | str | os.PathLike | None = None
    client_key: bytes | str | os.PathLike | None = None
    server_name: str | None = None

    def credentials(self):
        """The grpc.ChannelCredentials these settings describe."""
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("TLSConfig: client_certificate and client_key go together (mutual TLS)")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates, "root_certificates"),
            private_key=_pem(self.client_key, "client_key"),
            certificate_chain=_pem(self.client_certificate, "client_certificate"),
        )


def auth_metadata(token):
    """The metadata sent with every call: `authorization: Bearer <token>`, or
    none without a token."""
    if token is None:
        return ()
    if not isinstance(token, str) or not token:
        raise ValueError("token: expected a non-empty string")
    if any(not ("!" <= ch <= "~") for ch in token):
        raise ValueError("token: only visible ASCII characters are allowed (no spaces or newlines)")
    return (("authorization", f"Bearer {token}"),)


def connect(address, token=None, tls=None, *, timeout=None, retries=0, options=()):
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
    channel_options = list(DEFAULT_OPTIONS) + list(options)
    if tls is None or tls is False:
        channel = grpc.insecure_channel(address, options=channel_options)
    else:
        config = TLSConfig() if tls is True else tls
        if not isinstance(config, TLSConfig):
            raise TypeError(f"tls: expected None, True or a TLSConfig, got {type(tls).__name__}")
        if config.server_name:
            channel_options.append(("grpc.ssl_target_name_override", config.server_name))
        channel = grpc.secure_channel(address, config.credentials(), options=channel_options)
    return Client(channel, token=token, timeout=timeout, retries=retries, owns_channel=True)


@dataclasses.dataclass(frozen=True)
class Stubs:
    """The generated stubs on the client's channel: the raw protocol, for what
    the idiomatic layer leaves out. Pass `metadata=client.metadata`."""

    batch_norm: batch_norm_pb2_grpc.BatchNormServiceStub
    compare: compare_pb2_grpc.CompareServiceStub
    server: server_pb2_grpc.ServerServiceStub


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


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """Facts about the running server (GetServerInfo)."""

    server_version: str
    libtorch_version: str
    default_device: str
    devices: tuple
    cuda_device_count: int
    limits: Limits
    features: tuple
    intra_op_threads: int
    compute_threads: int
    sessions: int
    unreadable_sessions: int
    store: str
    proto: server_pb2.GetServerInfoResponse = dataclasses.field(repr=False)

    @classmethod
    def from_proto(cls, reply):
        limits = reply.limits
        return cls(
            server_version=reply.server_version,
            libtorch_version=reply.libtorch_version,
            default_device=reply.default_device,
            devices=tuple(DeviceInfo(d.name, d.description, d.total_memory_bytes) for d in reply.devices),
            cuda_device_count=reply.cuda_device_count,
            limits=Limits(limits.max_sessions, limits.max_tensor_elements, limits.max_num_features,
                          limits.max_message_bytes),
            features=tuple(reply.features),
            intra_op_threads=reply.intra_op_threads,
            compute_threads=reply.compute_threads,
            sessions=reply.sessions,
            unreadable_sessions=reply.unreadable_sessions,
            store=reply.store,
            proto=reply,
        )


def _module_kind(module):
    import torch

    for kind, cls in (("1d", torch.nn.BatchNorm1d), ("2d", torch.nn.BatchNorm2d), ("3d", torch.nn.BatchNorm3d)):
        if isinstance(module, cls):
            return kind
    raise TypeError(f"expected a torch.nn.BatchNorm1d, BatchNorm2d or BatchNorm3d, got {type(module).__name__}")


class Client:
    """A normserve client on a grpc channel. `normserve.connect(...)` makes
    one; `Client(channel)` wraps a channel you made yourself (it stays yours
    to close). Thread-safe, as the channel is; use it as a context manager
    or call close()."""

    def __init__(self, channel, *, token=None, timeout=None, retries=0, retry_backoff=0.05,
                 owns_channel=False):
        if retries < 0:
            raise ValueError("retries: must be >= 0")
        self.channel = channel
        self.stubs = Stubs(
            batch_norm=batch_norm_pb2_grpc.BatchNormServiceStub(channel),
            compare=compare_pb2_grpc.CompareServiceStub(channel),
            server=server_pb2_grpc.ServerServiceStub(channel),
        )
        # Forward and ForwardStream as the stubs have them, but taking
        # codec.SplicedRequests: the tensor bytes skip protobuf's copies.
        service = bn.DESCRIPTOR.services_by_name["BatchNormService"].full_name
        self._forward = channel.unary_unary(
            f"/{service}/Forward",
            request_serializer=codec.serialize, response_deserializer=bn.ForwardResponse.FromString)
        self._forward_stream = channel.stream_stream(
            f"/{service}/ForwardStream",
            request_serializer=codec.serialize, response_deserializer=bn.ForwardStreamResponse.FromString)
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._owns_channel = owns_channel

    def close(self):
        """Closes the channel if connect() made it."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout=None):
        """Blocks until the channel is connected (Unavailable after `timeout` s)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                     f"not connected after {timeout} s") from None

    def _call(self, rpc, request, *, retry):
        """One unary call with the client's metadata and timeout; failures
        become NormserveErrors. `retry`: the call is safe to repeat."""
        attempt = 0
        while True:
            try:
                return rpc(request, metadata=self.metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                if retry and attempt < self.retries and _retryable(error, request):
                    time.sleep(self.retry_backoff * 2 ** attempt)
                    attempt += 1
                    continue
                raise errors.from_rpc_error(error) from error

    # ---------------------------------------------------------- sessions

    def create_session(self, kind, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                       track_running_stats=True, dtype="float32", device="", session_id=None,
                       labels=None, training=True, reject_non_finite=False, weight=None, bias=None,
                       running_mean=None, running_var=None, num_batches_tracked=None):
        """A new session: `torch.nn.BatchNorm{kind}(num_features, eps, momentum,
        affine, track_running_stats, dtype=dtype)` living in the server.

        kind: "1d", "2d" or "3d". momentum None: the cumulative average.
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
        """
        request = bn.CreateSessionRequest(
            session_id=session_id or "",
            kind=kind_value(kind),
            num_features=num_features,
            eps=eps,
            affine=affine,
            track_running_stats=track_running_stats,
            param_dtype=codec.wire_dtype(dtype),
            device=device or "",
            default_mode=bn.MODE_TRAIN if training else bn.MODE_EVAL,
            reject_non_finite=reject_non_finite,
            labels=labels or {},
        )
        if momentum is None:
            request.cumulative_average = True
        else:
            request.momentum = momentum
        for field, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                             ("running_var", running_var)):
            tensor_or_none(request, field, value)
        if num_batches_tracked is not None:
            request.num_batches_tracked = int(num_batches_tracked)
        # With a client-chosen id creation is idempotent, so safe to retry.
        reply = self._call(self.stubs.batch_norm.CreateSession, request, retry=bool(session_id))
        info = SessionInfo.from_proto(reply.session)
        return Session(self, info.session_id, training=info.training,
                       already_existed=reply.already_existed, initial_info=info)

    def create_session_from_module(self, module, *, dtype=None, **options):
        """A session with a local `nn.BatchNorm{1,2,3}d`'s configuration, state
        and mode. dtype: the session's (default: the module's); other options
        as create_session (device, session_id, labels, reject_non_finite)."""
        kind = _module_kind(module)
        state = module.state_dict()
        if dtype is None:
            tensors = [state[key] for key in ("weight", "running_mean") if key in state]
            dtype = tensors[0].dtype if tensors else "float32"
        initial = {key: state[key] for key in ("weight", "bias", "running_mean", "running_var") if key in state}
        if "num_batches_tracked" in state:
            initial["num_batches_tracked"] = int(state["num_batches_tracked"])
        options.setdefault("training", module.training)
        return self.create_session(
            kind, module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats, dtype=dtype, **initial, **options)

    def get_session(self, session_id):
        """A handle on an existing session (NotFound otherwise), in the
        session's default mode."""
        reply = self._call(self.stubs.batch_norm.GetSession, bn.GetSessionRequest(session_id=session_id),
                           retry=True)
        info = SessionInfo.from_proto(reply.session)
        return Session(self, session_id, training=info.training, initial_info=info)

    def list_sessions(self, labels=None, *, include_tensors=False, page_size=None):
        """Every session carrying all of `labels`, in id order, as SessionInfo;
        pages (page_size, server default 100) are fetched as the iteration
        goes. Tensors only with include_tensors."""
        token = ""
        while True:
            request = bn.ListSessionsRequest(page_size=page_size or 0, page_token=token,
                                             label_selector=labels or {}, include_tensors=include_tensors)
            reply = self._call(self.stubs.batch_norm.ListSessions, request, retry=True)
            for session in reply.sessions:
                yield SessionInfo.from_proto(session)
            token = reply.next_page_token
            if not token:
                return

    def delete_session(self, session_id, *, expected_version=None):
        """Deletes a session (NotFound when there is none)."""
        request = bn.DeleteSessionRequest(session_id=session_id)
        if expected_version is not None:
            request.expected_version = expected_version
        # Not retried: a retry after a lost reply would answer NotFound.
        self._call(self.stubs.batch_norm.DeleteSession, request, retry=False)

    # ------------------------------------------------------- the others

    def server_info(self):
        """Versions, devices, limits and features of the server (ServerInfo)."""
        return ServerInfo.from_proto(self._call(self.stubs.server.GetServerInfo,
                                                server_pb2.GetServerInfoRequest(), retry=True))

    def compare(self, x, *, module=None, weight=None, bias=None, running_mean=None, running_var=None,
                num_batches_tracked=None, training=None, eps=None, momentum=UNSET, grad_output=None,
                candidate=None, rtol=None, atol=None, implementations=None, return_tensors=False,
                device=""):
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
        request = compare_module.build_request(
            x, module=module, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
            num_batches_tracked=num_batches_tracked, training=training, eps=eps, momentum=momentum,
            grad_output=grad_output, candidate=candidate, rtol=rtol, atol=atol,
            implementations=implementations, return_tensors=return_tensors, device=device)
        reply = self._call(self.stubs.compare.Compare, request, retry=True)
        return compare_module.CompareReport.from_proto(reply, like=x)


def _retryable(error, request):
    code = error.code() if callable(getattr(error, "code", None)) else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    # ABORTED is a lost compare-and-set race only when no expected_version was
    # sent; with one it is the version check, which a retry would fail again.
    if code == grpc.StatusCode.ABORTED:
        request = getattr(request, "message", request)  # a codec.SplicedRequest's message
        fields = request.DESCRIPTOR.fields_by_name
        return "expected_version" not in fields or not request.HasField("expected_version")
    return False
