"""Compare: PyTorch's batch norm beside the textbook formulas and the caller's
own results, with the differences and a diagnosis, as a readable report."""

from __future__ import annotations

import collections.abc
import dataclasses
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from normserve import codec
from normserve.codec import Array
from normserve.results import UNSET, _Unset
from normserve.v1 import compare_pb2

IMPLEMENTATIONS = {
    compare_pb2.IMPLEMENTATION_REFERENCE: "reference",
    compare_pb2.IMPLEMENTATION_FLOAT64_REFERENCE: "float64_reference",
    compare_pb2.IMPLEMENTATION_MANUAL_BIASED: "manual_biased",
    compare_pb2.IMPLEMENTATION_MANUAL_UNBIASED: "manual_unbiased",
    compare_pb2.IMPLEMENTATION_CANDIDATE: "candidate",
}
_BY_NAME = {name: value for value, name in IMPLEMENTATIONS.items()}
# The tensors an implementation may report, in the proto's order.
PARTS = ("output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias")


def _implementation_value(name: str | int) -> int:
    if isinstance(name, str) and name in _BY_NAME:
        return _BY_NAME[name]
    if isinstance(name, int) and not isinstance(name, bool):
        return name  # an Implementation value; the server validates it
    raise ValueError(f"unknown implementation {name!r}: expected one of {', '.join(_BY_NAME)}")


def build_request(x: Array, *, module: Any = None, weight: Array | None = None, bias: Array | None = None,
                  running_mean: Array | None = None, running_var: Array | None = None,
                  num_batches_tracked: int | None = None, training: bool | None = None, eps: float | None = None,
                  momentum: float | None | _Unset = UNSET, grad_output: Array | None = None,
                  candidate: Array | Mapping[str, Array] | None = None, rtol: float | None = None,
                  atol: float | None = None, implementations: Sequence[str | int] | None = None,
                  return_tensors: bool = False, device: str = "") -> compare_pb2.CompareRequest:
    """The CompareRequest of Client.compare's arguments."""
    if module is not None:
        if module.affine:
            weight = module.weight if weight is None else weight
            bias = module.bias if bias is None else bias
        if module.track_running_stats and module.running_mean is not None:
            running_mean = module.running_mean if running_mean is None else running_mean
            running_var = module.running_var if running_var is None else running_var
            if num_batches_tracked is None:
                num_batches_tracked = int(module.num_batches_tracked)
        training = module.training if training is None else training
        eps = module.eps if eps is None else eps
        momentum = module.momentum if isinstance(momentum, _Unset) else momentum
    request = compare_pb2.CompareRequest(
        input=codec.encode(x),
        num_batches_tracked=num_batches_tracked or 0,
        training=True if training is None else bool(training),
        return_tensors=return_tensors,
        device=device or "",
    )
    if eps is not None:
        request.eps = eps
    if momentum is None:
        request.cumulative_average = True
    elif not isinstance(momentum, _Unset):
        request.momentum = momentum
    for field, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var), ("grad_output", grad_output)):
        if value is not None:
            getattr(request, field).CopyFrom(codec.encode(value))
    if candidate is not None:
        if not isinstance(candidate, collections.abc.Mapping):
            candidate = {"output": candidate}
        unknown = sorted(set(candidate) - set(PARTS))
        if unknown:
            raise ValueError(f"candidate: unknown part(s) {', '.join(unknown)}; expected any of {', '.join(PARTS)}")
        request.candidate.SetInParent()
        for part, value in candidate.items():
            getattr(request.candidate, part).CopyFrom(codec.encode(value))
    if rtol is not None:
        request.rtol = rtol
    if atol is not None:
        request.atol = atol
    for name in implementations or ():
        request.implementations.append(_implementation_value(name))  # type: ignore[arg-type]
    return request


@dataclasses.dataclass(frozen=True)
class Difference:
    """How one tensor differs from a baseline, both widened to float64."""

    max_abs_diff: float
    max_rel_diff: float
    # Multi-index (n, c, spatial...) of the largest |a - b|; (c,) for (C,) tensors.
    argmax_index: tuple[int, ...]
    per_channel_max_abs_diff: tuple[float, ...]
    # torch.allclose(a, b, rtol, atol, equal_nan=True).
    allclose: bool
    mismatched_elements: int

    @classmethod
    def from_proto(cls, message: compare_pb2.Difference) -> Difference:
        return cls(message.max_abs_diff, message.max_rel_diff, tuple(message.argmax_index),
                   tuple(message.per_channel_max_abs_diff), message.allclose, message.mismatched_elements)


@dataclasses.dataclass(frozen=True)
class TensorReport:
    """One tensor of one implementation against both references; `values` is
    the tensor itself when return_tensors was set (numpy or torch, as the
    input was), else None."""

    vs_float64_reference: Difference
    vs_reference: Difference
    values: Array | None


