"""Tensors on the wire: ``mbt.v1.Tensor`` <-> ``torch.Tensor``.

Encoding reinterprets the tensor's memory as bytes (one copy into the protobuf message, which
owns its bytes); decoding wraps the message's bytes with ``torch.frombuffer`` without copying,
so a decoded tensor is read-only in spirit: clone it before writing into it.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import NamedTuple

import torch

from mbt_core.errors import CodecError
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb

MAX_RANK = 8


class _DType(NamedTuple):
    name: str  # as flags and configs spell it
    torch: torch.dtype
    wire: pb.DType  # the mbt.v1.DType code
    computes: bool  # a node may compute in it (CPU float16 matmuls are too slow to offer)


# The dtype table: names, torch dtypes and wire codes, here only.
_TABLE = (
    _DType("float32", torch.float32, pb.DTYPE_FLOAT32, computes=True),
    _DType("float16", torch.float16, pb.DTYPE_FLOAT16, computes=False),
    _DType("bfloat16", torch.bfloat16, pb.DTYPE_BFLOAT16, computes=True),
)
DTYPES: dict[str, torch.dtype] = {d.name: d.torch for d in _TABLE}
COMPUTE_DTYPES: tuple[str, ...] = tuple(d.name for d in _TABLE if d.computes)
_TO_WIRE = {d.torch: d.wire for d in _TABLE}
_FROM_WIRE: dict[int, torch.dtype] = {d.wire: d.torch for d in _TABLE}

if sys.byteorder != "little":  # the wire is little-endian; no big-endian host is supported yet
    raise ImportError("mbt_core.wire.codec needs a little-endian host")

# Decoded tensors wrap the message's immutable bytes and are never written into: the warning
# torch gives for that is noise. Filtered once here (a per-call catch_warnings costs more than
# the decode itself on a one-token step).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def wire_dtype(dtype: torch.dtype) -> pb.DType:
    """The wire code of a supported torch dtype (``Describe`` says what a node computes in)."""
    code = _TO_WIRE.get(dtype)
    if code is None:
        raise CodecError(f"cannot send dtype {dtype}; supported: {', '.join(DTYPES)}")
    return code


def torch_dtype(code: int) -> torch.dtype:
    """The torch dtype of a wire code; a :class:`CodecError` for an unknown one."""
    dtype = _FROM_WIRE.get(code)
    if dtype is None:
        raise CodecError(f"unsupported tensor dtype: {dtype_name(code)}")
    return dtype


def dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else f"unknown dtype {code}"


def encode(tensor: torch.Tensor) -> pb.Tensor:
    """Encode a CPU or GPU tensor of a supported dtype (C order, little-endian)."""
    return encode_into(pb.Tensor(), tensor)


def encode_into(msg: pb.Tensor, tensor: torch.Tensor) -> pb.Tensor:
    """Fill ``msg`` (an empty field of a message being built) with ``tensor``: building a
    reply in place spares the copy that passing a finished message to its parent makes."""
    code = wire_dtype(tensor.dtype)
    flat = tensor
    if not (tensor.is_cpu and tensor.is_contiguous()) or tensor.requires_grad:
        flat = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret as bytes first
        flat = flat.reshape(-1).view(torch.uint8)
    msg.dtype = code
    msg.shape.extend(tensor.shape)
    msg.buffer = flat.numpy().tobytes()
    return msg


def decode(msg: pb.Tensor, max_elements: int | None = None) -> torch.Tensor:
    """Decode without copying; every inconsistency is a :class:`CodecError`."""
    if msg.compression != pb.COMPRESSION_NONE:
        raise CodecError(f"unsupported compression {msg.compression}")
    dtype = torch_dtype(msg.dtype)
    shape = tuple(msg.shape)
    if len(shape) > MAX_RANK or min(shape, default=0) < 0:
        raise CodecError(f"invalid tensor shape {shape}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise CodecError(f"tensor of {count} elements exceeds the limit of {max_elements}")
    itemsize = dtype.itemsize
    buffer = msg.buffer  # each read of the field makes a new bytes object: read it once
    if len(buffer) != count * itemsize:
        raise CodecError(
            f"tensor buffer has {len(buffer)} bytes, shape {shape} of {dtype_name(msg.dtype)} "
            f"needs {count * itemsize}"
        )
    sized = count if count else math.prod(max(d, 1) for d in shape)  # torch sizes empty ones too
    if sized * itemsize >= 2**63:
        raise CodecError(f"invalid tensor shape {shape}: beyond any addressable size")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
