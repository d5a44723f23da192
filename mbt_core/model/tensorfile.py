"""Safetensors files read once (the bytes land in one buffer, the tensors are views of it)
and written without a copy of the whole file in memory.

``safetensors.torch.load(bytes)`` copies every tensor out of the bytes, so a loader that has
read (and hashed) a file holds it twice until the bytes are dropped: for a trunk or a
checkpoint of a billion bfloat16 parameters, gigabytes. Here the file is read into one
writable buffer and each tensor wraps its slice of it, so a file costs its size once, and
what was hashed is exactly what is loaded. The header is untrusted until checked: every
offset, dtype and shape is validated, and every failure is one ``ValueError``. Writing streams
each tensor's memory into the file (``safetensors.torch.save`` builds the whole file as one
bytes object first): tensors are laid out widest dtype first, so every one stays aligned.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import BinaryIO

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit


def write_tensors(fh: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (on the CPU) and ``metadata`` as a safetensors file into ``fh``."""
    order = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        size = t.numel() * t.dtype.itemsize
        entries[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    fh.write(len(raw).to_bytes(8, "little") + raw)
    for name in order:
        t = tensors[name].detach().contiguous()
        if t.numel():
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)


def read_whole(path: Path, size: int | None = None) -> bytearray:
    """The file's bytes in one buffer (no second copy while joining chunks)."""
    with open(path, "rb") as fh:
        return read_into(fh.fileno(), os.fstat(fh.fileno()).st_size if size is None else size)


def read_into(fd: int, size: int) -> bytearray:
    """Exactly ``size`` bytes of ``fd``; a ``ValueError`` if the file is shorter or longer
    (it changed while read)."""
    buf = bytearray(size)
    view, done = memoryview(buf), 0
    while done < size:
        n = os.readv(fd, [view[done:]])
        if n == 0:
            raise ValueError(f"file ended after {done} of {size} bytes")
        done += n
    if os.read(fd, 1):
        raise ValueError(f"file is longer than {size} bytes")
    return buf


def header(data: bytes | bytearray) -> tuple[dict[str, object], int]:
    """The parsed JSON header and where the tensor data starts."""
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER):
        raise ValueError("header length beyond end of file")
    try:
        parsed = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError("header is not a JSON object")
    return parsed, 8 + n


def tensors_of(data: bytearray) -> dict[str, torch.Tensor]:
    """Every tensor of the file in ``data``, each a view of its bytes (no copy)."""
    parsed, start = header(data)
    body = len(data) - start
    tensors = {}
    for name, entry in parsed.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"tensor {name!r}: entry is not an object")
        dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unsupported dtype {entry.get('dtype')!r}")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:  # type: ignore[arg-type]
            raise ValueError(f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets  # type: ignore[misc]
        count = math.prod(shape)  # type: ignore[arg-type]
        if not 0 <= begin <= end <= body or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not fit {shape}")
        flat = (
            torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.view(shape)  # type: ignore[arg-type]
    return tensors


def metadata_of(data: bytes | bytearray) -> dict[str, str]:
    meta = header(data)[0].get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return meta


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )
