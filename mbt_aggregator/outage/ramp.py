"""An expansion's ramp as the outage bench sees it (the ``expand`` scenario).

While a run grows the model, the gateway's ``Status`` is sampled a few times a second: the
injection rate beta, the drift of the probe text from the old model (KL, nats per token) and
the probe's perplexity, as the gateway measures them itself. :func:`ramp_windows` puts them
side by side with the tokens' latency, window by window: quality and latency over the ramp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mbt_aggregator.outage.report import percentile
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

SAMPLE_EVERY_S = 0.25


@dataclass(frozen=True)
class RampSample:
    t_s: float  # since the workload started
    state: str
    beta: float
    drift_kl: float | None
    probe_perplexity: float | None


async def sample_ramp(address: str, t0: float, stop: asyncio.Event) -> list[RampSample]:
    """The gateway's expansion state every :data:`SAMPLE_EVERY_S` until ``stop`` is set."""
    samples: list[RampSample] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        while not stop.is_set():
            try:
                e = (await stub.Status(gw.StatusRequest(), timeout=2)).expansion
            except grpc.RpcError:
                e = None
            if e is not None:
                samples.append(
                    RampSample(
                        time.perf_counter() - t0,
                        e.state or "none",
                        e.beta,
                        e.drift_kl if e.HasField("drift_kl") else None,
                        e.probe_perplexity if e.HasField("probe_perplexity") else None,
                    )
                )
            try:
                async with asyncio.timeout(SAMPLE_EVERY_S):
                    await stop.wait()
            except TimeoutError:
                pass
    return samples


def ramp_windows(
    samples: Sequence[dict[str, Any]],
    series: Sequence[tuple[float, float, float]],
    window_s: float = 1.0,
) -> list[dict[str, Any]]:
    """Per ``window_s`` of the run: the last state, beta, drift and probe perplexity sampled
    in it, and the latency of the tokens that arrived in it (``series``: t, ms, lost)."""
    if not samples and not series:
        return []
    end = max([s["t_s"] for s in samples] + [t for t, _, _ in series])
    rows = []
    last: dict[str, Any] = {}
    for i in range(int(end // window_s) + 1):
        lo, hi = i * window_s, (i + 1) * window_s
        inside = [s for s in samples if lo <= s["t_s"] < hi]
        if inside:
            last = inside[-1]
        ms = [m for t, m, _ in series if lo <= t < hi]
        rows.append(
            {
                "t_s": hi,
                "state": last.get("state", "none"),
                "beta": last.get("beta", 0.0),
                "drift_kl": last.get("drift_kl"),
                "probe_perplexity": last.get("probe_perplexity"),
                "tokens": len(ms),
                "latency_p50_ms": percentile(ms, 50) if ms else None,
                "latency_p95_ms": percentile(ms, 95) if ms else None,
            }
        )
    return rows


def ramp_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["t s", "state", "beta", "drift KL", "probe ppl", "tokens", "p50 ms", "p95 ms"]

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    body = [
        [
            f"{r['t_s']:.0f}",
            r["state"],
            f"{r['beta']:.3f}",
            cell(r["drift_kl"], ".4f"),
            cell(r["probe_perplexity"], ".2f"),
            str(r["tokens"]),
            cell(r["latency_p50_ms"], ".1f"),
            cell(r["latency_p95_ms"], ".1f"),
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *body]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
