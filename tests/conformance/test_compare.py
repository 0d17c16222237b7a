"""CompareService.Compare against PyTorch.

Every number the RPC returns is recomputed here in float64 with torch/numpy:

* The tensors behind the reports (return_tensors=True) are checked against this
  file's own computations: `F.batch_norm` exactly as `nn.BatchNorm` calls it,
  with autograd for the gradients, and the textbook formulas written out below
  (also differentiated by autograd, while the server uses closed forms).
* The difference statistics are recomputed from those tensors with numpy and
  must agree exactly; differences against the float64 reference are also
  recomputed against this file's own float64 reference.
* Every hypothesis is a hand-written wrong batch norm below; its simulation
  must be ranked first when it produced the candidate, and every hypothesis's
  max_abs_diff and tolerance_ratio is recomputed from those implementations.
"""

import json
import math
import shutil
import subprocess
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import json_format

import normserve
from conftest import ServerProcess
from normserve.v1 import (
    batch_norm_pb2,
    batch_norm_pb2_grpc,
    compare_pb2,
    compare_pb2_grpc,
    server_pb2,
    tensor_pb2,
)
from wire import from_proto, to_proto

IMPL = compare_pb2
PARTS = ("output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias")
NORMALIZATION_PARTS = ("output", "grad_input", "grad_weight", "grad_bias")
RUNNING_PARTS = ("running_mean", "running_var")
IMPLEMENTATION_NAMES = {
    IMPL.IMPLEMENTATION_REFERENCE: "reference",
    IMPL.IMPLEMENTATION_FLOAT64_REFERENCE: "float64_reference",
    IMPL.IMPLEMENTATION_MANUAL_BIASED: "manual_biased",
    IMPL.IMPLEMENTATION_MANUAL_UNBIASED: "manual_unbiased",
    IMPL.IMPLEMENTATION_CANDIDATE: "candidate",
}


# ---------------------------------------------------------------- the problem


class Problem:
    """One Compare call's inputs, as torch tensors (None where absent)."""

    def __init__(self, x, weight=None, bias=None, running_mean=None, running_var=None,
                 num_batches_tracked=0, training=True, eps=1e-5, momentum=0.1,
                 grad_output=None):
        self.x = x
        self.weight = weight
        self.bias = bias
        self.running_mean = running_mean
        self.running_var = running_var
        self.num_batches_tracked = num_batches_tracked
        self.training = training
        self.eps = eps
        self.momentum = momentum  # None: cumulative average
        self.grad_output = grad_output

    @property
    def tracks(self):
        return self.running_mean is not None

    @property
    def uses_batch_stats(self):
        return self.training or not self.tracks

    @property
    def updates(self):
        return self.training and self.tracks

    @property
    def factor(self):
        """nn.BatchNorm's exponential_average_factor for this step."""
        if not self.updates:
            return 0.0
        if self.momentum is None:
            return 1.0 / (self.num_batches_tracked + 1)
        return self.momentum

    @property
    def dims(self):
        return [0, *range(2, self.x.dim())]

    @property
    def channel_shape(self):
        return [1, self.x.shape[1]] + [1] * (self.x.dim() - 2)

    @property
    def m(self):
        return self.x.numel() // self.x.shape[1]

    def request(self, candidate=None, **fields):
        msg = compare_pb2.CompareRequest(
            input=to_proto(self.x),
            num_batches_tracked=self.num_batches_tracked,
            training=self.training,
            eps=self.eps,
            **fields,
        )
        if self.momentum is None:
            msg.cumulative_average = True
        else:
            msg.momentum = self.momentum
        for name in ("weight", "bias", "running_mean", "running_var", "grad_output"):
            value = getattr(self, name)
            if value is not None:
                getattr(msg, name).CopyFrom(to_proto(value))
        if candidate is not None:
            msg.candidate.SetInParent()
            for name, value in candidate.items():
                getattr(msg.candidate, name).CopyFrom(to_proto(value))
        return msg


def leaf(t, dtype=None, grad=False):
    if t is None:
        return None
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(grad)


def gradients(out, problem, x, weight, bias, result):
    """What out.backward(grad_output) leaves in the leaves' .grad (zeros where
    the output does not depend on a leaf)."""
    if problem.grad_output is None:
        return result
    out.backward(problem.grad_output.to(out.dtype) if out.dtype != torch.float64
                 else problem.grad_output.double())
    result["grad_input"] = x.grad.detach()
    for name, t in (("grad_weight", weight), ("grad_bias", bias)):
        if t is not None:
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            result[name] = g.detach()
    return result


def reference(problem, dtype=None):
    """What nn.BatchNorm computes (its forward calls F.batch_norm like this),
    in the request's dtypes or all in `dtype`; gradients by autograd."""
    grad = problem.grad_output is not None
    x = leaf(problem.x, dtype, grad)
    weight, bias = leaf(problem.weight, dtype, grad), leaf(problem.bias, dtype, grad)
    running_mean, running_var = leaf(problem.running_mean, dtype), leaf(problem.running_var, dtype)
    out = F.batch_norm(x, running_mean, running_var, weight, bias,
                       training=problem.uses_batch_stats, momentum=problem.factor, eps=problem.eps)
    result = {"output": out.detach()}
    if problem.updates:
        result["running_mean"] = running_mean
        result["running_var"] = running_var
    return gradients(out, problem, x, weight, bias, result)


