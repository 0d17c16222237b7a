"""`SyncBatchNorm`: `torch.nn.SyncBatchNorm` with a normserve session in
place of a process group.

    bn = SyncBatchNorm(client, "job-42.bn1", num_features=64, world_size=4, rank=r)
    y = bn(x)            # train: nn.BatchNorm's numbers on torch.cat of all ranks' x
    y.sum().backward()   # x.grad: as on the cat; bn.weight.grad, bn.bias.grad: this rank's part
    bn.eval(); bn(x)     # the running statistics, shared by all ranks

In train mode each forward is one synchronized step of the session: the
module computes its shard's per-channel (count, mean, M2) in float64, the
server combines every rank's (ReduceStatistics, FORWARD) and updates the
running statistics once, and each rank normalizes its own shard locally with
the global mean and biased variance. The backward sends the per-channel sums
of grad_output and of grad_output * (x - mean) (ReduceStatistics, BACKWARD)
and forms grad_input from the global sums as PyTorch's SyncBatchNorm does
(batch_norm_backward_elemt), in float64. Only 2 or 3 numbers per channel
leave the process; the tensors never do. A rank's reductions, for all its
modules on one client, share one ReduceStatisticsStream (normserve.step_stream).

Weight and bias are local `nn.Parameter`s, as in nn.SyncBatchNorm: their
gradients are this rank's contributions (the sum over ranks is the global
batch's gradient), and each rank's optimizer updates its own copy, as with
DDP. The running statistics live in the session; `running_mean`,
`running_var` and `num_batches_tracked` read them, and `state_dict()` /
`load_state_dict()` carry them with PyTorch's key names.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn import functional as F

from normserve import errors, protocol, step_stream, steps
from normserve.client import Client
from normserve.results import SessionInfo
from normserve.session import Session
from normserve.v1 import batch_norm_pb2 as bn

T = TypeVar("T")

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

# Labels every rank's creation carries, so that ranks constructed with a
# different world size or affine setting are told at creation (the server
# compares labels with the rest of the configuration).
WORLD_SIZE_LABEL = "normserve.sync_batchnorm.world_size"
AFFINE_LABEL = "normserve.sync_batchnorm.affine"

_RUNNING_KEYS = ("running_mean", "running_var", "num_batches_tracked")
_LOCAL_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.BatchNorm1d, "1d"), (nn.BatchNorm2d, "2d"), (nn.BatchNorm3d, "3d"))


def kind_for_input(dim: int) -> str:
    """The session kind recorded for an input of `dim` dimensions: (N, C) and
    (N, C, L) are BatchNorm1d's, (N, C, H, W) BatchNorm2d's, more 3d's."""
    return "1d" if dim <= 3 else "2d" if dim == 4 else "3d"


