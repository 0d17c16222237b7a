"""ReduceStatistics calls over one ReduceStatisticsStream per client and
rank: every synchronized step of the SyncBatchNorm modules of one rank on that
client (a model's layers) goes over the same bidirectional stream, answered in
order, at a fraction of a unary call's cost per step. Ranks that share a
client (threads of one process) get a stream each, since a stream's message
waiting in its step's barrier holds back the messages behind it. The server applies each message exactly as the unary call
(barrier, replay, limits, errors) and reports a failing message's status in
band, which is raised here as the unary call would have raised it.

A server without the RPC (UNIMPLEMENTED) makes the client fall back to the
unary ReduceStatistics for good; a broken stream (the server restarted, the
connection dropped) fails the calls waiting on it with their status
(UNAVAILABLE: retried by SyncBatchNorm with the same step and request id, so
applied once) and the next call opens a new stream. A stream the server
ended because nothing came for its `--request-idle-timeout-seconds` (a long
pause between steps) is reopened and the call sent again at once: the server
had read nothing of it, and a step's number makes a repeat a replay anyway.

Messages of one session are answered one after another, and the server reads
the next message only once the ones it has received are answered: threads
that share a client should enter the steps of different sessions in the same
order on every rank (as one training loop does), or one rank's stream may
wait on a step the others have not reached.

A client with a per-call `timeout` keeps the unary calls: a stream has one
deadline for all its messages, so it could not bound each step's wait as the
timeout promises.
"""

from __future__ import annotations

import collections
import queue
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from normserve import errors, protocol
from normserve.client import Client
from normserve.v1 import batch_norm_pb2 as bn

T = TypeVar("T")

REDUCE_STATISTICS_STREAM = protocol.Method.of(bn, "BatchNormService", "ReduceStatisticsStream")

# Ends a stream's request iterator (the client half-closes).
_CLOSE = object()


class _Broken(Exception):
    """The stream itself failed (not one message's in-band error)."""

    def __init__(self, error: errors.NormserveError) -> None:
        super().__init__(error)
        self.error = error


class _Stream:
    """One open ReduceStatisticsStream: requests go out in the order of
    `send`, and each answer resolves the oldest waiting future."""

    def __init__(self, client: Client) -> None:
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: collections.deque[Future[bn.ReduceStatisticsResponse]] = collections.deque()
        self._lock = threading.Lock()
        self.broken: _Broken | None = None
        rpc = client.channel.stream_stream(
            REDUCE_STATISTICS_STREAM.path,
            request_serializer=bn.ReduceStatisticsRequest.SerializeToString,
            response_deserializer=bn.ReduceStatisticsStreamResponse.FromString)
        self._replies = rpc(self._requests(), metadata=client.metadata)
        self._reader = threading.Thread(target=self._read, name="normserve-reduce-stream", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[bn.ReduceStatisticsRequest]:
        while True:
            request = self._outbox.get()
            if request is _CLOSE:
                return
            yield request

    def send(self, request: bn.ReduceStatisticsRequest) -> Future[bn.ReduceStatisticsResponse]:
        future: Future[bn.ReduceStatisticsResponse] = Future()
        with self._lock:
            if self.broken is not None:
                future.set_exception(self.broken)
                return future
            # Queued in the same order as the requests: answers come in order.
            self._waiting.append(future)
            self._outbox.put(request)
        return future

    def _read(self) -> None:
        failure: _Broken
        try:
            for reply in self._replies:
                with self._lock:
                    future = self._waiting.popleft() if self._waiting else None
                if future is None:
                    continue
                which = reply.WhichOneof("result")
                if which == "response":
                    future.set_result(reply.response)
                elif which == "error":
                    future.set_exception(errors.from_status(reply.error.code, reply.error.message))
                else:
                    future.set_exception(errors.Internal(grpc.StatusCode.INTERNAL, "an answer without a result"))
            failure = _Broken(errors.Unavailable(grpc.StatusCode.UNAVAILABLE, "the ReduceStatisticsStream ended"))
        except grpc.RpcError as error:
            failure = _Broken(errors.from_rpc_error(error))
        with self._lock:
            self.broken = failure
            waiting = list(self._waiting)
            self._waiting.clear()
        for future in waiting:
            future.set_exception(failure)

    def close(self) -> None:
        self._outbox.put(_CLOSE)


class _Streams:
    """The open stream of each client and rank (made on first use, remade
    after it broke), and the clients whose server lacks the RPC."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: weakref.WeakKeyDictionary[Client, dict[int, _Stream]] = weakref.WeakKeyDictionary()
        self._unary_only: weakref.WeakSet[Client] = weakref.WeakSet()

    def stream(self, client: Client, rank: int) -> _Stream | None:
        with self._lock:
            if client in self._unary_only or client.timeout is not None:
                return None
            streams = self._open.setdefault(client, {})
            stream = streams.get(rank)
            if stream is None or stream.broken is not None:
                stream = streams[rank] = _Stream(client)
                weakref.finalize(client, stream.close)
            return stream

    def is_open(self, client: Client, rank: int) -> bool:
        with self._lock:
            stream = self._open.get(client, {}).get(rank)
            return stream is not None and stream.broken is None

    def unary_only(self, client: Client) -> None:
        with self._lock:
            self._unary_only.add(client)
            self._open.pop(client, None)


_STREAMS = _Streams()


def run(client: Client, rank: int, call: protocol.Call[T]) -> T:
    """`call` (a steps.reduce_forward / reduce_backward Call of `rank`) on
    the client's stream for that rank, or as a unary call where there is
    none; errors are raised as the unary call raises them."""
    request = call.request
    for attempt in range(2):
        stream = _STREAMS.stream(client, rank)
        if stream is None or not isinstance(request, bn.ReduceStatisticsRequest):
            return client._run(call)
        try:
            reply = stream.send(request).result()
        except _Broken as broken:
            error = broken.error
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                _STREAMS.unary_only(client)
                return client._run(call)
            # A stream opened without a deadline ends DEADLINE_EXCEEDED only
            # by the server's idle timeout, before this message was read.
            if attempt == 0 and error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                continue
            raise error from None
        return call.parse(reply)
    raise AssertionError("unreachable: the second attempt returns or raises")


def stream_open(client: Client, rank: int) -> bool:
    """Whether the steps of `rank` on the client go over an open stream now
    (for tests)."""
    return _STREAMS.is_open(client, rank)