def manual(problem, correction):
    """The textbook formula in the input's dtype; `correction` 0 is the right
    one, 1 the classic mistake. Gradients by autograd."""
    grad = problem.grad_output is not None
    dtype = problem.x.dtype
    x = leaf(problem.x, None, grad)
    weight, bias = leaf(problem.weight, dtype, grad), leaf(problem.bias, dtype, grad)
    shape = problem.channel_shape
    if problem.uses_batch_stats:
        mean = x.mean(dim=problem.dims, keepdim=True)
        var = x.var(dim=problem.dims, correction=correction, keepdim=True)
    else:
        mean = problem.running_mean.to(dtype).view(shape)
        var = problem.running_var.to(dtype).view(shape)
    out = (x - mean) / torch.sqrt(var + problem.eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    result = {"output": out.detach()}
    if problem.updates:
        f = problem.factor
        xd = problem.x
        rm, rv = problem.running_mean, problem.running_var
        result["running_mean"] = (1 - f) * rm + f * xd.mean(dim=problem.dims).to(rm.dtype)
        result["running_var"] = (1 - f) * rv + f * xd.var(dim=problem.dims, correction=1).to(rv.dtype)
    result = gradients(out, problem, x, weight, bias, result)
    # Parameter gradients in the parameters' own dtype, as autograd gives them.
    for name, param in (("grad_weight", problem.weight), ("grad_bias", problem.bias)):
        if name in result:
            result[name] = result[name].to(param.dtype)
    return result


# ------------------------------------------------------ hand-written mistakes
#
# Each takes the problem in float64 and its leaves (x, weight and bias shaped
# (1, C, 1, ...) or None) and returns the output of one wrong batch norm.


def _affine(x_hat, w, b):
    if w is not None:
        x_hat = x_hat * w
    if b is not None:
        x_hat = x_hat + b
    return x_hat


def _right_stats(p, x):
    if p.uses_batch_stats:
        return x.mean(dim=p.dims, keepdim=True), x.var(dim=p.dims, unbiased=False, keepdim=True)
    s = p.channel_shape
    return p.running_mean.double().view(s), p.running_var.double().view(s)


def bn_unbiased_variance(p, x, w, b):
    mean = x.mean(dim=p.dims, keepdim=True)
    var = x.var(dim=p.dims, keepdim=True)  # torch's default: unbiased
    return _affine((x - mean) / torch.sqrt(var + p.eps), w, b)


def bn_eps_outside_sqrt(p, x, w, b):
    mean, var = _right_stats(p, x)
    return _affine((x - mean) / (torch.sqrt(var) + p.eps), w, b)


def bn_no_eps(p, x, w, b):
    mean, var = _right_stats(p, x)
    return _affine((x - mean) / torch.sqrt(var), w, b)


def bn_divide_by_variance(p, x, w, b):
    mean, var = _right_stats(p, x)
    return _affine((x - mean) / (var + p.eps), w, b)


def bn_affine_forgotten(p, x, w, b):
    mean, var = _right_stats(p, x)
    return (x - mean) / torch.sqrt(var + p.eps)


def bn_weight_bias_swapped(p, x, w, b):
    mean, var = _right_stats(p, x)
    return (x - mean) / torch.sqrt(var + p.eps) * b + w


def bn_stats_per_sample(p, x, w, b):
    dims = list(range(1, x.dim()))
    mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + p.eps), w, b)


def bn_stats_over_all_elements(p, x, w, b):
    mean, var = x.mean(), x.var(unbiased=False)
    return _affine((x - mean) / torch.sqrt(var + p.eps), w, b)


def bn_stats_over_batch_only(p, x, w, b):
    mean, var = x.mean(dim=0, keepdim=True), x.var(dim=0, unbiased=False, keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + p.eps), w, b)


def bn_stats_over_spatial_only(p, x, w, b):
    dims = list(range(2, x.dim()))
    mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + p.eps), w, b)


def bn_running_stats_in_training(p, x, w, b):
    s = p.channel_shape
    mean, var = p.running_mean.double().view(s), p.running_var.double().view(s)
    return _affine((x - mean) / torch.sqrt(var + p.eps), w, b)


def bn_batch_stats_in_eval(p, x, w, b):
    mean = x.mean(dim=p.dims, keepdim=True)
    var = x.var(dim=p.dims, unbiased=False, keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + p.eps), w, b)


def rs_biased_running_var(p):
    f, x = p.factor, p.x.double()
    return ((1 - f) * p.running_mean.double() + f * x.mean(dim=p.dims),
            (1 - f) * p.running_var.double() + f * x.var(dim=p.dims, unbiased=False))


def rs_momentum_one_minus(p):
    f, x = p.factor, p.x.double()
    return (f * p.running_mean.double() + (1 - f) * x.mean(dim=p.dims),
            f * p.running_var.double() + (1 - f) * x.var(dim=p.dims, unbiased=True))


def rs_keras_momentum(p):
    keras_momentum, x = p.factor, p.x.double()  # Keras: the weight of the old value
    return (keras_momentum * p.running_mean.double() + (1 - keras_momentum) * x.mean(dim=p.dims),
            keras_momentum * p.running_var.double() + (1 - keras_momentum) * x.var(dim=p.dims, unbiased=False))


NORMALIZATION_MISTAKES = {
    "unbiased_variance": bn_unbiased_variance,
    "eps_outside_sqrt": bn_eps_outside_sqrt,
    "no_eps": bn_no_eps,
    "divide_by_variance": bn_divide_by_variance,
    "affine_forgotten": bn_affine_forgotten,
    "weight_bias_swapped": bn_weight_bias_swapped,
    "stats_per_sample": bn_stats_per_sample,
    "stats_over_all_elements": bn_stats_over_all_elements,
    "stats_over_batch_only": bn_stats_over_batch_only,
    "stats_over_spatial_only": bn_stats_over_spatial_only,
    "running_stats_in_training": bn_running_stats_in_training,
    "batch_stats_in_eval": bn_batch_stats_in_eval,
}
RUNNING_MISTAKES = {
    "biased_running_var": rs_biased_running_var,
    "momentum_one_minus": rs_momentum_one_minus,
    "keras_momentum": rs_keras_momentum,
}


def applies(name, p):
    """The documented applicability of each hypothesis."""
    return {
        "unbiased_variance": p.uses_batch_stats,
        "eps_outside_sqrt": True,
        "no_eps": True,
        "divide_by_variance": True,
        "affine_forgotten": p.weight is not None or p.bias is not None,
        "weight_bias_swapped": p.weight is not None and p.bias is not None,
        "stats_per_sample": p.uses_batch_stats,
        "stats_over_all_elements": p.uses_batch_stats,
        "stats_over_batch_only": p.uses_batch_stats and p.x.dim() >= 3,
        "stats_over_spatial_only": p.uses_batch_stats and p.x.dim() >= 3,
        "running_stats_in_training": p.updates,
        "batch_stats_in_eval": not p.uses_batch_stats,
        "biased_running_var": p.updates,
        "momentum_one_minus": p.updates,
        "keras_momentum": p.updates,
    }[name]


def simulate(name, p, with_gradients=True):
    """The hand-written mistake's results in float64."""
    if name in RUNNING_MISTAKES:
        mean, var = RUNNING_MISTAKES[name](p)
        return {"running_mean": mean, "running_var": var}
    grad = with_gradients and p.grad_output is not None
    x = leaf(p.x, torch.float64, grad)
    weight, bias = leaf(p.weight, torch.float64, grad), leaf(p.bias, torch.float64, grad)
    s = p.channel_shape
    out = NORMALIZATION_MISTAKES[name](
        p, x, None if weight is None else weight.view(s), None if bias is None else bias.view(s))
    return gradients(out, p, x, weight, bias, {"output": out.detach()})


# ------------------------------------------------------------- the statistics


def difference(a, b, rtol, atol):
    """The Difference message's fields, per its documentation, in numpy."""
    a = a.detach().double().numpy()
    b = b.detach().double().numpy()
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.abs(a - b)
        d[np.isnan(d)] = np.inf
        d[same] = 0.0
        rel = np.where(b != 0, d / np.abs(b), 0.0)
        rel[np.isnan(rel)] = np.inf
    close = same | (np.isfinite(a) & np.isfinite(b) & (d <= atol + rtol * np.abs(b)))
    if d.ndim >= 2:
        per_channel = d.max(axis=tuple(i for i in range(d.ndim) if i != 1))
    else:
        per_channel = d
    return {
        "max_abs_diff": float(d.max()),
        "max_rel_diff": float(rel.max()),
        "argmax_index": [int(i) for i in np.unravel_index(np.argmax(d), d.shape)],
        "per_channel_max_abs_diff": [float(v) for v in per_channel.reshape(-1)],
        "allclose": bool(close.all()),
        "mismatched_elements": int((~close).sum()),
    }


def tolerance_ratio(c, s, rtol, atol):
    """max |c - s| / (atol + rtol |s|), per the Hypothesis documentation."""
    c = c.detach().double().numpy()
    s = s.detach().double().numpy()
    same = (c == s) | (np.isnan(c) & np.isnan(s))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.abs(c - s) / (atol + rtol * np.abs(s))
    r[~(np.isfinite(c) & np.isfinite(s))] = np.inf
    r[same] = 0.0
    return float(r.max())


def assert_difference(message, expected):
    assert message.max_abs_diff == expected["max_abs_diff"]
    assert message.max_rel_diff == expected["max_rel_diff"]
    assert list(message.argmax_index) == expected["argmax_index"]
    assert list(message.per_channel_max_abs_diff) == expected["per_channel_max_abs_diff"]
    assert message.allclose == expected["allclose"]
    assert message.mismatched_elements == expected["mismatched_elements"]


# Closeness of the server's tensors to this file's computations of the same
# formulas (different operation order or closed form vs autograd).
CLOSE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 1e-1,
}


def assert_same_formula(server, mine, dtype):
    tol = CLOSE[dtype]
    scale = max(1.0, float(mine.double().abs().max()))
    torch.testing.assert_close(server.double(), mine.double(), rtol=tol, atol=tol * scale)


def reports_by_name(reply):
    return {IMPLEMENTATION_NAMES[r.implementation]: r for r in reply.reports}


def present_parts(report):
    return {name for name in PARTS if report.HasField(name)}


def default_tolerance(dtype):
    from torch.testing._comparison import default_tolerances

    return default_tolerances(dtype)


# -------------------------------------------------------------------- inputs


def separating_problem(rank=3, training=True, seed=0, dtype=torch.float64):
    """Input on which every hypothesis gives a different answer: channels,
    samples and positions with their own means and scales, weight != 1,
    bias != 0, weight != bias, running statistics far from the batch's, a
    large eps, momentum far from 0.5, few values per channel."""
    g = torch.Generator().manual_seed(seed)
    n, c, length = 4, 3, 5
    shape = [n, c] + [length] * (rank - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    view = [1, c] + [1] * (rank - 2)
    x = x * torch.tensor([0.3, 2.0, 5.0], dtype=torch.float64).view(view)
    x = x + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).view(view)
    x = x + torch.tensor([0.0, 0.7, -0.4, 1.1], dtype=torch.float64).view([n] + [1] * (rank - 1))
    if rank >= 3:
        x = x + torch.linspace(-1.5, 2.0, length, dtype=torch.float64).view([1, 1, length] + [1] * (rank - 3))
    return Problem(
        x.to(dtype),
        weight=torch.tensor([1.5, -0.7, 0.3], dtype=dtype),
        bias=torch.tensor([0.2, -1.1, 0.8], dtype=dtype),
        running_mean=torch.tensor([3.5, 1.3, -4.0], dtype=dtype),
        running_var=torch.tensor([0.2, 9.5, 0.05], dtype=dtype),
        num_batches_tracked=3,
        training=training,
        eps=0.1,
        momentum=0.2,
        grad_output=torch.randn(shape, generator=g, dtype=torch.float64).to(dtype),
    )


# ------------------------------------------------------------ the forum case


