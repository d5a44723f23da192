"""The gateway's requests below gRPC (limits, text, counts), and the servicer's one error table."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from mbt_aggregator.config import GatewayLimits
from mbt_aggregator.generation import Gateway, GenerateRequest
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.servicer import GatewayServicer
from mbt_core.errors import InvalidRequest, QuorumNotReached
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from tests.unit.aggregator.fakes import FakeClient, all_branches, make_engine


def _gateway(
    model: MBTLanguageModel, tokenizer: Tokenizer, policy: FanoutPolicy | None = None
) -> tuple[Gateway, Metrics, dict[str, FakeClient]]:
    engine, clients = make_engine(model, {"a": all_branches(model)}, policy)
    metrics = Metrics(CollectorRegistry())
    limits = GatewayLimits(max_new_tokens=8, max_prompt_tokens=20, max_score_tokens=40)
    return Gateway(engine, tokenizer, limits, metrics), metrics, clients


def _failed(metrics: Metrics, reason: str) -> float:
    labels = {"reason": reason}
    return metrics.registry.get_sample_value("mbt_requests_failed_total", labels) or 0.0


async def _events(gateway: Gateway, request: GenerateRequest) -> list[Any]:
    return [event async for event in gateway.generate(request)]


def test_generated_text_is_the_decoded_tokens(
    tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer
) -> None:
    gateway, metrics, _ = _gateway(tiny_model, tiny_tokenizer)
    request = GenerateRequest("Shall I compare", max_new_tokens=6, temperature=0.9, seed=3)
    events = asyncio.run(_events(gateway, request))
    assert [e.index for e in events] == list(range(len(events))) and 0 < len(events) <= 6
    tokens = [e.token for e in events if e.token != tiny_tokenizer.eos_id]
    assert "".join(e.text for e in events) == tiny_tokenizer.decode(tokens)
    assert metrics.registry.get_sample_value("mbt_tokens_generated_total") == len(events)
    assert metrics.registry.get_sample_value("mbt_time_to_first_token_seconds_count") == 1
    assert all(len(e.layers) == len(tiny_model.layers) for e in events)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerateRequest("Shall I", max_new_tokens=9), "max_new_tokens 9 exceeds the limit of 8"),
        (GenerateRequest("Shall I", temperature=-1.0), "temperature must be finite"),
        (GenerateRequest(""), "the prompt is empty"),
        (GenerateRequest("Shall I compare thee " * 10), "exceeds the limit of 20"),
    ],
)
def test_a_request_beyond_the_limits_is_invalid_and_counted(
    tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer, request_: GenerateRequest, message: str
) -> None:
    gateway, metrics, clients = _gateway(tiny_model, tiny_tokenizer)
    with pytest.raises(InvalidRequest, match=message):
        asyncio.run(_events(gateway, request_))
    assert _failed(metrics, "invalid") == 1 and _failed(metrics, "quorum") == 0
    assert clients["a"].calls == 0  # refused before any node was asked


def test_scoring_checks_its_length_and_counts_a_lost_quorum(
    tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer
) -> None:
    gateway, metrics, clients = _gateway(tiny_model, tiny_tokenizer, FanoutPolicy(min_branches=2))
    with pytest.raises(InvalidRequest, match=r"text must encode to 2\.\.40 tokens"):
        asyncio.run(gateway.score("S"))
    result = asyncio.run(gateway.score("Shall I compare thee"))
    assert result.tokens == len(tiny_tokenizer.encode("Shall I compare thee")) - 1
    clients["a"].fail = True
    with pytest.raises(QuorumNotReached):
        asyncio.run(gateway.score("Shall I compare thee"))
    assert (_failed(metrics, "invalid"), _failed(metrics, "quorum")) == (1, 1)


class _Aborted(Exception):
    pass


class _Context:
    """What the servicer uses of a gRPC context: ``abort`` ends the call with a status."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted


def test_the_servicer_tells_each_error_with_its_status_code(
    tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer
) -> None:
    policy = FanoutPolicy(min_branches=2)
    gateway, _, clients = _gateway(tiny_model, tiny_tokenizer, policy)
    servicer = GatewayServicer(gateway, gateway.engine, None, "", policy)  # type: ignore[arg-type]

    def score(text: str) -> tuple[grpc.StatusCode, str] | None:
        context = _Context()
        with pytest.raises(_Aborted):
            asyncio.run(servicer.Score(gw.ScoreRequest(text=text), context))  # type: ignore[arg-type]
        return context.status

    assert score("S") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "text must encode to 2..40 tokens, got 1",
    )
    clients["a"].fail = True
    code, details = score("Shall I compare thee") or (None, "")
    assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("layer 0:")

    async def generate() -> None:
        request = gw.GenerateRequest(prompt="Shall I", max_new_tokens=99)
        async for _ in servicer.Generate(request, context):  # type: ignore[arg-type]
            pass

    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(generate())
    assert context.status == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens 99 exceeds the limit of 8",
    )
