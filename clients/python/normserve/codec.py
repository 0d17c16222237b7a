"""The one place arrays become `normserve.v1.Tensor` messages and back.

A Tensor carries `dtype`, `shape` and the values, either as `raw` bytes
(row-major, little-endian, packed: the fast path) or as typed
`float_values` / `double_values` (for JSON clients). numpy arrays and torch
tensors of float32, float64 and float16 are supported; bfloat16 needs torch
(numpy has no bfloat16).

Copies, so that none is needless:

* encode: one copy of the values into the `bytes` object the protobuf field
  requires (`ndarray.tobytes()`, which also gathers a non-contiguous array in
  row-major order). A big-endian array is byte-swapped first, and a torch
  tensor on a GPU is first copied to the host; nothing else is copied.
* SplicedRequest (what Session.forward sends): the values are not put in a
  protobuf message at all; `bytes.join` copies them once, straight into the
  serialized request, where protobuf would copy them three times (into
  `bytes`, into the message, into the serialization).
* decode to numpy: none beyond protobuf's own. The array is a read-only view
  of the message's bytes (`np.frombuffer`); pass `copy=True` for a writable
  array.
* decode to torch: one copy, because a torch tensor is always writable and
  must not alias an immutable `bytes` object; decoding onto a GPU copies
  straight from the message's bytes to the device.

torch is never imported here unless a torch tensor was passed in or a torch
result was asked for.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from normserve.v1 import tensor_pb2

if TYPE_CHECKING:
    from google.protobuf.message import Message

# A numpy array or a torch tensor (torch is optional, so the union cannot be
# spelled here): what the client takes and returns as tensors.
Array = Any

FLOAT32 = tensor_pb2.DATA_TYPE_FLOAT32
FLOAT64 = tensor_pb2.DATA_TYPE_FLOAT64
FLOAT16 = tensor_pb2.DATA_TYPE_FLOAT16
BFLOAT16 = tensor_pb2.DATA_TYPE_BFLOAT16

DTYPE_NAMES: dict[int, str] = {FLOAT32: "float32", FLOAT64: "float64", FLOAT16: "float16", BFLOAT16: "bfloat16"}
_BY_NAME = {name: wire for wire, name in DTYPE_NAMES.items()}
# Wire dtype -> the little-endian numpy dtype of its raw bytes (bfloat16: none).
_NUMPY_WIRE: dict[int, np.dtype[Any]] = {FLOAT32: np.dtype("<f4"), FLOAT64: np.dtype("<f8"), FLOAT16: np.dtype("<f2")}
_ITEMSIZE: dict[int, int] = {FLOAT32: 4, FLOAT64: 8, FLOAT16: 2, BFLOAT16: 2}
SUPPORTED = "float32, float64, float16 or bfloat16"


def import_torch() -> Any:
    """torch, imported on first use; a clear error where it is missing."""
    try:
        import torch
    except ImportError as error:
        raise ImportError("this needs PyTorch (pip install torch)") from error
    return torch


def is_torch_tensor(x: object) -> bool:
    """True for a torch.Tensor; never imports torch (a caller holding a tensor
    has already imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def wire_dtype(dtype: Any) -> int:
    """The DataType value of `dtype`: a name ("float32", "bfloat16", ...), a
    numpy dtype or scalar type, a torch dtype, or a DataType value itself."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype in DTYPE_NAMES:
            return dtype
        raise ValueError(f"unknown DataType value {dtype}; expected one of {sorted(DTYPE_NAMES)}")
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in _BY_NAME:
            return _BY_NAME[name]
        raise ValueError(f"unsupported dtype {dtype!r}: normserve tensors are {SUPPORTED}")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if name in _BY_NAME:
            return _BY_NAME[name]
        raise TypeError(f"unsupported dtype {dtype}: normserve tensors are {SUPPORTED}")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"not a dtype: {dtype!r}") from None
    return _numpy_wire_dtype(np_dtype)


def _data_type(wire: int) -> tensor_pb2.DataType:
    """A DataType value for a message field (DataType values are ints)."""
    return cast(tensor_pb2.DataType, wire)


def _numpy_wire_dtype(np_dtype: np.dtype[Any]) -> int:
    if np_dtype.kind == "f" and np_dtype.itemsize in (2, 4, 8):
        return {2: FLOAT16, 4: FLOAT32, 8: FLOAT64}[np_dtype.itemsize]
    raise TypeError(f"unsupported dtype {np_dtype}: normserve tensors are {SUPPORTED} "
                    f"(convert first, e.g. x.astype(np.float32))")


def encode(x: Array, *, typed: bool = False) -> tensor_pb2.Tensor:
    """A Tensor message holding `x` (numpy array, torch tensor, or anything
    `np.asarray` accepts), with its dtype and shape. `typed=True` sends
    `float_values` (`double_values` for float64) instead of raw bytes."""
    array, wire = _as_array(x, typed)
    message = tensor_pb2.Tensor(dtype=_data_type(wire), shape=array.shape)
    if typed:
        if wire == FLOAT64:
            doubles = message.double_values
            doubles.SetInParent()
            doubles.values.extend(array.ravel().tolist())
        else:
            floats = message.float_values
            floats.SetInParent()
            floats.values.extend(array.astype(np.float32, copy=False).ravel().tolist())
        return message
    # The one copy; it also gathers a non-contiguous array in row-major order.
    message.raw = array.tobytes(order="C")
    return message


def _as_array(x: Array, typed: bool = False) -> tuple[np.ndarray[Any, Any], int]:
    """`x` as a numpy array holding the values to send (a view where
    possible: bfloat16 as its int16 bits, or as float32 for typed values;
    little-endian for raw bytes) and its wire dtype."""
    if is_torch_tensor(x):
        torch = sys.modules["torch"]
        wire = wire_dtype(x.dtype)
        tensor = x.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.dtype == torch.bfloat16:
            # Typed: bfloat16 values are exact in float32. Raw: the same bits
            # in a dtype numpy knows, a view.
            array = tensor.float().numpy() if typed else tensor.view(torch.int16).numpy()
        else:
            array = tensor.numpy()
    else:
        array = np.asarray(x)
        wire = _numpy_wire_dtype(array.dtype)
    little = array.dtype.newbyteorder("<")
    if not typed and array.dtype != little:
        array = array.astype(little)
    return array, wire


def encode_parts(x: Array) -> tuple[tensor_pb2.Tensor, np.ndarray[Any, Any]]:
    """`x` for splicing into a request without a protobuf copy: a Tensor
    holding only dtype and shape, and the raw bytes as a flat uint8 view
    (copied only when `x` is not C-contiguous or not little-endian)."""
    array, wire = _as_array(x)
    header = tensor_pb2.Tensor(dtype=_data_type(wire), shape=array.shape)
    return header, np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _length_delimited_key(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)


_RAW_KEY = _length_delimited_key(tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["raw"].number)


class SplicedRequest:
    """A request message with a Tensor field whose raw bytes are spliced into
    the serialized message instead of being copied into a protobuf message
    first (protobuf would copy them twice more: into the message, then into
    the serialized bytes). Serialized as `message` (without that field)
    followed by the field, which the protobuf encoding allows in any order;
    one copy of the values in all (`bytes.join`)."""

    __slots__ = ("message", "field_number", "header", "raw")

    def __init__(self, message: Message, field: str, x: Array) -> None:
        """message: the request without `field`; field: the name of its
        Tensor field; x: the array to send there."""
        if message.HasField(field):
            raise ValueError(f"{field}: already set in the message; it is spliced in")
        self.message = message
        self.field_number = message.DESCRIPTOR.fields_by_name[field].number
        self.header, self.raw = encode_parts(x)

    def HasField(self, name: str) -> bool:
        return self.message.HasField(name)

    def SerializeToString(self) -> bytes:
        header = self.header.SerializeToString()
        raw_prefix = _RAW_KEY + _varint(self.raw.nbytes)
        tensor_length = len(header) + len(raw_prefix) + self.raw.nbytes
        return b"".join([self.message.SerializeToString(), _length_delimited_key(self.field_number),
                         _varint(tensor_length), header, raw_prefix, self.raw.data])


def serialize(message: Message | SplicedRequest) -> bytes:
    """The request serializer for calls that take SplicedRequests (and plain
    messages)."""
    return message.SerializeToString()


def _numel(message: tensor_pb2.Tensor) -> int:
    return math.prod(message.shape)


def _check_shape(message: tensor_pb2.Tensor) -> None:
    if any(size < 0 for size in message.shape):
        raise ValueError(f"tensor: negative size in shape {list(message.shape)}")


def _raw_bytes(message: tensor_pb2.Tensor) -> bytes:
    """The raw bytes, checked against shape and dtype."""
    if message.dtype not in _ITEMSIZE:
        raise ValueError(f"tensor: raw values need a dtype ({SUPPORTED}), got DataType {message.dtype}")
    data = message.raw
    expected = _numel(message) * _ITEMSIZE[message.dtype]
    if len(data) != expected:
        raise ValueError(f"tensor: raw holds {len(data)} bytes, shape {tuple(message.shape)} "
                         f"of {DTYPE_NAMES[message.dtype]} needs {expected}")
    return data


def _typed_values(message: tensor_pb2.Tensor, which: str) -> tuple[np.ndarray[Any, Any], int]:
    """Typed values as a float32/float64 numpy array in the tensor's shape,
    and the dtype they are to be converted to."""
    if which == "float_values":
        values = np.array(message.float_values.values, dtype=np.float32)
        target = message.dtype or FLOAT32
    else:
        values = np.array(message.double_values.values, dtype=np.float64)
        target = message.dtype or FLOAT64
    if target not in _ITEMSIZE:
        raise ValueError(f"tensor: unknown DataType {target}")
    if values.size != _numel(message):
        raise ValueError(f"tensor: {which} holds {values.size} values, shape {tuple(message.shape)} "
                         f"needs {_numel(message)}")
    return values.reshape(tuple(message.shape)), target


def _which(message: tensor_pb2.Tensor) -> str:
    which: str | None = message.WhichOneof("values")
    if which is None:
        raise ValueError("tensor: carries no values (none of raw, float_values, double_values is set)")
    _check_shape(message)
    return which


def to_numpy(message: tensor_pb2.Tensor, *, copy: bool = False) -> np.ndarray[Any, Any]:
    """The tensor as a numpy array of its dtype. Raw values come back as a
    read-only view of the message's bytes unless `copy` is set. bfloat16 has
    no numpy dtype: use `to_torch`."""
    which = _which(message)
    if which == "raw":
        if message.dtype == BFLOAT16:
            raise TypeError("numpy has no bfloat16: decode this tensor with normserve.codec.to_torch "
                            "(or send float32/float16)")
        array = np.frombuffer(_raw_bytes(message), dtype=_NUMPY_WIRE[message.dtype])
        array = array.reshape(tuple(message.shape))
        return array.copy() if copy else array
    values, target = _typed_values(message, which)
    if target == BFLOAT16:
        raise TypeError("numpy has no bfloat16: decode this tensor with normserve.codec.to_torch")
    # Round to nearest even, as the server converts typed values.
    return values.astype(_NUMPY_WIRE[target].newbyteorder("="), copy=False)


def to_torch(message: tensor_pb2.Tensor, *, device: Any = None) -> Any:
    """The tensor as a torch.Tensor of its dtype (on `device`, default CPU)."""
    torch = import_torch()
    which = _which(message)
    shape = tuple(message.shape)
    if which == "raw":
        data = _raw_bytes(message)
        if message.dtype == BFLOAT16:
            array = np.frombuffer(data, dtype="<i2")
            view_as = torch.bfloat16
        else:
            array = np.frombuffer(data, dtype=_NUMPY_WIRE[message.dtype])
            view_as = None
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))  # the copy
        elif device is None or torch.device(device).type == "cpu":
            array = array.copy()  # torch tensors are writable: never alias the bytes
        else:
            # Only read by the copy to the device, never exposed: no host copy.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array)
                if view_as is not None:
                    tensor = tensor.view(view_as)
                return tensor.reshape(shape).to(device)
        tensor = torch.from_numpy(array)
        if view_as is not None:
            tensor = tensor.view(view_as)
        tensor = tensor.reshape(shape)
        return tensor if device is None else tensor.to(device)
    values, target = _typed_values(message, which)
    # torch rounds float32/float64 -> half/bfloat16 to nearest even, as the server does.
    tensor = torch.from_numpy(values).to(getattr(torch, DTYPE_NAMES[target]))
    return tensor if device is None else tensor.to(device)


def decode_like(message: tensor_pb2.Tensor, like: Array | None) -> Array:
    """Decode as the caller's input was given: a torch tensor on `like`'s
    device for a torch input, else a numpy array (bfloat16: torch)."""
    if like is not None and is_torch_tensor(like):
        return to_torch(message, device=like.device if like.device.type != "cpu" else None)
    return decode(message)


def decode(message: tensor_pb2.Tensor) -> Array:
    """numpy where numpy has the dtype, torch for bfloat16 (numpy has none)."""
    if message.dtype == BFLOAT16:
        return to_torch(message)
    return to_numpy(message)