def test_forum_example_is_diagnosed_as_bessel(compare_stub):
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    bn = torch.nn.BatchNorm1d(5)
    mine = (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0) + bn.eps) * bn.weight + bn.bias
    problem = Problem(x, weight=bn.weight.detach(), bias=bn.bias.detach(),
                      running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone())
    reply = compare_stub.Compare(problem.request(candidate={"output": mine.detach()}))

    diagnosis = reply.diagnosis
    assert not diagnosis.matches_reference
    top = diagnosis.hypotheses[0]
    assert top.name == "unbiased_variance"
    assert top.explains
    assert "unbiased=False" in top.fix
    assert "Bessel" in top.explanation
    assert list(top.parts) == ["output"]
    assert [h.name for h in diagnosis.hypotheses if h.explains] == ["unbiased_variance"]
    assert "unbiased_variance" in diagnosis.summary and "unbiased=False" in diagnosis.summary
    # A fresh module (weight 1, bias 0) cannot show a forgotten affine.
    assert any(a.startswith("affine_forgotten cannot be told apart from the reference")
               for a in diagnosis.ambiguities), diagnosis.ambiguities

    # The numbers, from PyTorch: the module itself is the float32 reference.
    expected = bn(x).detach()
    truth = reference(problem, torch.float64)["output"]
    reports = reports_by_name(reply)
    candidate = reports["candidate"].output
    assert candidate.vs_float64_reference.max_abs_diff == pytest.approx(
        float((mine.detach().double() - truth).abs().max()), rel=1e-12)
    assert candidate.vs_reference.max_abs_diff == pytest.approx(
        float((mine.detach().double() - expected.double()).abs().max()), rel=1e-6)
    assert not candidate.vs_float64_reference.allclose
    simulated = bn_unbiased_variance(problem, x.double(), None, None)
    assert top.max_abs_diff == pytest.approx(
        float((mine.detach().double() - simulated).abs().max()), rel=1e-9, abs=1e-12)
    assert (reply.rtol, reply.atol) == default_tolerance(torch.float32)
    assert reply.device == "cpu"


# ------------------------------------------------- reports against PyTorch


REPORT_CASES = {
    "1d_train_full": dict(rank=2, training=True),
    "1d_eval_full": dict(rank=2, training=False),
    "1d_3d_input_train": dict(rank=3, training=True),
    "2d_train": dict(rank=4, training=True),
    "3d_eval": dict(rank=5, training=False),
    "no_affine_train": dict(rank=3, training=True, affine=False),
    "weight_only_eval": dict(rank=4, training=False, bias=False),
    "no_running_stats_eval": dict(rank=3, training=False, track=False),
    "cumulative_average": dict(rank=2, training=True, momentum=None),
    "no_grad_output": dict(rank=3, training=True, grad=False),
    "float64": dict(rank=3, training=True, dtype=torch.float64),
    "float16_input_float32_params": dict(rank=4, training=True, dtype=torch.float16),
    "bfloat16_input_float32_params": dict(rank=2, training=True, dtype=torch.bfloat16),
}


