"""The asyncio client: `normserve.Client`'s calls as coroutines, on a
grpc.aio channel. Requests and replies are converted by the same code as
the blocking client's (normserve.protocol, normserve.codec), and failures
raise the same exceptions (normserve.NotFound, ...).

    import normserve.aio

    async with normserve.aio.connect("127.0.0.1:50051") as client:
        session = await client.create_session("2d", num_features=3)
        y = await session.forward(x)
        outputs = await asyncio.gather(*(session.forward(b, train=False) for b in batches))
        async with client.temporary_session("1d", 8) as scratch:   # deleted on exit
            ...

A client belongs to the event loop it was made in: make it inside a
coroutine (`connect` creates its channel there).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from normserve import codec, errors, protocol
from normserve.client import ClientSettings, Stubs, TLSConfig, channel_settings
from normserve.codec import Array
from normserve.compare import CompareReport
from normserve.results import (
    UNSET,
    ForwardResult,
    ServerInfo,
    SessionInfo,
    StandardScalerStatistics,
    StateExport,
    _Unset,
    safetensors_from_state_dict,
    state_dict_from_safetensors,
)
from normserve.session import SessionHandle

if TYPE_CHECKING:
    import torch

__all__ = ["Client", "Session", "connect"]

T = TypeVar("T")


def connect(address: str, token: str | None = None, tls: bool | TLSConfig | None = None, *,
            timeout: float | None = None, retries: int = 0, options: Sequence[tuple[str, Any]] = ()) -> Client:
    """An asyncio Client of the server at `address` ("host:port"); the
    arguments are normserve.connect's. Call it in a coroutine, and close the
    client (`await client.close()`, or `async with`) in the same loop."""
    channel_options, credentials = channel_settings(tls, options)
    if credentials is None:
        channel = grpc.aio.insecure_channel(address, options=channel_options)
    else:
        channel = grpc.aio.secure_channel(address, credentials, options=channel_options)
    return Client(channel, token=token, timeout=timeout, retries=retries, owns_channel=True)


class Client(ClientSettings[grpc.aio.Channel]):
    """An asyncio normserve client on a grpc.aio channel: normserve.Client's
    calls, awaited. `normserve.aio.connect(...)` makes one; `Client(channel)`
    wraps a grpc.aio channel of your own (it stays yours to close). Calls
    may run concurrently (`asyncio.gather`) on the one channel."""

    async def close(self) -> None:
        """Closes the channel if connect() made it."""
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the channel is connected (Unavailable after `timeout` s)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                     f"not connected after {timeout} s") from None

    async def _run(self, call: protocol.Call[T]) -> T:
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
                reply = await rpc(call.request, metadata=self.metadata, timeout=self.timeout)
                break
            except grpc.RpcError as error:
                if call.retry and attempt < self.retries and protocol.retryable(error, call.request):
                    await asyncio.sleep(protocol.backoff(self.retry_backoff, attempt))
                    attempt += 1
                    continue
                raise errors.from_rpc_error(error) from error
        return call.parse(reply)

    # ---------------------------------------------------------- sessions

    async def create_session(self, kind: str | int, num_features: int, *, eps: float = 1e-5,
                             momentum: float | None | _Unset = UNSET, affine: bool = True,
                             track_running_stats: bool = True,
                             dtype: Any = "float32", device: str | None = "", session_id: str | None = None,
                             labels: Mapping[str, str] | None = None, training: bool = True,
                             reject_non_finite: bool = False, weight: Array | None = None,
                             bias: Array | None = None, running_mean: Array | None = None,
                             running_var: Array | None = None, num_batches_tracked: int | None = None,
                             exact_statistics: bool = False) -> Session:
        """A new session; the arguments are normserve.Client.create_session's."""
        created = await self._run(protocol.create_session(
            kind, num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, dtype=dtype, device=device, session_id=session_id,
            labels=labels, training=training, reject_non_finite=reject_non_finite, weight=weight, bias=bias,
            running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
            exact_statistics=exact_statistics))
        return Session(self, created.info.session_id, training=created.info.training,
                       already_existed=created.already_existed, initial_info=created.info)

    async def create_session_from_module(self, module: Any, *, dtype: Any = None, **options: Any) -> Session:
        """A session with a local `nn.BatchNorm{1,2,3}d`'s configuration, state
        and mode (as normserve.Client.create_session_from_module)."""
        return await self.create_session(**protocol.module_options(module, dtype, options))

    @contextlib.asynccontextmanager
    async def temporary_session(self, kind: str | int, num_features: int,
                                **options: Any) -> AsyncIterator[Session]:
        """A new session (create_session's arguments) for the `async with`
        block, deleted when the block ends, also when it raises or is
        cancelled:

            async with client.temporary_session("2d", 3) as session:
                y = await session.forward(x)

        A session_id that names an existing session is refused
        (AlreadyExists): the block would delete what it did not create."""
        session = await self.create_session(kind, num_features, **options)
        protocol.temporary_session_created(session)
        try:
            yield session
        except BaseException as error:
            try:
                await session.delete()
            except errors.NotFound:
                pass
            except Exception as cleanup_error:
                protocol.cleanup_failed(error, cleanup_error, session.session_id)
            raise
        with contextlib.suppress(errors.NotFound):  # the block may have deleted it itself
            await session.delete()

    @contextlib.asynccontextmanager
    async def temporary_session_from_module(self, module: Any, *, dtype: Any = None,
                                            **options: Any) -> AsyncIterator[Session]:
        """`temporary_session` with a local module's configuration, state and
        mode (as create_session_from_module)."""
        async with self.temporary_session(**protocol.module_options(module, dtype, options)) as session:
            yield session

    async def get_session(self, session_id: str) -> Session:
        """A handle on an existing session (NotFound otherwise), in the
        session's default mode."""
        info = await self._run(protocol.get_session(session_id))
        return Session(self, session_id, training=info.training, initial_info=info)

    async def list_sessions(self, labels: Mapping[str, str] | None = None, *, include_tensors: bool = False,
                            page_size: int | None = None) -> AsyncIterator[SessionInfo]:
        """Every session carrying all of `labels`, in id order, as SessionInfo
        (`async for`); pages are fetched as the iteration goes."""
        token = ""
        while True:
            page = await self._run(protocol.list_sessions_page(labels, include_tensors, page_size, token))
            for info in page.sessions:
                yield info
            token = page.next_page_token
            if not token:
                return

    async def delete_session(self, session_id: str, *, expected_version: int | None = None) -> None:
        """Deletes a session (NotFound when there is none)."""
        await self._run(protocol.delete_session(session_id, expected_version))

    # ------------------------------------------------------- the others

    async def server_info(self) -> ServerInfo:
        """Versions, devices, limits and features of the server (ServerInfo)."""
        return await self._run(protocol.server_info())

    async def health(self, service: str = "") -> str:
        """The server's health (grpc.health.v1 Check, which needs no token):
        "SERVING" or "NOT_SERVING" for the server (""), or for a service such
        as "normserve.v1.BatchNormService"; NotFound for an unknown service."""
        return await self._run(protocol.health(service))

    async def compare(self, x: Array, *, module: Any = None, weight: Array | None = None,
                      bias: Array | None = None, running_mean: Array | None = None,
                      running_var: Array | None = None, num_batches_tracked: int | None = None,
                      training: bool | None = None, eps: float | None = None,
                      momentum: float | None | _Unset = UNSET, grad_output: Array | None = None,
                      candidate: Array | Mapping[str, Array] | None = None, rtol: float | None = None,
                      atol: float | None = None, implementations: Sequence[str | int] | None = None,
                      return_tensors: bool = False, device: str = "") -> CompareReport:
        """PyTorch's batch norm of `x` beside the textbook formulas and your
        own results; the arguments are normserve.Client.compare's."""
        return await self._run(protocol.compare(
            x, module=module, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
            num_batches_tracked=num_batches_tracked, training=training, eps=eps, momentum=momentum,
            grad_output=grad_output, candidate=candidate, rtol=rtol, atol=atol,
            implementations=implementations, return_tensors=return_tensors, device=device))


