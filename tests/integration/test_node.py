"""Branch node processes: exact outputs, sessions, batching, bad input, refusal to start."""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

from mbt_core.artifacts.manifest import manifest_digest, read_manifest
from mbt_core.trust.keys import generate_key
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.contract import SERVICE_TYPE
from mbt_core.wire.discovery import NodeRecord
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_node.launcher import ManagedProcess, StartError, node_id, start_node
from tests.integration.conftest import SignedModel

pytestmark = pytest.mark.integration
SECRET = b"test-session-secret"  # binds the tests' sessions to their opener
Stub = pb_grpc.BranchServiceStub
D = 32  # d_model of the test model
TIMEOUT = 10.0


def forward(
    stub: Stub,
    layer: int,
    branches: list[int],
    steps: list[tuple[str, int, int]],
    x: torch.Tensor,
    secret: bytes = SECRET,
) -> dict[int, torch.Tensor]:
    request = pb.ForwardRequest(
        layer=layer,
        branches=branches,
        inputs=encode(x),
        steps=[pb.SessionStep(session_id=s, start=a, length=n, secret=secret) for s, a, n in steps],
    )
    response = stub.Forward(request, timeout=TIMEOUT)
    return {o.branch: decode(o.outputs).clone() for o in response.outputs}


def test_describe_reports_what_the_node_serves(
    signed_model: SignedModel, node_factory, stub_for
) -> None:
    node = node_factory(signed_model.node_args("1:0,1:2", "--no-advertise"))
    info = stub_for(node).Describe(pb.DescribeRequest(), timeout=TIMEOUT)
    manifest = read_manifest(signed_model.directory)
    assert info.manifest_sha256 == manifest_digest(manifest)
    assert [(b.layer, b.branch) for b in info.branches] == [(1, 0), (1, 2)]
    assert info.branches[1].artifact_sha256 == manifest.branch(1, 2).sha256
    assert (info.d_model, info.context_length, info.dtype) == (D, 64, pb.DTYPE_FLOAT32)
    assert info.model_id == manifest.model_id and info.protocol_version == 2
    assert info.limits.max_sessions > 0 and info.limits.max_message_bytes > 0


def test_forward_equals_in_process_branch(
    signed_model: SignedModel, node_factory, stub_for
) -> None:
    node = node_factory(signed_model.node_args("0:0,0:1", "--no-advertise"))
    stub = stub_for(node)
    torch.manual_seed(1)
    h = torch.randn(25, D)
    with torch.no_grad():
        full = {b: signed_model.model.layers[0].branches[b](h[None])[0] for b in (0, 1)}
    # prefill of 5 positions, then 20 one-token steps
    parts = [forward(stub, 0, [0, 1], [("s", 0, 5)], h[:5])]
    parts += [forward(stub, 0, [0, 1], [("s", t, 1)], h[t : t + 1]) for t in range(5, 25)]
    for b in (0, 1):
        got = torch.cat([p[b] for p in parts])
        assert (got - full[b]).abs().max().item() < 1e-6
    # one prefill of all 25 equals too
    whole = forward(stub, 0, [1], [("t", 0, 25)], h)[1]
    assert (whole - full[1]).abs().max().item() < 1e-6


def test_reduced_precision_inputs_are_answered_in_their_dtype(
    signed_model: SignedModel, node_factory, stub_for
) -> None:
    """A float32 node takes bfloat16 and float16 layer inputs (the gateway's --wire-dtype) and
    answers in the dtype they came in, close to its float32 answer."""
    node = node_factory(signed_model.node_args("0:0", "--no-advertise"))
    stub = stub_for(node)
    torch.manual_seed(2)
    h = torch.randn(6, D)
    exact = forward(stub, 0, [0], [("f32", 0, 6)], h)[0]
    for dtype in (torch.bfloat16, torch.float16):
        got = forward(stub, 0, [0], [(str(dtype), 0, 6)], h.to(dtype))[0]
        assert got.dtype == dtype
        assert (got.float() - exact).abs().max().item() < 0.1 * exact.abs().max().item()


