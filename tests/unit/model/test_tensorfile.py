"""The one-buffer safetensors reader: the same tensors as ``safetensors`` reads, no copies,
and every malformed header refused with a ``ValueError``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from mbt_core.model.tensorfile import metadata_of, read_whole, tensors_of

TENSORS = {
    "w": torch.randn(3, 5).to(torch.bfloat16),
    "b": torch.randn(7),
    "h": torch.randn(2, 2).half(),
    "empty": torch.zeros(0, 4),
    "flag": torch.tensor([True, False]),
}


def test_tensors_equal_the_reference_reader_and_are_views(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(save(TENSORS, metadata={"format": "x"}))
    data = read_whole(path)
    got, want = tensors_of(data), load(path.read_bytes())
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    assert metadata_of(data) == {"format": "x"}
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    w = got["w"]
    assert start <= w.data_ptr() < start + len(data)  # a view of the buffer, not a copy


def _file(entries: dict, body: bytes = b"\0" * 16) -> bytearray:
    raw = json.dumps(entries).encode()
    return bytearray(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytearray(b"\1\2"), "shorter than a safetensors header"),
        (bytearray(struct.pack("<Q", 1 << 40) + b"{}"), "beyond end of file"),
        (bytearray(struct.pack("<Q", 2) + b"[]"), "not a JSON object"),
        (bytearray(struct.pack("<Q", 2) + b"{x"), "not JSON"),
        (_file({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}), "unsupported"),
        (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}), "do not fit"),
        (_file({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}), "do not fit"),
        (_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), "malformed"),
        (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}), "malformed"),
        (_file({"a": 3}), "not an object"),
    ],
)
def test_malformed_files_are_value_errors(data: bytearray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tensors_of(data)


def test_a_file_that_changes_size_while_read_is_refused(tmp_path: Path) -> None:
    from mbt_core.model.tensorfile import read_into

    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    with open(path, "rb") as fh, pytest.raises(ValueError, match="longer than 8"):
        read_into(fh.fileno(), 8)
    with open(path, "rb") as fh, pytest.raises(ValueError, match="ended after 10 of 12"):
        read_into(fh.fileno(), 12)


def test_written_files_read_back_with_safetensors_and_stay_aligned(tmp_path: Path) -> None:
    from mbt_core.model.tensorfile import header, write_tensors

    path = tmp_path / "w.safetensors"
    with open(path, "wb") as fh:
        write_tensors(fh, TENSORS, {"format": "y"})
    want = load(path.read_bytes())  # the reference reader accepts the file
    assert set(want) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert want[name].dtype == tensor.dtype and torch.equal(want[name], tensor)
    data = read_whole(path)
    entries, start = header(data)
    assert start % 8 == 0 and metadata_of(data) == {"format": "y"}
    for name, tensor in TENSORS.items():
        begin = entries[name]["data_offsets"][0]
        assert (start + begin) % tensor.dtype.itemsize == 0  # views need no unaligned reads