def report_problem(rank, training, affine=True, bias=True, track=True, momentum=0.1,
                   grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(rank * 10 + training)
    shape = [6, 4] + [3] * (rank - 2)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    # float16/bfloat16 input runs with float32 parameters, as in a module.
    params = torch.float64 if dtype == torch.float64 else torch.float32
    return Problem(
        x,
        weight=(torch.rand(4, generator=g) + 0.5).to(params) if affine else None,
        bias=torch.randn(4, generator=g).to(params) if affine and bias else None,
        running_mean=torch.randn(4, generator=g).to(params) if track else None,
        running_var=(torch.rand(4, generator=g) + 0.5).to(params) if track else None,
        num_batches_tracked=4,
        training=training,
        eps=1e-3,
        momentum=momentum,
        grad_output=torch.randn(shape, generator=g).to(dtype) if grad else None,
    )


@pytest.mark.parametrize("case", REPORT_CASES)
def test_every_report_is_recomputed_from_pytorch(compare_stub, case):
    dtype = REPORT_CASES[case].get("dtype", torch.float32)
    problem = report_problem(**REPORT_CASES[case])
    # A candidate that is PyTorch itself, computed here in the input's dtype.
    expected = reference(problem)
    truth = reference(problem, torch.float64)
    reply = compare_stub.Compare(problem.request(candidate=expected, return_tensors=True))
    rtol, atol = default_tolerance(dtype)
    assert (reply.rtol, reply.atol) == (rtol, atol)

    mine = {
        "reference": expected,
        "float64_reference": truth,
        "manual_biased": manual(problem, correction=0),
        "manual_unbiased": manual(problem, correction=1),
        "candidate": expected,
    }
    reports = reports_by_name(reply)
    assert list(reports) == list(mine)
    returned = {name: {part: from_proto(getattr(r, part).values) for part in present_parts(r)}
                for name, r in reports.items()}
    for name, report in reports.items():
        assert present_parts(report) == set(mine[name]), name
        for part in present_parts(report):
            server_tensor = returned[name][part]
            tolerance_dtype = torch.float64 if name == "float64_reference" else dtype
            assert_same_formula(server_tensor, mine[name][part], tolerance_dtype)
            message = getattr(report, part)
            # The statistics, recomputed from the returned tensors exactly.
            assert_difference(message.vs_float64_reference, difference(
                server_tensor, returned["float64_reference"][part], rtol, atol))
            assert_difference(message.vs_reference, difference(
                server_tensor, returned["reference"][part], rtol, atol))
            # And against this file's own float64 reference.
            assert message.vs_float64_reference.max_abs_diff == pytest.approx(
                difference(server_tensor, truth[part], rtol, atol)["max_abs_diff"],
                rel=1e-6, abs=1e-12)

    # The reference is PyTorch's module in float64 and in the input's dtype.
    assert reports["float64_reference"].output.vs_float64_reference.max_abs_diff == 0.0
    assert reports["reference"].output.vs_reference.max_abs_diff == 0.0
    torch.testing.assert_close(returned["reference"]["output"], expected["output"],
                               **dict(zip(("rtol", "atol"), default_tolerance(dtype))))
    assert reply.diagnosis.matches_reference, reply.diagnosis.summary


def test_statistics_only_reply_carries_no_tensors_and_the_same_numbers(compare_stub):
    problem = report_problem(rank=3, training=True)
    candidate = manual(problem, correction=1)
    full = compare_stub.Compare(problem.request(candidate=candidate, return_tensors=True))
    small = compare_stub.Compare(problem.request(candidate=candidate))
    for big_report, small_report in zip(full.reports, small.reports):
        for part in present_parts(big_report):
            assert getattr(big_report, part).HasField("values")
            assert not getattr(small_report, part).HasField("values")
            assert getattr(small_report, part).vs_float64_reference == getattr(big_report, part).vs_float64_reference
            assert getattr(small_report, part).vs_reference == getattr(big_report, part).vs_reference
    assert small.diagnosis == full.diagnosis
    tensor_bytes = sum(getattr(r, part).values.ByteSize() for r in full.reports for part in present_parts(r))
    assert small.ByteSize() < full.ByteSize() - tensor_bytes + 1


def test_implementations_field_selects_the_reports(compare_stub):
    problem = report_problem(rank=2, training=True)
    reply = compare_stub.Compare(problem.request(implementations=[
        IMPL.IMPLEMENTATION_MANUAL_UNBIASED, IMPL.IMPLEMENTATION_REFERENCE,
        IMPL.IMPLEMENTATION_MANUAL_UNBIASED]))
    assert [IMPLEMENTATION_NAMES[r.implementation] for r in reply.reports] == [
        "reference", "manual_unbiased"]
    assert not reply.HasField("diagnosis")
    everything = compare_stub.Compare(problem.request())
    assert [IMPLEMENTATION_NAMES[r.implementation] for r in everything.reports] == [
        "reference", "float64_reference", "manual_biased", "manual_unbiased"]


def test_explicit_tolerance_decides_the_verdicts(compare_stub):
    problem = report_problem(rank=2, training=True, grad=False)
    candidate = {"output": reference(problem)["output"] + 1e-3}
    loose = compare_stub.Compare(problem.request(candidate=candidate, rtol=0.0, atol=2e-3))
    strict = compare_stub.Compare(problem.request(candidate=candidate, rtol=0.0, atol=5e-4))
    assert (loose.rtol, loose.atol) == (0.0, 2e-3)
    assert reports_by_name(loose)["candidate"].output.vs_float64_reference.allclose
    assert loose.diagnosis.matches_reference
    strict_report = reports_by_name(strict)["candidate"].output.vs_float64_reference
    assert not strict_report.allclose
    assert strict_report.mismatched_elements == problem.x.numel()
    assert not strict.diagnosis.matches_reference


def test_nan_in_the_candidate_is_an_infinite_difference(compare_stub):
    problem = report_problem(rank=2, training=False, grad=False)
    output = reference(problem)["output"].clone()
    output[2, 1] = float("nan")
    reply = compare_stub.Compare(problem.request(candidate={"output": output}))
    message = reports_by_name(reply)["candidate"].output.vs_float64_reference
    assert message.max_abs_diff == math.inf
    assert list(message.argmax_index) == [2, 1]
    assert message.mismatched_elements == 1
    assert message.per_channel_max_abs_diff[1] == math.inf
    assert not reply.diagnosis.matches_reference


def test_a_matching_candidate_is_reported_as_matching_the_reference(compare_stub):
    problem = separating_problem(rank=3, dtype=torch.float32)
    bn = torch.nn.BatchNorm1d(3, eps=problem.eps, momentum=problem.momentum)
    with torch.no_grad():
        bn.weight.copy_(problem.weight)
        bn.bias.copy_(problem.bias)
        bn.running_mean.copy_(problem.running_mean)
        bn.running_var.copy_(problem.running_var)
    x = problem.x.clone().requires_grad_(True)
    out = bn(x)
    out.backward(problem.grad_output)
    candidate = {"output": out.detach(), "running_mean": bn.running_mean, "running_var": bn.running_var,
                 "grad_input": x.grad, "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad}
    reply = compare_stub.Compare(problem.request(candidate=candidate))
    diagnosis = reply.diagnosis
    assert diagnosis.matches_reference
    assert diagnosis.summary.startswith("The candidate matches the reference")
    assert not any(h.explains for h in diagnosis.hypotheses), [h.name for h in diagnosis.hypotheses if h.explains]
    # Nothing is invisible on this input, and everything was tested.
    assert list(diagnosis.ambiguities) == []
    assert {h.name for h in diagnosis.hypotheses} == {
        name for name in (*NORMALIZATION_MISTAKES, *RUNNING_MISTAKES) if applies(name, problem)}


# ---------------------------------------------------------- each hypothesis


HYPOTHESIS_CASES = {
    **{name: dict(rank=3, training=True) for name in NORMALIZATION_MISTAKES},
    "batch_stats_in_eval": dict(rank=3, training=False),
    "stats_over_batch_only": dict(rank=4, training=True),
    "stats_over_spatial_only": dict(rank=5, training=True),
    "stats_per_sample": dict(rank=2, training=True),
    **{name: dict(rank=3, training=True) for name in RUNNING_MISTAKES},
}


@pytest.mark.parametrize("name", HYPOTHESIS_CASES)
def test_each_hand_written_mistake_is_ranked_first(compare_stub, name):
    problem = separating_problem(**HYPOTHESIS_CASES[name])
    assert applies(name, problem)
    right = reference(problem, torch.float64)
    if name in NORMALIZATION_MISTAKES:
        candidate = simulate(name, problem)
        if problem.updates:  # the running statistics done right
            candidate["running_mean"] = right["running_mean"]
            candidate["running_var"] = right["running_var"]
    else:
        candidate = {part: right[part] for part in ("output", "grad_input", "grad_weight", "grad_bias")}
        candidate.update(simulate(name, problem))
    reply = compare_stub.Compare(problem.request(candidate=candidate))
    diagnosis = reply.diagnosis
    rtol, atol = default_tolerance(torch.float64)

    assert not diagnosis.matches_reference
    ranked = [h.name for h in diagnosis.hypotheses]
    assert ranked[0] == name, diagnosis.summary
    assert [h.name for h in diagnosis.hypotheses if h.explains] == [name]
    assert name in diagnosis.summary and diagnosis.hypotheses[0].fix in diagnosis.summary
    assert not any("cannot be told apart" in a for a in diagnosis.ambiguities), diagnosis.ambiguities
    assert set(ranked) == {n for n in (*NORMALIZATION_MISTAKES, *RUNNING_MISTAKES) if applies(n, problem)}

    # Every hypothesis's numbers, from this file's own wrong implementations.
    for hypothesis in diagnosis.hypotheses:
        group = RUNNING_PARTS if hypothesis.name in RUNNING_MISTAKES else NORMALIZATION_PARTS
        parts = [p for p in group if p in candidate]
        assert list(hypothesis.parts) == parts
        simulation = simulate(hypothesis.name, problem)
        max_abs = max(float((candidate[p].double() - simulation[p]).abs().max()) for p in parts)
        ratio = max(tolerance_ratio(candidate[p], simulation[p], rtol, atol) for p in parts)
        assert hypothesis.max_abs_diff == pytest.approx(max_abs, rel=1e-9, abs=1e-12), hypothesis.name
        assert hypothesis.tolerance_ratio == pytest.approx(ratio, rel=1e-6, abs=1e-3), hypothesis.name
        assert hypothesis.explains == (ratio <= 1.0)
    # Ranking: deviating group first, then by tolerance ratio.
    deviating = RUNNING_PARTS if name in RUNNING_MISTAKES else NORMALIZATION_PARTS
    keys = [(h.parts[0] not in deviating, h.tolerance_ratio) for h in diagnosis.hypotheses]
    assert keys == sorted(keys)


def test_mistakes_in_both_groups_are_each_diagnosed(compare_stub):
    problem = separating_problem(rank=3)
    candidate = simulate("unbiased_variance", problem)
    candidate.update(simulate("keras_momentum", problem))
    diagnosis = compare_stub.Compare(problem.request(candidate=candidate)).diagnosis
    assert [h.name for h in diagnosis.hypotheses if h.explains] == ["unbiased_variance", "keras_momentum"]
    assert "unbiased_variance" in diagnosis.summary and "keras_momentum" in diagnosis.summary


def test_bessel_correction_vanishing_for_large_batches_is_reported(compare_stub):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400_000, 2, generator=g)
    problem = Problem(x)
    mine = (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0) + problem.eps)
    diagnosis = compare_stub.Compare(problem.request(candidate={"output": mine})).diagnosis
    assert diagnosis.matches_reference
    bessel = [a for a in diagnosis.ambiguities if a.startswith("unbiased_variance cannot be told apart")]
    assert len(bessel) == 1, diagnosis.ambiguities
    assert "m = 400000" in bessel[0] and "fewer values per channel" in bessel[0]
    assert "unbiased_variance" in diagnosis.summary