def test_positions_gap_rollback_and_end_session(
    signed_model: SignedModel, node_factory, stub_for
) -> None:
    node = node_factory(signed_model.node_args("0:0", "--no-advertise"))
    stub = stub_for(node)
    h = torch.randn(8, D)
    first = forward(stub, 0, [0], [("s", 0, 8)], h)[0]
    with pytest.raises(grpc.RpcError) as gap:
        forward(stub, 0, [0], [("s", 10, 1)], h[:1])
    assert gap.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds 8 positions" in gap.value.details()
    assert ("mbt-cache-length", "8") in tuple(gap.value.trailing_metadata())
    # rollback: starting at 5 recomputes positions 5..7 with new inputs
    h2 = h.clone()
    h2[5:] = torch.randn(3, D)
    again = forward(stub, 0, [0], [("s", 5, 3)], h2[5:])[0]
    with torch.no_grad():
        ref = signed_model.model.layers[0].branches[0](h2[None])[0]
    assert (again - ref[5:]).abs().max().item() < 1e-6
    assert not torch.allclose(again, first[5:])
    released = stub.EndSession(pb.EndSessionRequest(session_id="s", secret=SECRET), timeout=TIMEOUT)
    assert released.released_caches == 1
    assert (
        stub.EndSession(
            pb.EndSessionRequest(session_id="s", secret=SECRET), timeout=TIMEOUT
        ).released_caches
        == 0
    )
    with pytest.raises(grpc.RpcError) as gone:  # the cache is gone: position 8 is now a gap
        forward(stub, 0, [0], [("s", 8, 1)], h[:1])
    assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _bad_requests() -> list[tuple[str, pb.ForwardRequest, grpc.StatusCode, str]]:
    ok = torch.randn(2, D)
    step = [pb.SessionStep(session_id="bad", start=0, length=2, secret=SECRET)]
    nan = ok.clone()
    nan[1, 3] = float("nan")

    def req(
        x: pb.Tensor, layer: int = 0, branches: tuple[int, ...] = (0,), steps=step
    ) -> pb.ForwardRequest:
        return pb.ForwardRequest(layer=layer, branches=list(branches), steps=steps, inputs=x)

    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return [
        (
            "no secret",
            req(encode(ok), steps=[pb.SessionStep(session_id="n", start=0, length=2)]),
            inv,
            "a session secret has 16..64 bytes, got 0",
        ),
        ("d_model", req(encode(torch.randn(2, D + 1))), inv, f"(positions, {D})"),
        ("rank", req(encode(torch.randn(1, 2, D))), inv, f"(positions, {D})"),
        ("nan", req(encode(nan)), inv, "NaN or Inf"),
        ("not served", req(encode(ok), branches=(1,)), nf, "branch 1 is not served"),
        ("other layer", req(encode(ok), layer=1), nf, "layer 1 branch 0 is not served"),
        ("count", req(encode(torch.randn(3, D))), inv, "hold 3 positions"),
        (
            "truncated",
            req(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, D], buffer=b"\0" * 7)),
            inv,
            "has 7 bytes",
        ),
        ("no steps", req(encode(ok), steps=[]), inv, "no session steps"),
        (
            "zero length",
            req(
                encode(ok), steps=[pb.SessionStep(session_id="z", start=0, length=0, secret=SECRET)]
            ),
            inv,
            "positive",
        ),
        (
            "past context",
            req(
                encode(ok),
                steps=[pb.SessionStep(session_id="c", start=63, length=2, secret=SECRET)],
            ),
            grpc.StatusCode.OUT_OF_RANGE,
            "exceed the context length 64",
        ),
    ]


def test_bad_input_gets_its_status_and_the_node_keeps_serving(
    signed_model: SignedModel, node_factory, stub_for
) -> None:
    node = node_factory(
        signed_model.node_args("0:0", "--no-advertise", "--max-message-bytes", "200000")
    )
    stub = stub_for(node)
    h = torch.randn(6, D)
    before = forward(stub, 0, [0], [("good", 0, 4)], h[:4])[0]
    for name, request, code, text in _bad_requests():
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(request, timeout=TIMEOUT)
        assert err.value.code() == code, name
        assert text in err.value.details(), (name, err.value.details())
    with pytest.raises(grpc.RpcError) as big:  # beyond the configured message size
        forward(stub, 0, [0], [("huge", 0, 1600)], torch.randn(1600, D))
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the process is alive and the other session continues exactly where it was
    assert node.proc.poll() is None
    after = forward(stub, 0, [0], [("good", 4, 2)], h[4:])[0]
    with torch.no_grad():
        ref = signed_model.model.layers[0].branches[0](h[None])[0]
    assert (torch.cat([before, after]) - ref).abs().max().item() < 1e-6


def test_session_limit_is_resource_exhausted(
    signed_model: SignedModel, node_factory, stub_for
) -> None:
    node = node_factory(signed_model.node_args("0:0", "--no-advertise", "--max-sessions", "2"))
    stub = stub_for(node)
    x = torch.randn(1, D)
    forward(stub, 0, [0], [("a", 0, 1)], x)
    forward(stub, 0, [0], [("b", 0, 1)], x)
    with pytest.raises(grpc.RpcError) as err:
        forward(stub, 0, [0], [("c", 0, 1)], x)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.EndSession(pb.EndSessionRequest(session_id="a", secret=SECRET), timeout=TIMEOUT)
    forward(stub, 0, [0], [("c", 0, 1)], x)  # room again


