"""Tensor <-> proto helpers for the tests (written against the proto, not the
server's code)."""

import numpy as np
import torch

from normserve.v1 import tensor_pb2

DTYPES = {
    torch.float32: tensor_pb2.DATA_TYPE_FLOAT32,
    torch.float64: tensor_pb2.DATA_TYPE_FLOAT64,
    torch.float16: tensor_pb2.DATA_TYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DATA_TYPE_BFLOAT16,
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def to_proto(t: torch.Tensor, typed: bool = False) -> tensor_pb2.Tensor:
    t = t.detach().cpu().contiguous()
    msg = tensor_pb2.Tensor(dtype=DTYPES[t.dtype], shape=list(t.shape))
    if typed:
        if t.dtype == torch.float64:
            msg.double_values.values.extend(t.reshape(-1).tolist())
        else:
            msg.float_values.values.extend(t.float().reshape(-1).tolist())
    else:
        # bfloat16 has no numpy dtype: reinterpret the bits as int16.
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
        msg.raw = raw
    return msg


def from_proto(msg: tensor_pb2.Tensor) -> torch.Tensor:
    dtype = TORCH_DTYPES[msg.dtype]
    shape = list(msg.shape)
    which = msg.WhichOneof("values")
    if which == "raw":
        if dtype == torch.bfloat16:
            arr = np.frombuffer(msg.raw, dtype="<i2").copy()
            return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
        np_dtype = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2"}[dtype]
        arr = np.frombuffer(msg.raw, dtype=np_dtype).copy()
        return torch.from_numpy(arr).reshape(shape)
    if which == "float_values":
        return torch.tensor(list(msg.float_values.values), dtype=torch.float32).to(dtype).reshape(shape)
    if which == "double_values":
        return torch.tensor(list(msg.double_values.values), dtype=torch.float64).to(dtype).reshape(shape)
    raise AssertionError(f"tensor without values: {msg}")