def test_hypotheses_about_tensors_not_sent_are_reported_as_not_tested(compare_stub):
    problem = separating_problem(rank=3)
    candidate = {"running_mean": simulate("momentum_one_minus", problem)["running_mean"]}
    diagnosis = compare_stub.Compare(problem.request(candidate=candidate)).diagnosis
    ranked = [h.name for h in diagnosis.hypotheses]
    assert ranked == ["momentum_one_minus", "keras_momentum"]
    # running_mean alone cannot separate the two momentum conventions.
    assert [h.name for h in diagnosis.hypotheses if h.explains] == ranked
    assert any(a.startswith("momentum_one_minus, keras_momentum all explain") and "candidate.running_var" in a
               for a in diagnosis.ambiguities), diagnosis.ambiguities
    assert any(a.startswith("Not tested: biased_running_var") for a in diagnosis.ambiguities)
    assert any(a.startswith("Not tested: unbiased_variance") and "candidate.output" in a
               for a in diagnosis.ambiguities)


# ---------------------------------------------------------------- validation


def compare_error(stub, request):
    with pytest.raises(grpc.RpcError) as info:
        stub.Compare(request)
    return info.value.code(), info.value.details()


def session_forward_error(bn_stub, kind, num_features, x, mode=batch_norm_pb2.MODE_TRAIN,
                          eps=None, param_dtype=tensor_pb2.DATA_TYPE_FLOAT32):
    create = batch_norm_pb2.CreateSessionRequest(kind=kind, num_features=num_features,
                                                 param_dtype=param_dtype)
    if eps is not None:
        create.eps = eps
        with pytest.raises(grpc.RpcError) as info:
            bn_stub.CreateSession(create)
        return info.value.code(), info.value.details()
    session = bn_stub.CreateSession(create).session
    with pytest.raises(grpc.RpcError) as info:
        bn_stub.Forward(batch_norm_pb2.ForwardRequest(session_id=session.session_id,
                                                      input=to_proto(x), mode=mode))
    bn_stub.DeleteSession(batch_norm_pb2.DeleteSessionRequest(session_id=session.session_id))
    return info.value.code(), info.value.details()


def module_state(num_features, dtype=torch.float32):
    return dict(weight=torch.ones(num_features, dtype=dtype), bias=torch.zeros(num_features, dtype=dtype),
                running_mean=torch.zeros(num_features, dtype=dtype),
                running_var=torch.ones(num_features, dtype=dtype))