class Session(SessionHandle[Client]):
    """A handle on one session, for the asyncio client: normserve.Session's
    operations as coroutines (`train()` and `eval()` stay plain methods:
    they set the handle's mode and call nothing)."""

    async def forward(self, x: Array, train: bool | None = None, *, expected_version: int | None = None,
                      request_id: str | None = None) -> Array:
        """The layer applied to `x` (as normserve.Session.forward)."""
        call, request_id = self._forward_call(x, train, expected_version, request_id)
        return protocol.forward_output(await self.client._run(call), request_id)

    __call__ = forward

    async def forward_result(self, x: Array, train: bool | None = None, *, expected_version: int | None = None,
                             request_id: str | None = None) -> ForwardResult:
        """`forward`, with the version and num_batches_tracked after it and
        the replay flag (a ForwardResult)."""
        call, _ = self._forward_call(x, train, expected_version, request_id)
        return await self.client._run(call)

    async def forward_stream(self, inputs: Iterable[Array] | AsyncIterable[Array], train: bool | None = None, *,
                             return_exceptions: bool = False) -> AsyncIterator[Any]:
        """Forwards every input (of an iterable or an async iterable) on one
        bidirectional stream and yields the outputs in order (`async for`);
        errors as normserve.Session.forward_stream."""
        stream = protocol.StreamRequests(self.session_id, self._training(train))

        async def requests() -> AsyncIterator[codec.SplicedRequest]:
            if isinstance(inputs, AsyncIterable):
                async for x in inputs:
                    request = stream.request(x)
                    if request is None:
                        return
                    yield request
            else:
                for request in stream.requests(inputs):
                    yield request

        call = self.client._forward_stream(requests(), metadata=self.client.metadata)
        try:
            async for reply in call:
                output = stream.reply(reply)
                if isinstance(output, errors.NormserveError) and not return_exceptions:
                    raise output
                yield output
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from error
        finally:
            call.cancel()  # a no-op once the stream is complete
        if stream.failed:
            raise stream.failed[0]

    async def info(self) -> SessionInfo:
        """The session's configuration and state now (SessionInfo)."""
        return await self.client._run(protocol.get_session(self.session_id))

    async def reset_running_stats(self, *, expected_version: int | None = None,
                                  request_id: str | None = None) -> SessionInfo:
        """`module.reset_running_stats()` (as normserve.Session's)."""
        return await self.client._run(protocol.reset_running_stats(
            self.session_id, expected_version=expected_version, request_id=self._request_id(request_id)))

    async def update_parameters(self, *, weight: Array | None = None, bias: Array | None = None,
                                running_mean: Array | None = None, running_var: Array | None = None,
                                num_batches_tracked: int | None = None, eps: float | None = None,
                                momentum: float | None | _Unset = UNSET, expected_version: int | None = None,
                                request_id: str | None = None) -> SessionInfo:
        """Sets tensors, num_batches_tracked, eps and momentum (as
        normserve.Session.update_parameters); all or nothing."""
        return await self.client._run(protocol.update_parameters(
            self.session_id, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
            num_batches_tracked=num_batches_tracked, eps=eps, momentum=momentum,
            expected_version=expected_version, request_id=self._request_id(request_id)))

    async def export_state(self) -> StateExport:
        """`module.state_dict()` as safetensors bytes, with its version."""
        return await self.client._run(protocol.export_state(self.session_id))

    async def import_state(self, safetensors: bytes, *, strict: bool = True, expected_version: int | None = None,
                           request_id: str | None = None) -> SessionInfo:
        """`module.load_state_dict(...)` from safetensors bytes (as
        normserve.Session.import_state)."""
        return await self.client._run(protocol.import_state(
            self.session_id, safetensors, strict=strict, expected_version=expected_version,
            request_id=self._request_id(request_id)))

    async def state_dict(self) -> collections.OrderedDict[str, torch.Tensor]:
        """`module.state_dict()` (needs torch and safetensors)."""
        return state_dict_from_safetensors((await self.export_state()).safetensors)

    async def load_state_dict(self, state_dict: Mapping[str, Array], strict: bool = True, *,
                              expected_version: int | None = None, request_id: str | None = None) -> SessionInfo:
        """`module.load_state_dict(state_dict)`; nothing is loaded when
        anything is invalid."""
        return await self.import_state(safetensors_from_state_dict(state_dict), strict=strict,
                                       expected_version=expected_version, request_id=request_id)

    async def merge(self, source: SessionHandle[Any] | str, *, expected_version: int | None = None,
                    request_id: str | None = None) -> SessionInfo:
        """Adds the exact accumulators of `source` into this session (as
        normserve.Session.merge)."""
        return await self.client._run(protocol.merge_session(
            self.session_id, protocol.session_id_of(source), expected_version=expected_version,
            request_id=self._request_id(request_id)))

    async def standard_scaler_statistics(self) -> StandardScalerStatistics:
        """The exact statistics as StandardScaler attributes (as
        normserve.Session.standard_scaler_statistics)."""
        return protocol.standard_scaler_statistics(await self.info())

    async def standard_scaler(self) -> Any:
        """A fitted sklearn StandardScaler (as normserve.Session.standard_scaler)."""
        return (await self.standard_scaler_statistics()).to_sklearn()

    async def delete(self, *, expected_version: int | None = None) -> None:
        """Deletes the session and its state."""
        await self.client.delete_session(self.session_id, expected_version=expected_version)
