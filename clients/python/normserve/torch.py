"""Drop-in `torch.nn` modules whose batch norm runs in a normserve session.

    from normserve.torch import RemoteBatchNorm2d, convert_batch_norms

    bn = RemoteBatchNorm2d(3, client=client)       # like nn.BatchNorm2d(3)
    model = convert_batch_norms(model, client)     # every nn.BatchNorm*d of a model

The module's mode (`train()` / `eval()`) picks the mode of each forward;
`state_dict()` and `load_state_dict()` use PyTorch's key names and rules, so
a state moves freely between `nn.BatchNorm2d` and `RemoteBatchNorm2d`, also
inside a larger model. The state lives in the server: the module has no
local parameters or buffers, `weight`, `running_mean`, ... are read-only
snapshots fetched on access, `.to()` / `.half()` change nothing remote, and
the forward is not differentiable (an input that requires grad is refused
while autograd is recording; call it under `torch.no_grad()`).

`SyncBatchNorm` and `convert_sync_batchnorm` (from normserve.sync_batchnorm)
are nn.SyncBatchNorm with a session in place of a process group: each rank
normalizes locally with the global batch's statistics, and the backward is
differentiable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn

from normserve.client import Client
from normserve.results import SessionInfo, state_dict_from_safetensors
from normserve.session import Session
from normserve.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

R = TypeVar("R", bound="_RemoteBatchNorm")

__all__ = ["RemoteBatchNorm1d", "RemoteBatchNorm2d", "RemoteBatchNorm3d", "SyncBatchNorm", "convert_batch_norms",
           "convert_sync_batchnorm"]


class _RemoteBatchNorm(nn.Module):
    _kind: str  # "1d", "2d", "3d"
    _local: type[nn.modules.batchnorm._BatchNorm]  # the nn class it replaces
    session: Session
    num_features: int
    affine: bool
    track_running_stats: bool
    _eps: float
    _momentum: float | None
    _dtype: torch.dtype
    # nn.BatchNorm's state_dict version (2: has num_batches_tracked); saved
    # in state_dict metadata so the states load into each other unchanged.
    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: torch.dtype | None = None, *,
                 client: Client, session_id: str | None = None, labels: Mapping[str, str] | None = None) -> None:
        """As nn.BatchNorm, plus the client to create the session with;
        `device` is where the session's tensors live in the server ("cpu",
        "cuda", "cuda:N"; None: the server's default), `dtype` their dtype
        (default float32). session_id and labels as Client.create_session."""
        super().__init__()
        session = client.create_session(
            self._kind, num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, dtype=dtype or torch.float32,
            device="" if device is None else str(torch.device(device)), session_id=session_id, labels=labels)
        self._attach(session, _initial_info(session))

    @classmethod
    def from_module(cls: type[R], module: nn.Module, *, client: Client, **options: Any) -> R:
        """A remote copy of a local nn.BatchNorm of the same kind: its
        configuration, state and mode (options as Client.create_session)."""
        if not isinstance(module, cls._local):
            raise TypeError(f"{cls.__name__}.from_module expects a {cls._local.__name__}, "
                            f"got {type(module).__name__}")
        session = client.create_session_from_module(module, **options)
        remote = cls.__new__(cls)
        nn.Module.__init__(remote)
        remote._attach(session, _initial_info(session))
        return remote.train(module.training)

    @classmethod
    def from_session(cls: type[R], session: Session) -> R:
        """A module on an existing session (a Session handle) of this kind."""
        info = session.info()
        if info.kind != cls._kind:
            raise TypeError(f"{cls.__name__} needs a {cls._kind} session, {info.session_id!r} is {info.kind}")
        remote = cls.__new__(cls)
        nn.Module.__init__(remote)
        remote._attach(session, info)
        return remote.train(session.training)

    def _attach(self, session: Session, info: SessionInfo) -> None:
        if not isinstance(session, Session):
            raise TypeError(f"expected a normserve.Session, got {type(session).__name__}")
        # object.__setattr__: plain attributes, not submodules or parameters.
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "num_features", info.num_features)
        object.__setattr__(self, "affine", info.affine)
        object.__setattr__(self, "track_running_stats", info.track_running_stats)
        object.__setattr__(self, "_eps", info.eps)
        object.__setattr__(self, "_momentum", info.momentum)
        object.__setattr__(self, "_dtype", getattr(torch, info.dtype))

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        # What would be copied is a connection; the state is in the server.
        raise TypeError(
            f"{type(self).__name__} cannot be copied or pickled: its state lives in normserve session "
            f"{self.session.session_id!r}. Save its state_dict(), or attach another module to the session "
            f"with {type(self).__name__}.from_session(client.get_session(session_id))")

    # ---------------------------------------------------- configuration

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.session.update_parameters(eps=value)
        object.__setattr__(self, "_eps", float(value))

    @property
    def momentum(self) -> float | None:
        """The exponential-average factor; None: the cumulative average."""
        return self._momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        self.session.update_parameters(momentum=value)
        object.__setattr__(self, "_momentum", None if value is None else float(value))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, session={self.session.session_id!r}")

    # ------------------------------------------------------------- state

    def _snapshot(self, key: str) -> torch.Tensor | None:
        return self.session.info().state_dict().get(key)

    @property
    def weight(self) -> torch.Tensor | None:
        """A snapshot of the session's weight (None without affine)."""
        return self._snapshot("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self._snapshot("bias")

    @property
    def running_mean(self) -> torch.Tensor | None:
        return self._snapshot("running_mean")

    @property
    def running_var(self) -> torch.Tensor | None:
        return self._snapshot("running_var")

    @property
    def num_batches_tracked(self) -> torch.Tensor | None:
        return self._snapshot("num_batches_tracked")

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.session.reset_running_stats()

    def reset_parameters(self) -> None:
        """nn.BatchNorm.reset_parameters: running statistics reset, weight 1, bias 0."""
        self.reset_running_stats()
        if self.affine:
            ones = torch.ones(self.num_features)
            self.session.update_parameters(weight=ones, bias=torch.zeros(self.num_features))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for key, value in self.session.state_dict().items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # PyTorch's own loading rules and texts, on a local stand-in holding
        # the session's current state; what it loads is then written back with
        # a compare-and-set on the exported version, so a concurrent change
        # fails (Aborted) instead of being overwritten.
        exported = self.session.export_state()
        stand_in = self._local(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                               track_running_stats=self.track_running_stats, dtype=self._dtype)
        stand_in.load_state_dict(state_dict_from_safetensors(exported.safetensors))
        stand_in._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                       unexpected_keys, error_msgs)
        names = stand_in.state_dict().keys()
        if any(prefix + name in state_dict for name in names):
            self.session.load_state_dict(stand_in.state_dict(), expected_version=exported.version)

    # ----------------------------------------------------------- forward

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and input.requires_grad:
            raise RuntimeError(
                f"{type(self).__name__} is not differentiable (the batch norm runs in the server): "
                f"call it under torch.no_grad(), or pass input.detach()")
        output: torch.Tensor = self.session.forward(input, train=self.training)
        return output