SAME_AS_SESSIONS = {
    # case: (session kind, num_features, input, training, eps, PyTorch's text)
    "channels": (batch_norm_pb2.BATCH_NORM_1D, 5, torch.randn(3, 4), True, None,
                 "running_mean should contain 4 elements not 5"),
    "one_value_per_channel": (batch_norm_pb2.BATCH_NORM_2D, 3, torch.randn(1, 3, 1, 1), True, None,
                              "Expected more than 1 value per channel when training"),
    "mixed_dtype": (batch_norm_pb2.BATCH_NORM_1D, 3, torch.randn(4, 3, dtype=torch.float64), True, None,
                    "mixed dtype (CPU): all inputs must share same datatype."),
    "eps": (batch_norm_pb2.BATCH_NORM_1D, 3, torch.randn(4, 3), True, 0.0, None),
}


@pytest.mark.parametrize("case", SAME_AS_SESSIONS)
def test_compare_refuses_what_sessions_refuse_with_the_same_text(compare_stub, bn_stub, case):
    kind, num_features, x, training, eps, torch_text = SAME_AS_SESSIONS[case]
    expected = session_forward_error(bn_stub, kind, num_features, x, eps=eps)
    problem = Problem(x, training=training, eps=1e-5 if eps is None else eps, **module_state(num_features))
    assert compare_error(compare_stub, problem.request()) == expected
    assert expected[0] == grpc.StatusCode.INVALID_ARGUMENT
    if torch_text is not None:
        assert torch_text in expected[1]
        bn = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d}[kind](num_features)
        with pytest.raises((RuntimeError, ValueError)) as info:
            bn(x)
        assert torch_text in str(info.value)


@pytest.mark.parametrize("rank", [1, 6])
def test_ranks_outside_two_to_five_are_refused(compare_stub, rank):
    x = torch.randn([2] * rank)
    code, details = compare_error(compare_stub, Problem(x).request())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (f"input: expected 2D or 3D (BatchNorm1d), 4D (BatchNorm2d) or 5D (BatchNorm3d) "
                       f"input (got {rank}D input)")


