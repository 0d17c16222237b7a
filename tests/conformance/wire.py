"""Tensor <-> proto helpers for the tests. They are the Python client's codec
(clients/python/normserve/codec.py), so the tests and the client share one
codec; test_client.py checks that codec against numpy's and PyTorch's own
bytes."""

import torch

from normserve import codec
from normserve.v1 import tensor_pb2

DTYPES = {
    torch.float32: tensor_pb2.DATA_TYPE_FLOAT32,
    torch.float64: tensor_pb2.DATA_TYPE_FLOAT64,
    torch.float16: tensor_pb2.DATA_TYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DATA_TYPE_BFLOAT16,
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def to_proto(t: torch.Tensor, typed: bool = False) -> tensor_pb2.Tensor:
    """`t` (any device) as a Tensor message: raw little-endian bytes, or typed
    float_values (double_values for float64)."""
    return codec.encode(t, typed=typed)


def from_proto(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """A Tensor message (raw or typed) as a CPU torch tensor of its dtype."""
    return codec.to_torch(msg)
