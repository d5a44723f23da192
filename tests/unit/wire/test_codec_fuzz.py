"""Property tests of the tensor codec: any message decodes cleanly or raises CodecError.

Messages are built from adversarial parts (unknown dtypes and compressions, negative, huge and
zero dimensions, too many dimensions, buffers of the wrong length) and from valid tensors that
were then truncated or padded; valid tensors with NaN, Inf and arbitrary bit patterns must
round-trip bit for bit.
"""

from __future__ import annotations

import math

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from mbt_core.errors import CodecError
from mbt_core.wire.codec import MAX_RANK, decode, encode
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from tests.unit import hypothesis_profiles  # noqa: F401  (registers the profiles)

INT64_MAX = 2**63 - 1
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
dims = st.one_of(
    st.integers(0, 6),
    st.integers(-(2**63), -1),
    st.integers(2**20, INT64_MAX),
    st.sampled_from([0, 1, 2**31, 2**32 + 1, INT64_MAX]),
)
shapes = st.lists(dims, max_size=MAX_RANK + 2)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_decode(msg: pb.Tensor, max_elements: int | None) -> None:
    """The property: a CodecError, or a tensor that is exactly what the message describes."""
    try:
        tensor = decode(msg, max_elements)
    except CodecError:
        return
    assert tuple(tensor.shape) == tuple(msg.shape)
    assert tensor.numel() == math.prod(msg.shape)
    if max_elements is not None:
        assert tensor.numel() <= max_elements
    again = encode(tensor)
    assert again.dtype == msg.dtype and list(again.shape) == list(msg.shape)
    assert again.buffer == msg.buffer


@example(dtype=1, shape=[2**62, 2**62, 0], buffer=b"", compression=0, max_elements=None)
@example(dtype=1, shape=[INT64_MAX, 0], buffer=b"", compression=0, max_elements=10)
@given(
    dtype=st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1)),
    shape=shapes,
    buffer=st.binary(max_size=256),
    compression=st.one_of(st.just(0), st.integers(0, 2**31 - 1)),
    max_elements=st.one_of(st.none(), st.integers(0, 1000)),
)
def test_arbitrary_messages_decode_or_raise_codec_error(
    dtype: int, shape: list[int], buffer: bytes, compression: int, max_elements: int | None
) -> None:
    msg = pb.Tensor(dtype=dtype, shape=shape, buffer=buffer, compression=compression)
    check_decode(msg, max_elements)


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_sized_buffers_with_any_shape_decode_or_raise(
    data: st.DataObject, dtype: torch.dtype
) -> None:
    """Buffers sized for the shape (or off by a little): reaches the checks past the length."""
    shape = data.draw(st.lists(st.integers(0, 5), max_size=MAX_RANK + 1))
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = math.prod(shape) * itemsize + data.draw(st.sampled_from([0, 0, 0, -1, 1, itemsize]))
    buffer = data.draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))
    msg = pb.Tensor(dtype=encode(torch.empty(0, dtype=dtype)).dtype, shape=shape, buffer=buffer)
    check_decode(msg, data.draw(st.one_of(st.none(), st.integers(0, 2000))))


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=4),
    raw=st.binary(min_size=2048, max_size=2048),
)
def test_any_bit_pattern_round_trips_exactly(
    dtype: torch.dtype, shape: list[int], raw: bytes
) -> None:
    """NaN, Inf, signed zeros, subnormals: whatever the bits, decode(encode(x)) is x."""
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = bytearray(raw[: count * itemsize])
    tensor = (
        torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
        if count
        else (torch.empty(shape, dtype=dtype))
    )
    back = decode(encode(tensor))
    assert back.dtype == dtype and back.shape == tensor.shape
    assert bits(back) == bits(tensor)


@given(
    dtype=st.sampled_from(DTYPES),
    special=st.lists(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 65504.0]),
        min_size=1,
        max_size=16,
    ),
)
def test_non_finite_values_survive_the_wire(dtype: torch.dtype, special: list[float]) -> None:
    tensor = torch.tensor(special, dtype=torch.float32).to(dtype)
    assert bits(decode(encode(tensor))) == bits(tensor)


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    cut=st.integers(-64, 64).filter(lambda n: n != 0),
)
def test_truncated_or_padded_buffers_are_codec_errors(
    dtype: torch.dtype, shape: list[int], cut: int
) -> None:
    msg = encode(torch.zeros(shape, dtype=dtype))
    msg.buffer = msg.buffer[:cut] if cut < 0 else msg.buffer + b"\0" * cut
    try:
        decode(msg)
    except CodecError as exc:
        assert "bytes" in str(exc)
    else:
        raise AssertionError(f"a buffer {cut:+d} bytes off decoded")


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    limit=st.integers(0, 64),
)
def test_oversized_tensors_are_refused_by_the_element_limit(
    dtype: torch.dtype, shape: list[int], limit: int
) -> None:
    msg = encode(torch.zeros(shape, dtype=dtype))
    try:
        decode(msg, max_elements=limit)
    except CodecError as exc:
        assert math.prod(shape) > limit and "exceeds the limit" in str(exc)
    else:
        assert math.prod(shape) <= limit