BAD_REQUESTS = {
    "running_mean_without_var": (dict(running_mean=torch.zeros(3)), {}, "running_mean"),
    "candidate_running_stats_in_eval": (dict(training=False, **module_state(3)),
                                        {"running_mean": torch.zeros(3)}, "candidate.running_mean"),
    "candidate_gradient_without_grad_output": ({}, {"grad_input": torch.zeros(4, 3)}, "candidate.grad_input"),
    "candidate_wrong_shape": ({}, {"output": torch.zeros(3, 4)}, "candidate.output"),
    "empty_candidate": ({}, {}, "candidate"),
    "grad_output_wrong_shape": (dict(grad_output=torch.zeros(4, 2)), None, "grad_output"),
    "weight_not_one_dimensional": (dict(weight=torch.ones(3, 1)), None, "weight"),
    "params_of_two_dtypes": (dict(weight=torch.ones(3), bias=torch.zeros(3, dtype=torch.float64)), None, "bias"),
    "negative_num_batches_tracked": (dict(num_batches_tracked=-1), None, "num_batches_tracked"),
    "empty_input": (dict(x=torch.zeros(0, 3)), None, "input"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_requests_are_invalid_arguments(compare_stub, case):
    fields, candidate, field = BAD_REQUESTS[case]
    fields = dict(fields)
    problem = Problem(fields.pop("x", torch.randn(4, 3)), **fields)
    code, details = compare_error(compare_stub, problem.request(candidate=candidate))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field + ":"), details


def test_request_level_mistakes_are_invalid_arguments(compare_stub):
    problem = Problem(torch.randn(4, 3))
    for request, text in [
        (problem.request(rtol=1e-3), "rtol, atol: set both or neither"),
        (problem.request(implementations=[IMPL.IMPLEMENTATION_CANDIDATE]), "implementations:"),
        (problem.request(implementations=[IMPL.IMPLEMENTATION_UNSPECIFIED]), "implementations:"),
        (problem.request(rtol=-1.0, atol=0.0), "rtol: must be finite and >= 0"),
    ]:
        code, details = compare_error(compare_stub, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(text), details
    both = problem.request()
    both.cumulative_average = True
    assert compare_error(compare_stub, both)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_device_choice_is_validated_like_sessions(compare_stub):
    problem = Problem(torch.randn(4, 3))
    assert compare_stub.Compare(problem.request(device="cpu")).device == "cpu"
    code, _ = compare_error(compare_stub, problem.request(device="gpu"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    if not torch.cuda.is_available():
        code, details = compare_error(compare_stub, problem.request(device="cuda:7"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details


def test_limits_are_the_sessions_limits():
    server = ServerProcess("--max-tensor-elements", "64", "--max-num-features", "4")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = compare_pb2_grpc.CompareServiceStub(channel)
            bn_stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
            code, details = compare_error(stub, Problem(torch.randn(20, 4)).request())
            session = bn_stub.CreateSession(batch_norm_pb2.CreateSessionRequest(
                kind=batch_norm_pb2.BATCH_NORM_1D, num_features=4)).session
            with pytest.raises(grpc.RpcError) as info:
                bn_stub.Forward(batch_norm_pb2.ForwardRequest(
                    session_id=session.session_id, input=to_proto(torch.randn(20, 4))))
            assert (code, details) == (info.value.code(), info.value.details())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            candidate = {"output": torch.zeros(20, 4)}
            code, details = compare_error(stub, Problem(torch.randn(4, 4)).request(candidate=candidate))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("candidate.output:")
            code, details = compare_error(stub, Problem(torch.randn(2, 5)).request())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_num_features" in details
    finally:
        assert server.stop() == 0


def test_compare_never_changes_a_session(compare_stub, bn_stub):
    created = bn_stub.CreateSession(batch_norm_pb2.CreateSessionRequest(
        kind=batch_norm_pb2.BATCH_NORM_1D, num_features=3,
        labels={"test": uuid.uuid4().hex})).session
    bn_stub.Forward(batch_norm_pb2.ForwardRequest(session_id=created.session_id,
                                                  input=to_proto(torch.randn(5, 3))))
    before = bn_stub.GetSession(batch_norm_pb2.GetSessionRequest(session_id=created.session_id)).session
    count = len(bn_stub.ListSessions(batch_norm_pb2.ListSessionsRequest(page_size=1000)).sessions)
    problem = Problem(torch.randn(5, 3), weight=from_proto(before.weight), bias=from_proto(before.bias),
                      running_mean=from_proto(before.running_mean), running_var=from_proto(before.running_var),
                      num_batches_tracked=before.num_batches_tracked)
    compare_stub.Compare(problem.request(candidate={"output": torch.zeros(5, 3)}))
    after = bn_stub.GetSession(batch_norm_pb2.GetSessionRequest(session_id=created.session_id)).session
    assert after == before
    assert len(bn_stub.ListSessions(batch_norm_pb2.ListSessionsRequest(page_size=1000)).sessions) == count
    bn_stub.DeleteSession(batch_norm_pb2.DeleteSessionRequest(session_id=created.session_id))


# ------------------------------------------------------ JSON, grpcurl, info


# The grpcurl body of docs/api.md: the forum mistake on a (3, 2) input, as JSON with
# typed float fields.
README_JSON = """{
  "input": {"shape": [3, 2], "floatValues": {"values": [0.5, 1.0, 1.5, -1.0, -2.0, 0.0]}},
  "training": true,
  "candidate": {"output": {"shape": [3, 2],
    "floatValues": {"values": [0.2773497, 0.999995, 0.832049, -0.999995, -1.109399, 0.0]}}}
}"""


def check_readme_reply(reply):
    x = torch.tensor([[0.5, 1.0], [1.5, -1.0], [-2.0, 0.0]])
    mine = torch.tensor([[0.2773497, 0.999995], [0.832049, -0.999995], [-1.109399, 0.0]])
    truth = F.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    assert reply.diagnosis.hypotheses[0].name == "unbiased_variance"
    assert reply.diagnosis.hypotheses[0].explains
    candidate = reports_by_name(reply)["candidate"].output.vs_float64_reference
    assert candidate.max_abs_diff == pytest.approx(float((mine.double() - truth).abs().max()), rel=1e-9)


def test_json_request_with_typed_floats_works(compare_stub):
    request = json_format.Parse(README_JSON, compare_pb2.CompareRequest())
    reply = compare_stub.Compare(request)
    check_readme_reply(reply)
    rendered = json.loads(json_format.MessageToJson(reply))
    assert rendered["diagnosis"]["hypotheses"][0]["name"] == "unbiased_variance"
    # Typed input, typed tensors back: float_values for float32, double_values for float64.
    full = compare_stub.Compare(json_format.Parse(
        json.dumps({**json.loads(README_JSON), "returnTensors": True}), compare_pb2.CompareRequest()))
    reports = reports_by_name(full)
    assert reports["reference"].output.values.WhichOneof("values") == "float_values"
    assert reports["float64_reference"].output.values.WhichOneof("values") == "double_values"


def test_grpcurl_call_from_the_readme_works(server):
    grpcurl = shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (Debian does not package it); "
                    "the same JSON body is tested through json_format")
    result = subprocess.run(
        [grpcurl, "-plaintext", "-d", README_JSON, server.address, "normserve.v1.CompareService/Compare"],
        capture_output=True, text=True, timeout=60, check=True)
    check_readme_reply(json_format.Parse(result.stdout, compare_pb2.CompareResponse()))


def test_server_info_and_health_list_compare(server_stub, channel):
    info = server_stub.GetServerInfo(server_pb2.GetServerInfoRequest())
    assert "compare" in info.features
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="normserve.v1.CompareService")).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------- Compare beside sessions


def test_compare_has_its_own_input_limit_that_forwards_do_not_share():
    server = ServerProcess("--durability", "none", "--compare-max-tensor-elements", "4096")
    try:
        client = normserve.connect(server.address, timeout=60)
        x = torch.randn(128, 64)  # 8192 elements: over Compare's limit only
        with pytest.raises(normserve.ResourceExhausted) as refused:
            client.compare(x)
        assert "compare_max_tensor_elements" in str(refused.value)
        client.compare(x[:64])  # 4096: at the limit
        session = client.create_session("1d", num_features=64)
        torch.testing.assert_close(torch.as_tensor(session.forward(x)), torch.nn.BatchNorm1d(64)(x).detach())
    finally:
        assert server.stop() == 0


def test_large_compares_do_not_hold_the_permits_of_forwards():
    # One permit for session calls, one for Compares. Two large Compares are
    # sent first; a small Forward sent after them must be answered before the
    # first of them is (with one shared permit it waited behind both).
    server = ServerProcess("--durability", "none", "--compute-threads", "1", "--compare-threads", "1")
    try:
        client = normserve.connect(server.address, timeout=120)
        session = client.create_session("1d", num_features=4)
        finished = []
        lock = threading.Lock()
        big = torch.randn(65536, 64)

        def run(name, call):
            call()
            with lock:
                finished.append(name)

        compares = [threading.Thread(target=run, args=(f"compare-{i}", lambda: client.compare(big)))
                    for i in range(2)]
        for thread in compares:
            thread.start()
        time.sleep(0.3)  # let both Compares reach the server first
        x = torch.randn(8, 4)
        run("forward", lambda: session.forward(x))
        for thread in compares:
            thread.join(timeout=120)
        assert finished[0] == "forward", finished
        assert sorted(finished) == ["compare-0", "compare-1", "forward"]
    finally:
        assert server.stop() == 0
