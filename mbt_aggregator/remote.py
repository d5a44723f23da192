"""A small blocking client of the gateway, for the ``mbt generate/eval --gateway`` commands."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from mbt_core.errors import MbtError
from mbt_core.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_core.sampling import SamplingConfig

OUTCOME_NAMES = {gw.OUTCOME_OK: "ok", gw.OUTCOME_MASKED: "masked", gw.OUTCOME_REJECTED: "rejected"}


class GatewayError(MbtError):
    """The gateway refused or failed a request."""


def _error(address: str, exc: grpc.RpcError) -> GatewayError:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return GatewayError(f"gateway {address}: {code}: {details}")


def generate_remote(
    address: str, prompt: str, cfg: SamplingConfig, timeout_s: float = 600.0
) -> Iterator[gw.GenerateEvent]:
    request = gw.GenerateRequest(
        prompt=prompt,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or 0,
        top_p=cfg.top_p or 0.0,
        seed=cfg.seed,
    )
    with grpc.insecure_channel(address) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        try:
            yield from stub.Generate(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _error(address, exc) from exc


def score_remote(address: str, text: str, timeout_s: float = 600.0) -> gw.ScoreResponse:
    with grpc.insecure_channel(address) as channel:
        try:
            return gw_grpc.GatewayServiceStub(channel).Score(
                gw.ScoreRequest(text=text), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise _error(address, exc) from exc


def describe_layers(event: gw.GenerateEvent) -> str:
    """``L0: 1101 L1: 1h11`` per token: 1 used, 0 masked, x rejected, h hedged and used."""
    parts = []
    for layer in event.layers:
        marks = "".join(
            "x"
            if b.outcome == gw.OUTCOME_REJECTED
            else "0"
            if b.outcome != gw.OUTCOME_OK
            else "h"
            if b.hedged
            else "1"
            for b in layer.branches
        )
        parts.append(f"L{layer.layer}:{marks}")
    return " ".join(parts)
