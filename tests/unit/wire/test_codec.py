import pytest
import torch

from mbt_core.errors import CodecError
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (0, 4), (3,), (2, 5, 7)])
def test_round_trip_is_exact_per_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    if t.numel():
        t.view(-1)[0] = float("-inf")  # special values survive too
    msg = pb.Tensor.FromString(encode(t).SerializeToString())  # through real wire bytes
    back = decode(msg)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)  # bit patterns too: -inf stays -inf


def test_non_contiguous_input_is_encoded_in_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(decode(encode(t)), t)


def test_decode_shares_the_message_buffer() -> None:
    msg = encode(torch.ones(1000))
    a = decode(msg)
    assert a.untyped_storage().nbytes() == 4000  # a view of the bytes, no padding or copy


def test_unsupported_dtype_is_refused_on_encode() -> None:
    with pytest.raises(CodecError, match=r"cannot send dtype torch\.int64"):
        encode(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], buffer=b"\0" * 4), "DTYPE_UNSPECIFIED"),
        (pb.Tensor(dtype=77, shape=[1], buffer=b"\0" * 4), "unknown dtype 77"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], buffer=b"\0" * 20), "has 20 bytes"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 3], buffer=b""), "invalid tensor shape"),
        (
            pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 9, buffer=b"\0" * 4),
            "invalid tensor shape",
        ),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 2**40], buffer=b""), "has 0 bytes"),
    ],
)
def test_malformed_messages_are_codec_errors(msg: pb.Tensor, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode(msg)


def test_element_limit() -> None:
    with pytest.raises(CodecError, match="exceeds the limit of 10"):
        decode(encode(torch.zeros(11)), max_elements=10)
