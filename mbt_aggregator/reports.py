"""Branch answers, and what every branch of a layer did for each session step.

A layer step's reports are built once per outcome pattern (the steps of a batch usually share
one), counted in the metrics here, and handed back with each step's output. The fan-out's node
calls, replays, audits and wire bytes are counted here too: the fan-out and the engine never
touch a metric themselves (the defense counts its own verdicts).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from mbt_aggregator.policy import Collected
from mbt_aggregator.registry import Node
from mbt_core.errors import QuorumNotReached
from mbt_core.model.aggregate import Aggregated

if TYPE_CHECKING:  # the metrics keep recent reports (mbt_aggregator.recent): no import cycle
    from mbt_aggregator.metrics import Metrics

OK, MASKED, REJECTED = "ok", "masked", "rejected"
Pattern = tuple[tuple[bool, ...], tuple[bool, ...]]  # per branch: accepted, rejected


class BranchReport(NamedTuple):  # records, built per branch per layer step: tuples
    branch: int
    outcome: str  # OK, MASKED or REJECTED
    node_id: str
    hedged: bool
    latency_s: float


class LayerReport(NamedTuple):
    layer: int
    branches: tuple[BranchReport, ...]
    latency_s: float
    lost_weight: float


StepResult = tuple[Tensor, LayerReport] | BaseException  # a step's output rows, or its failure


@dataclass
class Answer:
    """One branch's answer to a layer step, as the fan-out got it and the defense screens it."""

    outputs: Tensor  # every step of the batch, packed (N, C)
    node: Node
    seconds: float
    others: tuple[Answer, ...] = ()  # the other replicas asked with it (an audit or a vote)


def _per_step(mask: Tensor, rows: list[int], reduce: Callable[..., bool]) -> list[tuple[bool, ...]]:
    """Per session step, per branch: ``reduce`` (all/any) of ``mask`` (K, positions) over the
    step's positions. Decode steps are one position each: one conversion serves them all."""
    if all(n == 1 for n in rows):
        return [tuple(r) for r in mask.T.tolist()]
    out, offset = [], 0
    for n in rows:
        out.append(tuple(reduce(col) for col in mask[:, offset : offset + n].tolist()))
        offset += n
    return out


class Reports:
    """Builds a layer step's reports and counts them: masked and rejected branches, hedges,
    quorum failures, the step's latency, and the recent steps (width used, lost weight)."""

    def __init__(self, metrics: Metrics, min_branches: int, weights: Sequence[dict[int, float]]):
        self.metrics = metrics
        self._min_branches = min_branches
        for layer, alpha in enumerate(weights):  # every series from the start, at 0
            self.declare(layer, alpha)

    def declare(self, layer: int, weights: dict[int, float]) -> None:
        """The series of ``layer`` and its branches (with their ``weights``), at 0: at the
        start, and again as its width grows or its weights ramp."""
        self.metrics.declare_layer(layer, weights)

    def quorum_failed(self, layer: int, steps: int = 1) -> None:
        self.metrics.quorum_failures.labels(layer=str(layer)).inc(steps)

    def call(
        self,
        layer: int,
        branches: tuple[int, ...],
        node_id: str,
        outcome: str,
        seconds: float | None = None,
    ) -> None:
        """One node call for ``branches``: its outcome per branch (timed when it succeeded)."""
        for b in branches:
            self.metrics.branch_call(layer, b, node_id, outcome, seconds)

    def sent(self, payload_bytes: int, outputs: Mapping[int, Tensor], dtype: torch.dtype) -> None:
        """One Forward's bytes on the wire: its request, and its outputs as they travelled."""
        self.metrics.wire(payload_bytes, outputs, dtype)

    def replay(self, node_id: str) -> None:
        """A node that missed positions is sent them again."""
        self.metrics.replays.labels(node=node_id[:16]).inc()

    def audit(self, layer: int, branch: int) -> None:
        """Two replicas of a branch are compared (an audit, or a hedge's late primary)."""
        self.metrics.replica_audits.labels(layer=str(layer), branch=str(branch)).inc()

    def results(
        self,
        layer: int,
        got: Collected[int, Answer],
        fused: Aggregated,
        refused: Tensor | None,
        rows: list[int],
        elapsed: float,
        weights: dict[int, float],
    ) -> list[StepResult]:
        """Each step's output rows and report, or the quorum failure of its pattern
        (``weights``: the step's alpha, for the weight mass it lost)."""
        k = len(weights)
        for b in got.hedged:
            self.metrics.hedges.labels(layer=str(layer), branch=str(b)).inc()
        patterns: list[Pattern]
        if fused.complete:  # every branch answered and passed for every step
            patterns = [((True,) * k, (False,) * k)] * len(rows)
        else:
            rejected = fused.rejected if refused is None else fused.rejected | refused
            patterns = list(
                zip(
                    _per_step(fused.accepted, rows, all),
                    _per_step(rejected, rows, any),
                    strict=True,
                )
            )
        shared = Counter(patterns)
        made = {p: self._report(layer, got, p, elapsed, n, weights) for p, n in shared.items()}
        for pattern, report in made.items():
            if isinstance(report, LayerReport):
                self.metrics.recent.record(report, shared[pattern])
        self.metrics.layer_step(layer, elapsed, len(rows))
        results: list[StepResult] = []
        offset = 0
        for n, pattern in zip(rows, patterns, strict=True):
            report = made[pattern]
            if isinstance(report, LayerReport):
                results.append((fused.output[offset : offset + n], report))
            else:
                results.append(report)
            offset += n
        return results

    def _report(
        self,
        layer: int,
        got: Collected[int, Answer],
        pattern: Pattern,
        elapsed: float,
        steps: int,
        weights: dict[int, float],
    ) -> LayerReport | QuorumNotReached:
        """What every branch did for ``steps`` session steps that share one outcome pattern."""
        accepted, rejected = pattern
        usable = sum(accepted)
        if usable < self._min_branches:
            self.quorum_failed(layer, steps)
            return QuorumNotReached(
                f"layer {layer}: {usable} branches usable, the policy needs "
                f"{self._min_branches} (missing: {sorted(got.missing())})"
            )
        reports = []
        for b, (ok, refused) in enumerate(zip(accepted, rejected, strict=True)):
            answer = got.results.get(b)
            outcome = OK if ok else REJECTED if refused else MASKED
            if outcome != OK:
                labels = {"layer": str(layer), "branch": str(b), "reason": outcome}
                self.metrics.masked.labels(**labels).inc(steps)
            if answer is not None and outcome == REJECTED:
                for _ in range(steps):
                    self.metrics.branch_call(layer, b, answer.node.node_id, "rejected")
            reports.append(
                BranchReport(
                    branch=b,
                    outcome=outcome,
                    node_id=answer.node.node_id if answer else "",
                    hedged=b in got.hedged,
                    latency_s=answer.seconds if answer else got.elapsed_s,
                )
            )
        # lost: what was left out (exactly 0 when nothing was)
        lost = sum(weights[b] for b, ok in enumerate(accepted) if not ok)
        return LayerReport(layer, tuple(reports), elapsed, lost)