class SyncBatchNorm(nn.Module):
    """nn.SyncBatchNorm over a normserve session: input (N, C, *) with at
    least 2 dimensions, on CPU or CUDA.

    client, session_id: the server and the session the ranks share; every
        rank passes the same id and configuration. The session is created
        on first use (the first forward) by whichever rank comes first, the
        others find it; a rank whose configuration differs gets
        AlreadyExists naming the differences.
    world_size, rank: the ranks of each step; all of them must run every
        train forward (and, when the input needs a gradient, the backward).
    eps, momentum, affine, track_running_stats, device, dtype: as
        nn.SyncBatchNorm (dtype also that of the session's running statistics).
    kind: the session's kind ("1d", "2d", "3d"); None: from the first input.
    step_timeout: seconds a step waits for all ranks (the session's
        step_timeout_seconds; None: the server's default, 60).
    session_device: where the session's tensors live in the server ("" the
        server's default, "cpu", "cuda", ...).
    labels: extra labels of the session.

    `step` is the number of the last step this rank completed (0 before the
    first); the next train forward is step + 1. A step is done once its
    forward reduction and, when the input needs a gradient, its backward
    reduction have succeeded; a failed one (ABORTED: a rank missed the
    barrier) leaves `step` where it was, so the iteration tried again, with
    the same batch, sends the same step: the server answers a forward it
    already applied from its record (the running statistics move once). A
    worker that restarts in the middle of a job sets `step` to the last step
    it completed; a new job on an existing session continues its numbering
    (or uses a new session id).

    Eval mode normalizes with the session's running statistics, fetched once
    per session version: the version this module saw last (its own steps,
    its own loads and resets). A change made to the session by another
    client is seen after the next step or `refresh_running_stats()`.
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    client: Client
    _session: Session | None
    # nn.BatchNorm's state_dict version (2: has num_batches_tracked), saved in
    # the state_dict's metadata, so that checkpoints move between the two.
    _version = 2

    def __init__(self, client: Client, session_id: str, num_features: int, world_size: int, rank: int,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: torch.dtype | None = None, *,
                 kind: str | None = None, step_timeout: float | None = None, session_device: str = "",
                 labels: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if not isinstance(client, Client):
            raise TypeError(f"client: expected a normserve.Client, got {type(client).__name__}")
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        steps.StepPlace(1, world_size, rank)  # checks world_size and rank
        if kind is not None and kind not in ("1d", "2d", "3d"):
            raise ValueError(f"kind must be '1d', '2d', '3d' or None, got {kind!r}")
        if step_timeout is not None and not (math.isfinite(step_timeout) and step_timeout > 0):
            raise ValueError(f"step_timeout must be a positive number of seconds, got {step_timeout!r}")
        object.__setattr__(self, "client", client)
        self.session_id = session_id
        self.num_features = num_features
        self.world_size = world_size
        self.rank = rank
        self._eps = float(eps)
        self._momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.kind = kind
        self.step_timeout = step_timeout
        self.session_device = session_device
        self.labels = dict(labels or {})
        self.step = 0
        self._dtype = dtype or torch.get_default_dtype()
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        object.__setattr__(self, "_session", None)
        # Running statistics sent with the creation (convert_sync_batchnorm's,
        # or a state_dict loaded before the first forward); `_push_initial`:
        # also written into a session that existed already (explicit loads).
        self._initial: dict[str, Any] = {}
        self._push_initial = False
        # The session version this rank saw last, and the running statistics
        # read at some version (eval mode's cache).
        self._seen_version: int | None = None
        self._eval_stats: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(
            f"SyncBatchNorm cannot be copied or pickled: it holds a connection, and its running statistics "
            f"live in normserve session {self.session_id!r}; save its state_dict()")

    # ---------------------------------------------------- configuration

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        if self._session is not None:
            self._session.update_parameters(eps=value)
        self._eps = float(value)

    @property
    def momentum(self) -> float | None:
        """The exponential-average factor; None: the cumulative average."""
        return self._momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        if self._session is not None:
            self._session.update_parameters(momentum=value)
        self._momentum = None if value is None else float(value)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, session={self.session_id!r}, "
                f"world_size={self.world_size}, rank={self.rank}")

    def _session_labels(self) -> dict[str, str]:
        return {**self.labels, WORLD_SIZE_LABEL: str(self.world_size), AFFINE_LABEL: str(self.affine).lower()}

    # ----------------------------------------------------------- session

    @property
    def session(self) -> Session | None:
        """The session handle once the module has created or found it."""
        return self._session

    def ensure_session(self, kind: str | None = None) -> Session:
        """Creates the session (or finds it, with the same configuration) now
        rather than at the first forward; kind: as the constructor's."""
        if self._session is not None:
            return self._session
        kind = self.kind or kind
        if kind is None:
            raise ValueError("the session's kind is not known before the first forward: pass kind='1d', '2d' "
                             "or '3d' to the constructor or to ensure_session")
        initial = {key: value for key, value in self._initial.items() if key in _RUNNING_KEYS}
        call = protocol.create_session(
            kind, self.num_features, eps=self._eps, momentum=self._momentum, affine=False,
            track_running_stats=self.track_running_stats, dtype=self._dtype, device=self.session_device,
            session_id=self.session_id, labels=self._session_labels(), **initial)
        request = call.request
        assert isinstance(request, bn.CreateSessionRequest)
        if self.step_timeout is not None:
            request.step_timeout_seconds = self.step_timeout
        try:
            created = self.client._run(call)
        except errors.AlreadyExists as error:
            raise self._mismatch(kind, error) from error
        session = Session(self.client, created.info.session_id, initial_info=created.info,
                          already_existed=created.already_existed)
        info = created.info
        if created.already_existed and self._push_initial and initial:
            info = session.update_parameters(**initial)
        object.__setattr__(self, "_session", session)
        self.kind = kind
        self._seen_version = info.version
        self._initial = {}
        self._push_initial = False
        return session

    def _mismatch(self, kind: str, error: errors.AlreadyExists) -> errors.AlreadyExists:
        """AlreadyExists naming what differs between this rank's configuration
        and the session's."""
        try:
            info = self.client.get_session(self.session_id).info()
        except errors.NormserveError:
            return error
        ours: dict[str, object] = {
            "kind": kind, "num_features": self.num_features, "eps": self._eps, "momentum": self._momentum,
            "track_running_stats": self.track_running_stats, "dtype": str(self._dtype).replace("torch.", ""),
            "world_size": str(self.world_size), "affine": str(self.affine).lower()}
        labels = info.labels
        theirs: dict[str, object] = {
            "kind": info.kind, "num_features": info.num_features, "eps": info.eps, "momentum": info.momentum,
            "track_running_stats": info.track_running_stats, "dtype": info.dtype,
            "world_size": labels.get(WORLD_SIZE_LABEL), "affine": labels.get(AFFINE_LABEL)}
        differences = [f"{name}={ours[name]!r} (the session has {theirs[name]!r})"
                       for name in ours if ours[name] != theirs[name]]
        if not differences:
            differences = [error.details]
        return errors.AlreadyExists(error.code, (
            f"SyncBatchNorm rank {self.rank}: session {self.session_id!r} exists with another configuration: "
            f"{', '.join(differences)}; every rank must construct its SyncBatchNorm with the same arguments"))

    def _reduce(self, call: protocol.Call[T]) -> T:
        """One step call, on the client's ReduceStatisticsStream for this
        rank where the server has one (shared by the rank's modules on the
        client), else unary;
        after UNAVAILABLE sent again (same step and request id: applied once)
        as often as the client's `retries` allow."""
        attempt = 0
        while True:
            try:
                return step_stream.run(self.client, self.rank, call)
            except errors.Unavailable:
                if attempt >= self.client.retries:
                    raise
                time.sleep(protocol.backoff(self.client.retry_backoff, attempt))
                attempt += 1

    # ------------------------------------------------------------- state

    def _server_state(self) -> dict[str, torch.Tensor] | None:
        """The session's running statistics (None: no session yet and none in
        the server)."""
        session = self._session
        if session is None:
            try:
                session = self.client.get_session(self.session_id)
            except errors.NotFound:
                return None
        state = session.state_dict()
        return {key: state[key] for key in _RUNNING_KEYS if key in state}

    def _running(self, key: str) -> torch.Tensor | None:
        if not self.track_running_stats:
            return None
        state = self._server_state()
        if state is not None:
            return state.get(key)
        return self._initial_state()[key]

    def _initial_state(self) -> dict[str, torch.Tensor]:
        """What a new session would start from: nn.BatchNorm's defaults or the
        values given before the first forward."""
        defaults = {"running_mean": torch.zeros(self.num_features, dtype=self._dtype),
                    "running_var": torch.ones(self.num_features, dtype=self._dtype),
                    "num_batches_tracked": torch.tensor(0, dtype=torch.long)}
        for key, value in self._initial.items():
            defaults[key] = torch.as_tensor(value).detach().to("cpu", defaults[key].dtype).clone()
        return defaults

    @property
    def running_mean(self) -> torch.Tensor | None:
        """A snapshot of the session's running mean (None without
        track_running_stats)."""
        return self._running("running_mean")

    @property
    def running_var(self) -> torch.Tensor | None:
        return self._running("running_var")

    @property
    def num_batches_tracked(self) -> torch.Tensor | None:
        return self._running("num_batches_tracked")

    def reset_running_stats(self) -> None:
        """running_mean 0, running_var 1, num_batches_tracked 0 in the session."""
        if not self.track_running_stats:
            return
        if self._session is None and self._server_state() is None:
            self._initial = {}
            return
        session = self._session or self.client.get_session(self.session_id)
        self._seen_version = session.reset_running_stats().version
        self._eval_stats = None

    def reset_parameters(self) -> None:
        """nn.SyncBatchNorm.reset_parameters: running statistics reset, weight 1, bias 0."""
        self.reset_running_stats()
        if self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def refresh_running_stats(self) -> None:
        """Reads the session's running statistics again at the next eval forward."""
        self._eval_stats = None
        self._seen_version = None

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.track_running_stats:
            state = self._server_state() or self._initial_state()
            for key in _RUNNING_KEYS:
                destination[prefix + key] = state[key]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        running = {key: state_dict[prefix + key] for key in _RUNNING_KEYS if prefix + key in state_dict}
        local = {key: value for key, value in state_dict.items() if key[len(prefix):] not in _RUNNING_KEYS
                 or not key.startswith(prefix)}
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.track_running_stats:
            unexpected_keys.extend(prefix + key for key in running if strict)
            return
        # nn.BatchNorm's rule: a state_dict from before num_batches_tracked existed loads without it.
        version = local_metadata.get("version")
        required = _RUNNING_KEYS if version is not None and version >= 2 else _RUNNING_KEYS[:2]
        missing = [prefix + key for key in required if key not in running]
        if missing:
            missing_keys.extend(missing)
            return
        for key, value in running.items():
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f"While copying the parameter named {prefix + key!r}, expected a torch.Tensor")
                return
            if key != "num_batches_tracked" and value.shape != (self.num_features,):
                error_msgs.append(f"size mismatch for {prefix + key}: copying a param with shape "
                                  f"{value.shape} from checkpoint, the shape in current model is "
                                  f"torch.Size([{self.num_features}]).")
                return
        if self._session is not None or (self.kind is not None and self._server_state() is not None):
            session = self.ensure_session()
            values: dict[str, Any] = {key: value.detach().cpu() for key, value in running.items()
                                      if key != "num_batches_tracked"}
            if "num_batches_tracked" in running:
                values["num_batches_tracked"] = int(running["num_batches_tracked"])
            self._seen_version = session.update_parameters(**values).version
            self._eval_stats = None
        else:
            self._initial = {key: value.detach().cpu().clone() for key, value in running.items()}
            if "num_batches_tracked" in self._initial:
                self._initial["num_batches_tracked"] = int(self._initial["num_batches_tracked"])
            self._push_initial = True


    # ----------------------------------------------------------- forward

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels (dim 1), got shape "
                             f"{tuple(input.shape)}")
        if self.training:
            return self._train_forward(input)
        if not self.track_running_stats:
            # nn.SyncBatchNorm without running statistics: the batch's own (local) statistics.
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self._eps)
        mean, var = self._eval_running_stats(input)
        return F.batch_norm(input, mean, var, self.weight, self.bias, False, 0.0, self._eps)

    def _eval_running_stats(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        session = self.ensure_session(kind_for_input(input.dim()))
        cached = self._eval_stats
        if cached is None or self._seen_version is None or cached[0] != self._seen_version:
            info: SessionInfo = session.info()
            state = info.state_dict()
            cached = (info.version, state["running_mean"], state["running_var"])
            self._eval_stats = cached
            self._seen_version = info.version
        dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
        return cached[1].to(input.device, dtype), cached[2].to(input.device, dtype)

    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:
        session = self.ensure_session(kind_for_input(input.dim()))
        place = steps.StepPlace(self.step + 1, self.world_size, self.rank)
        dims = [0, *range(2, input.dim())]
        count = input.numel() // self.num_features
        if count > 0:
            var, mean = torch.var_mean(input.detach().to(torch.float64), dim=dims, correction=0)
            m2 = var * count
        else:
            mean = m2 = torch.zeros(self.num_features, dtype=torch.float64)
        stats = self._reduce(steps.reduce_forward(
            session.session_id, place, count=count, mean=mean.cpu().numpy(), m2=m2.cpu().numpy(),
            update_running_stats=self.track_running_stats))
        # The step is done for this rank: the next forward is the next step,
        # whether or not a backward follows (a backward carries its own step).
        self.step = place.step
        self._seen_version = stats.version
        global_mean = torch.as_tensor(stats.mean, dtype=torch.float64).to(input.device)
        global_var = torch.as_tensor(stats.var, dtype=torch.float64).to(input.device)
        output: torch.Tensor = _SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
            input, self.weight, self.bias, global_mean, global_var, stats.count, self._eps, self, place)
        return output

    def _reduce_backward(self, place: steps.StepPlace, sum_dy: torch.Tensor,
                         sum_dy_xmu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        session = self._session
        assert session is not None  # a backward follows a forward, which made it
        try:
            sums = self._reduce(steps.reduce_backward(
                session.session_id, place, sum_grad_output=sum_dy.cpu().numpy(),
                sum_grad_output_centered=sum_dy_xmu.cpu().numpy()))
        except errors.NormserveError:
            # The step is not done: the iteration tried again (with the same
            # batch) sends the same step, whose forward the server answers
            # from its record, and then this backward.
            if self.step == place.step:
                self.step = place.step - 1
            raise
        return (torch.as_tensor(sums.sum_grad_output, dtype=torch.float64).to(sum_dy.device),
                torch.as_tensor(sums.sum_grad_output_centered, dtype=torch.float64).to(sum_dy.device))


def _channel_view(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(C,) viewed to broadcast over (N, C, *) with `dim` dimensions."""
    return values.view(1, -1, *([1] * (dim - 2)))


class _SyncBatchNormFunction(torch.autograd.Function):
    """The normalization with given global statistics, and the backward of
    PyTorch's SyncBatchNorm (batch_norm_backward_reduce, an all-reduce of two
    sums per channel through the session, batch_norm_backward_elemt), in
    float64. Inputs: x (N, C, *), weight and bias (C,) or None, the global
    mean and biased variance (C,) float64, the global count per channel."""

    @staticmethod
    def forward(ctx: FunctionCtx, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mean: torch.Tensor, var: torch.Tensor, count: int, eps: float, module: SyncBatchNorm,
                place: steps.StepPlace) -> torch.Tensor:
        dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
        output = F.batch_norm(input, mean.to(dtype), var.to(dtype), weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(input, weight, mean, invstd)  # type: ignore[arg-type]  # weight may be None
        ctx.count = count  # type: ignore[attr-defined]
        ctx.module = module  # type: ignore[attr-defined]
        ctx.place = place  # type: ignore[attr-defined]
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        dims = [0, *range(2, input.dim())]
        dy = grad_output.to(torch.float64)
        xmu = input.to(torch.float64) - _channel_view(mean, input.dim())
        sum_dy = dy.sum(dim=dims)
        sum_dy_xmu = (dy * xmu).sum(dim=dims)
        grad_input = grad_weight = grad_bias = None
        if need_weight:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if need_bias:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else grad_output.dtype)
        if need_input:
            global_dy, global_dy_xmu = ctx.module._reduce_backward(ctx.place, sum_dy, sum_dy_xmu)
            mean_dy = _channel_view(global_dy / ctx.count, input.dim())
            mean_dy_xmu = _channel_view(global_dy_xmu / ctx.count, input.dim())
            scale = invstd if weight is None else invstd * weight.to(torch.float64)
            grad = (dy - mean_dy - xmu * _channel_view(invstd * invstd, input.dim()) * mean_dy_xmu)
            grad_input = (grad * _channel_view(scale, input.dim())).to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def convert_sync_batchnorm(module: nn.Module, client: Client, prefix: str, world_size: int, rank: int,
                           **options: Any) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm with normserve in place of a
    process group: every nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm of
    `module` (itself included) becomes a SyncBatchNorm on the session
    `prefix` + "." + its qualified name (`prefix` for `module` itself), with
    its configuration and mode; weight and bias are the same Parameter
    objects (an optimizer made before still holds them), and its running
    statistics are the new session's initial ones (a session that exists
    keeps its own). Returns the module (a new one when `module` is a batch
    norm). options: SyncBatchNorm's keyword-only ones (step_timeout,
    session_device, labels)."""
    return _convert(module, client, prefix, world_size, rank, options)


def _convert(module: nn.Module, client: Client, session_id: str, world_size: int, rank: int,
             options: dict[str, Any]) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        kind = next((name for local, name in _LOCAL_KINDS if isinstance(module, local)), None)
        reference = module.weight if module.weight is not None else module.running_mean
        dtype = reference.dtype if reference is not None else None
        device = reference.device if reference is not None else None
        converted = SyncBatchNorm(client, session_id, module.num_features, world_size, rank, eps=module.eps,
                                  momentum=module.momentum, affine=module.affine,
                                  track_running_stats=module.track_running_stats, device=device, dtype=dtype,
                                  kind=kind, **options)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        if module.track_running_stats and module.running_mean is not None and module.running_var is not None:
            converted._initial = {"running_mean": module.running_mean.detach().cpu().clone(),
                                  "running_var": module.running_var.detach().cpu().clone()}
            if module.num_batches_tracked is not None:
                converted._initial["num_batches_tracked"] = int(module.num_batches_tracked)
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
        return converted
    for name, child in module.named_children():
        converted_child = _convert(child, client, f"{session_id}.{name}", world_size, rank, options)
        if converted_child is not child:
            module.add_module(name, converted_child)
    return module