def test_concurrent_sessions_equal_sequential(signed_model: SignedModel, node_factory) -> None:
    """32 sessions stepping concurrently (merged into batches) give the outputs of one by one."""
    node = node_factory(signed_model.node_args("1:0,1:1", "--no-advertise", "--batch-wait-ms", "2"))
    torch.manual_seed(2)
    inputs = [torch.randn(3 + i % 5, D) for i in range(32)]

    async def run_session(stub: Stub, sid: str, h: torch.Tensor) -> dict[int, torch.Tensor]:
        prefill = h.shape[0] - 2
        outs = []
        for start, n in ((0, prefill), (prefill, 1), (prefill + 1, 1)):
            req = pb.ForwardRequest(
                layer=1,
                branches=[0, 1],
                inputs=encode(h[start : start + n]),
                steps=[pb.SessionStep(session_id=sid, start=start, length=n, secret=SECRET)],
            )
            outs.append(await stub.Forward(req, timeout=30))
        return {
            b: torch.cat([decode(o.outputs[i].outputs) for o in outs]) for i, b in enumerate((0, 1))
        }

    async def main(concurrent: bool, tag: str) -> list[dict[int, torch.Tensor]]:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = pb_grpc.BranchServiceStub(channel)
            if concurrent:
                return await asyncio.gather(
                    *(run_session(stub, f"{tag}{i}", h) for i, h in enumerate(inputs))
                )
            return [await run_session(stub, f"{tag}{i}", h) for i, h in enumerate(inputs)]

    together = asyncio.run(main(True, "c"))
    alone = asyncio.run(main(False, "s"))
    for a, b in zip(together, alone, strict=True):
        for branch in (0, 1):
            assert (a[branch] - b[branch]).abs().max().item() < 1e-6


class _Seen(ServiceListener):
    def __init__(self) -> None:
        self.added: dict[str, threading.Event] = {}
        self.removed: dict[str, threading.Event] = {}
        self.records: dict[str, NodeRecord] = {}

    def _event(self, table: dict[str, threading.Event], name: str) -> threading.Event:
        return table.setdefault(name, threading.Event())

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        info = zc.get_service_info(type_, name, timeout=3000)
        if info is not None:
            self.records[name] = NodeRecord.from_txt(info.properties)
        self._event(self.added, name).set()

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._event(self.removed, name).set()


@pytest.mark.mdns
def test_mdns_advertisement_appears_and_goes_after_sigterm(
    signed_model: SignedModel, node_factory
) -> None:
    zc = Zeroconf(interfaces=["127.0.0.1"])
    seen = _Seen()
    browser = ServiceBrowser(zc, SERVICE_TYPE, seen)
    try:
        node = node_factory(signed_model.node_args("0:1,1:2", "--interface", "127.0.0.1"))
        name = node.ready_line.split("advertised as ")[1].strip()
        assert seen._event(seen.added, name).wait(3.0), "not seen within 3 s"
        record = seen.records[name]
        assert record.branches == ((0, 1), (1, 2))
        assert record.node_id == node_id(node)
        assert record.manifest_sha256 == manifest_digest(read_manifest(signed_model.directory))
        assert node.terminate() == 0  # SIGTERM drains and exits 0
        assert seen._event(seen.removed, name).wait(3.0), "still advertised after SIGTERM"
    finally:
        browser.cancel()
        zc.close()


def test_sigterm_finishes_in_flight_calls(
    signed_model: SignedModel, node_factory, stub_for
) -> None:
    # The batcher holds the call for 500 ms, so it is surely in flight when SIGTERM lands.
    node = node_factory(signed_model.node_args("0:0", "--no-advertise", "--batch-wait-ms", "500"))
    stub = stub_for(node)
    stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)  # the channel is connected
    future = stub.Forward.future(
        pb.ForwardRequest(
            layer=0,
            branches=[0],
            inputs=encode(torch.randn(60, D)),
            steps=[
                pb.SessionStep(session_id=f"s{i}", start=0, length=1, secret=SECRET)
                for i in range(60)
            ],
        ),
        timeout=TIMEOUT,
    )
    time.sleep(0.1)  # loopback delivery takes microseconds; the batcher waits 500 ms
    node.signal(signal.SIGTERM)
    assert len(decode(future.result().outputs[0].outputs)) == 60
    assert node.proc.wait(15) == 0


def _expect_refusal(args: list[str], text: str) -> None:
    with pytest.raises(StartError) as err:
        start_node(args, timeout_s=60)
    assert "exited with code 2" in str(err.value)
    assert text in str(err.value)


def test_node_refuses_tampered_branch_file(signed_model: SignedModel, tmp_path: Path) -> None:
    copy = tmp_path / "artifacts"
    shutil.copytree(signed_model.directory, copy)
    branch_file = copy / "layer1-branch2.safetensors"
    data = bytearray(branch_file.read_bytes())
    data[-1] ^= 0xFF
    branch_file.write_bytes(bytes(data))
    args = signed_model.node_args("1:2", "--no-advertise")
    args[args.index("--artifacts") + 1] = str(copy)
    _expect_refusal(args, "layer1-branch2.safetensors")
    args = signed_model.node_args("0:0", "--no-advertise")  # a branch it does not load is fine
    args[args.index("--artifacts") + 1] = str(copy)
    start_node(args).kill()


def test_node_refuses_untrusted_signature(signed_model: SignedModel, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path, "stranger")
    args = signed_model.node_args("0:0", "--no-advertise")
    args[args.index("--trusted-key") + 1] = str(stranger.public_path)
    _expect_refusal(args, "trusted")


def test_node_refuses_branch_outside_the_model(signed_model: SignedModel) -> None:
    _expect_refusal(signed_model.node_args("5:0", "--no-advertise"), "--serve 5:0")


_ = Callable, ManagedProcess  # used in fixture annotations of other tests
