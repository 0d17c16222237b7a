"""What a ReduceStatistics call (synchronized steps, statistics only) sends
and how its reply reads, for the blocking and the asyncio client alike: the
same `protocol.Call` objects as every other call, no I/O here.

A step is one rendezvous of `world_size` ranks on a session: each rank sends
its shard's per-channel statistics and, once every rank has arrived, all of
them get the global ones. FORWARD carries (count, mean, M2) and may apply the
running-statistics update once for the step; BACKWARD carries the sums a
batch norm's backward needs and changes nothing.

These calls are not retried on ABORTED (a step whose ranks did not all
arrive in time is reported, not re-entered), so `Call.retry` is False; a
caller that retries after UNAVAILABLE sends the same request (same step,
same request_id) and gets the applied step's answer again, never a second
update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from normserve.protocol import Call, Method
from normserve.v1 import batch_norm_pb2 as bn

REDUCE_STATISTICS = Method.of(bn, "BatchNormService", "ReduceStatistics")

FloatArray = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class StepPlace:
    """One rank's place in a synchronized step."""

    step: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    def proto(self) -> bn.StepSpec:
        return bn.StepSpec(step=self.step, world_size=self.world_size, rank=self.rank)

    def request_id(self, phase: str) -> str:
        """The request id of this place's call in `phase` ("forward" or
        "backward"): derived from the place, so that a retry, also from a
        restarted worker, is recognised as the same call."""
        return f"step-{self.step}-rank-{self.rank}-{phase}"


@dataclasses.dataclass(frozen=True)
class GlobalStatistics:
    """A FORWARD reduction's answer: the global batch's per-channel count,
    mean, biased variance (what normalizes) and unbiased variance (what the
    running statistics were updated with; NaN when count is 1)."""

    step: int
    count: int
    mean: FloatArray
    var: FloatArray
    unbiased_var: FloatArray
    # The session after the step.
    version: int
    num_batches_tracked: int
    # True when the server answered from its record of the applied step.
    replayed: bool


@dataclasses.dataclass(frozen=True)
class GlobalGradientSums:
    """A BACKWARD reduction's answer: per channel, the sums over all ranks of
    grad_output and of grad_output * (x - global mean)."""

    sum_grad_output: FloatArray
    sum_grad_output_centered: FloatArray
    version: int
    replayed: bool


def _values(values: Sequence[float] | FloatArray, name: str, num_features: int) -> list[float]:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.shape[0] != num_features:
        raise ValueError(f"{name}: expected {num_features} values (one per channel), got {array.shape[0]}")
    # tolist() makes the Python floats in one C loop (a float per element
    # through Python costs more than the rest of the call at 1024 channels).
    floats: list[float] = array.tolist()
    return floats


def _array(values: object) -> FloatArray:
    return np.array(values, dtype=np.float64)


def reduce_forward(session_id: str, place: StepPlace, *, count: int, mean: Sequence[float] | FloatArray,
                   m2: Sequence[float] | FloatArray, update_running_stats: bool) -> Call[GlobalStatistics]:
    """The FORWARD reduction of one rank: its shard's values per channel
    (`count`, may be 0), per-channel `mean` and `m2` (sum of squared
    deviations from that mean); `update_running_stats` applies the
    running-statistics update once for the step (the same on every rank)."""
    num_features = len(np.asarray(mean).reshape(-1))
    request = bn.ReduceStatisticsRequest(
        session_id=session_id, step=place.proto(), phase=bn.REDUCE_PHASE_FORWARD, count=int(count),
        mean=_values(mean, "mean", num_features), m2=_values(m2, "m2", num_features),
        update_running_stats=update_running_stats, request_id=place.request_id("forward"))

    def parse(reply: bn.ReduceStatisticsResponse) -> GlobalStatistics:
        stats = reply.statistics
        return GlobalStatistics(stats.step, stats.count, _array(stats.mean), _array(stats.var),
                                _array(stats.unbiased_var), reply.version, reply.num_batches_tracked,
                                reply.replayed)

    return Call(REDUCE_STATISTICS, request, False, parse)


def reduce_backward(session_id: str, place: StepPlace, *, sum_grad_output: Sequence[float] | FloatArray,
                    sum_grad_output_centered: Sequence[float] | FloatArray) -> Call[GlobalGradientSums]:
    """The BACKWARD reduction of one rank, after the step's FORWARD: its
    per-channel sums of grad_output and of grad_output * (x - global mean)."""
    num_features = len(np.asarray(sum_grad_output).reshape(-1))
    request = bn.ReduceStatisticsRequest(
        session_id=session_id, step=place.proto(), phase=bn.REDUCE_PHASE_BACKWARD,
        sum_grad_output=_values(sum_grad_output, "sum_grad_output", num_features),
        sum_grad_output_centered=_values(sum_grad_output_centered, "sum_grad_output_centered", num_features),
        request_id=place.request_id("backward"))

    def parse(reply: bn.ReduceStatisticsResponse) -> GlobalGradientSums:
        return GlobalGradientSums(_array(reply.sum_grad_output), _array(reply.sum_grad_output_centered),
                                  reply.version, reply.replayed)

    return Call(REDUCE_STATISTICS, request, False, parse)
