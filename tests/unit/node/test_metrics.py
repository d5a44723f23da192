"""The node's metrics: one batch observed once, refusals by kind and code, the store's series."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from prometheus_client import generate_latest

from mbt_core.errors import CacheBehind, LimitExceeded, NotSessionOwner
from mbt_node.batcher import BranchBatcher
from mbt_node.config import BatchingConfig
from mbt_node.metrics import NodeMetrics, kind_name
from mbt_node.servicer import STATUS_OF, refusal_kind
from tests.unit.node.test_sessions import CFG, GATEWAY, KEY, _store, step


def _value(metrics: NodeMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_a_batch_of_concurrent_calls_is_observed_once() -> None:
    store, branch = _store()
    metrics = NodeMetrics(STATUS_OF)
    metrics.watch(store)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            observe = metrics.branch(KEY)
            batcher = BranchBatcher(
                KEY, branch, store, pool, BatchingConfig(max_wait_ms=20), observe
            )
            batcher.start()
            await asyncio.gather(
                *(
                    batcher.submit([step(f"s{i}", 0, 2)], torch.randn(2, CFG.d_model), GATEWAY)
                    for i in range(3)
                )
            )
            await batcher.stop()

    asyncio.run(main())
    labels = {"layer": "0", "branch": "0"}
    assert _value(metrics, "mbt_node_batch_steps_count", **labels) == 1
    assert _value(metrics, "mbt_node_batch_steps_sum", **labels) == 3
    assert _value(metrics, "mbt_node_batch_steps_bucket", le="2.0", **labels) == 0
    assert _value(metrics, "mbt_node_compute_seconds_count", **labels) == 1
    assert _value(metrics, "mbt_node_compute_seconds_sum", **labels) > 0
    assert _value(metrics, "mbt_node_sessions") == 3
    assert _value(metrics, "mbt_node_cached_tokens") == 6


def test_refusals_are_counted_by_kind_and_code_from_the_start() -> None:
    metrics = NodeMetrics(STATUS_OF)
    text = generate_latest(metrics.registry).decode()
    for kind, code in STATUS_OF.items():  # every kind has its series at 0 before any refusal
        series = f'mbt_node_refused_calls_total{{code="{code.name}",reason="{kind_name(kind)}"}}'
        assert f"{series} 0.0" in text
    for err in (LimitExceeded("full", limit="max_sessions"), CacheBehind("behind", 3)):
        metrics.refused(refusal_kind(err))
    metrics.refused(refusal_kind(CacheBehind("behind", 4)))
    assert kind_name(NotSessionOwner) == "not_session_owner"
    name = "mbt_node_refused_calls_total"
    assert _value(metrics, name, reason="cache_behind", code="FAILED_PRECONDITION") == 2
    assert _value(metrics, name, reason="limit_exceeded", code="RESOURCE_EXHAUSTED") == 1
    assert _value(metrics, name, reason="not_session_owner", code="PERMISSION_DENIED") == 0