def _initial_info(session: Session) -> SessionInfo:
    # create_session always sets it; checked so that a None cannot slip through.
    if session.initial_info is None:
        raise RuntimeError(f"session {session.session_id!r} carries no SessionInfo")
    return session.initial_info


class RemoteBatchNorm1d(_RemoteBatchNorm):
    """nn.BatchNorm1d on a normserve session: input (N, C) or (N, C, L)."""

    _kind = "1d"
    _local = nn.BatchNorm1d


class RemoteBatchNorm2d(_RemoteBatchNorm):
    """nn.BatchNorm2d on a normserve session: input (N, C, H, W)."""

    _kind = "2d"
    _local = nn.BatchNorm2d


class RemoteBatchNorm3d(_RemoteBatchNorm):
    """nn.BatchNorm3d on a normserve session: input (N, C, D, H, W)."""

    _kind = "3d"
    _local = nn.BatchNorm3d


_REMOTE: tuple[tuple[type[nn.Module], type[_RemoteBatchNorm]], ...] = ((nn.BatchNorm1d, RemoteBatchNorm1d), (nn.BatchNorm2d, RemoteBatchNorm2d),
           (nn.BatchNorm3d, RemoteBatchNorm3d))


def convert_batch_norms(module: nn.Module, client: Client, **options: Any) -> nn.Module:
    """Replaces every nn.BatchNorm{1,2,3}d in `module` (itself included) by a
    remote copy with its configuration, state and mode; returns the module
    (a new one when `module` itself is a batch norm). Options as
    Client.create_session (device, labels, ...); each layer gets its own
    session."""
    for local, remote in _REMOTE:
        if isinstance(module, local):
            return remote.from_module(module, client=client, **options)
    for name, child in module.named_children():
        converted = convert_batch_norms(child, client, **options)
        if converted is not child:
            setattr(module, name, converted)
    return module