@dataclasses.dataclass(frozen=True)
class ImplementationReport:
    """The tensors one implementation produced, by part name (output,
    running_mean, running_var, grad_input, grad_weight, grad_bias)."""

    name: str
    tensors: dict[str, TensorReport]

    def __getitem__(self, part: str) -> TensorReport:
        return self.tensors[part]


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A known mistake tested against the candidate."""

    name: str
    explains: bool
    # How many tolerances away from the simulated mistake the candidate is.
    tolerance_ratio: float
    max_abs_diff: float
    explanation: str
    fix: str
    parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    matches_reference: bool
    # Best first.
    hypotheses: tuple[Hypothesis, ...]
    # What this input cannot tell apart, and the input that would.
    ambiguities: tuple[str, ...]
    summary: str

    @property
    def best(self) -> Hypothesis | None:
        """The best hypothesis that explains the candidate, or None."""
        return next((h for h in self.hypotheses if h.explains), None)


@dataclasses.dataclass(frozen=True, eq=False)
class CompareReport:
    """A Compare reply. `report["candidate"]["output"].vs_float64_reference`
    reaches any number; `print(report)` shows them as a table, followed by
    the diagnosis when a candidate was sent."""

    # By implementation name, in the server's order.
    implementations: dict[str, ImplementationReport]
    # None without a candidate.
    diagnosis: Diagnosis | None
    rtol: float
    atol: float
    device: str
    proto: compare_pb2.CompareResponse = dataclasses.field(repr=False)

    @classmethod
    def from_proto(cls, reply: compare_pb2.CompareResponse, like: Array | None = None) -> CompareReport:
        implementations = {}
        for report in reply.reports:
            name = IMPLEMENTATIONS.get(report.implementation, str(report.implementation))
            tensors = {}
            for part in PARTS:
                if report.HasField(part):
                    message = getattr(report, part)
                    values = codec.decode_like(message.values, like) if message.HasField("values") else None
                    tensors[part] = TensorReport(Difference.from_proto(message.vs_float64_reference),
                                                 Difference.from_proto(message.vs_reference), values)
            implementations[name] = ImplementationReport(name, tensors)
        diagnosis = None
        if reply.HasField("diagnosis"):
            d = reply.diagnosis
            diagnosis = Diagnosis(
                matches_reference=d.matches_reference,
                hypotheses=tuple(Hypothesis(h.name, h.explains, h.tolerance_ratio, h.max_abs_diff,
                                            h.explanation, h.fix, tuple(h.parts)) for h in d.hypotheses),
                ambiguities=tuple(d.ambiguities),
                summary=d.summary,
            )
        return cls(implementations, diagnosis, reply.rtol, reply.atol, reply.device, reply)

    def __getitem__(self, name: str) -> ImplementationReport:
        return self.implementations[name]

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def _lines(self) -> Iterator[str]:
        yield f"Compare on {self.device}, tolerance rtol={self.rtol:g} atol={self.atol:g}"
        header = ("implementation", "tensor", "max abs", "max rel", "at", "allclose", "max abs", "allclose")
        rows = []
        for name, report in self.implementations.items():
            for position, (part, tensor) in enumerate(report.tensors.items()):
                f64, ref = tensor.vs_float64_reference, tensor.vs_reference
                at = _index(f64.argmax_index) if f64.max_abs_diff != 0 else "-"
                rows.append((name if position == 0 else "", part, _number(f64.max_abs_diff),
                             _number(f64.max_rel_diff), at, _verdict(f64), _number(ref.max_abs_diff),
                             _verdict(ref)))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

        left = sum(widths[:2]) + 4
        groups = " " * left + "vs float64 reference".ljust(sum(widths[2:6]) + 8) + "vs reference"
        yield ""
        yield groups.rstrip()
        yield line(header)
        for row in rows:
            yield line(row)
        if self.diagnosis is None:
            return
        d = self.diagnosis
        yield ""
        verdict = "matches the reference" if d.matches_reference else "does NOT match the reference"
        yield f"Diagnosis: the candidate {verdict}."
        yield from _wrap(d.summary, width=100, initial_indent="  ", subsequent_indent="  ")
        if d.hypotheses:
            yield ""
            yield "Hypotheses, best first (ratio: distance from the simulated mistake, in tolerances):"
            width = max(len(h.name) for h in d.hypotheses)
            for h in d.hypotheses:
                mark = "explains" if h.explains else "no"
                yield (f"  {h.name.ljust(width)}  {mark:<8}  ratio {_number(h.tolerance_ratio):<8}  "
                       f"max abs {_number(h.max_abs_diff):<8}  on {', '.join(h.parts)}").rstrip()
                if h.explains:
                    yield from _wrap(h.explanation, width=100, initial_indent="      mistake: ",
                                             subsequent_indent=" " * 15)
                    yield from _wrap(h.fix, width=100, initial_indent="      fix:     ",
                                             subsequent_indent=" " * 15)
        if d.ambiguities:
            yield ""
            yield "What this input cannot tell apart:"
            for sentence in d.ambiguities:
                yield from _wrap(sentence, width=100, initial_indent="  - ", subsequent_indent="    ")


def _wrap(text: str, **options: Any) -> list[str]:
    # Never split words or at hyphens: "m-1" and "x.var(dim=...)" stay whole.
    return textwrap.wrap(text, break_long_words=False, break_on_hyphens=False, **options)


def _number(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def _index(index: Sequence[int]) -> str:
    return "(" + ", ".join(str(i) for i in index) + ")" if index else "-"


def _verdict(difference: Difference) -> str:
    return "yes" if difference.allclose else f"NO ({difference.mismatched_elements} off)"
