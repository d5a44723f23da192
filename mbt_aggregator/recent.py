"""The recent layer steps: the width actually used, the weight lost, each branch's outcomes.

:class:`~mbt_aggregator.reports.Reports` hands every layer step's reports here, one record per
outcome pattern with the number of session steps that share it (a batch usually has one).
The alpha of a step's answering branches, renormalized, is the weight vector that step really
fused; the width diagnostics (:func:`mbt_core.training.diagnostics.weight_stats`) of those
vectors, averaged over the last ``window_steps`` session steps of the layer (whole records: at
times a few more), are what ``mbt_width_diagnostic`` exports: the trunk's alpha while every
branch answers, fewer paths as soon as branches go missing. Lost weight (the alpha mass
renormalized away) is counted per session step since the start, as a counter and a histogram.
Steps that failed for lack of branches fuse nothing: they are counted as quorum failures, not
here.

Recording is a deque append under a lock on the event loop; the statistics are computed at
scrape time (the exporter's thread), once per distinct outcome pattern.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mbt_aggregator.reports import MASKED, OK, REJECTED, LayerReport
from mbt_core.training.diagnostics import weight_stats

WINDOW_STEPS = 1024  # session steps per layer that the width and the outcomes describe
LOST_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # le="0": steps that lost nothing
OUTCOMES = (OK, MASKED, REJECTED)
Pattern = tuple[str, ...]  # each branch's outcome in one step


@dataclass(frozen=True)
class BranchOutcomes:
    """What one branch did over the window: session steps per outcome, and the last one."""

    counts: Mapping[str, int]
    last: str


@dataclass
class _Layer:
    weights: tuple[float, ...]
    window: deque[tuple[Pattern, int]] = field(default_factory=deque)
    held: int = 0  # session steps in the window
    buckets: list[int] = field(default_factory=lambda: [0] * len(LOST_BUCKETS))
    steps: int = 0  # session steps since the start
    lost: float = 0.0  # their lost weight, summed
    stats: dict[Pattern, dict[str, float]] = field(default_factory=dict)  # per pattern, cached

    def width(self, pattern: Pattern) -> dict[str, float]:
        """The diagnostics of the weights a step with ``pattern`` fused."""
        found = self.stats.get(pattern)
        if found is None:
            # A step of fewer branches than the layer has now ran before they joined.
            weights = self.weights[: len(pattern)]
            used = torch.tensor(
                [w if o == OK else 0.0 for w, o in zip(weights, pattern, strict=True)]
            )
            found = self.stats[pattern] = weight_stats(used / used.sum())
        return found


class RecentSteps(Collector):
    def __init__(self, window_steps: int = WINDOW_STEPS) -> None:
        self.window_steps = window_steps
        self._layers: dict[int, _Layer] = {}
        self._lock = threading.Lock()

    def declare(self, layer: int, weights: Mapping[int, float]) -> None:
        """A layer and its alpha per branch: its lost-weight series exist from now on (at 0,
        so that the first loss raises ``rate()``); its width appears with its first step.
        Declared again (width grows, or its weights ramp), the layer's weights are replaced."""
        with self._lock:
            found = self._layers.get(layer)
            if found is None:
                self._layers[layer] = _Layer(tuple(weights.values()))
            else:
                found.weights = tuple(weights.values())
                found.stats.clear()

    def record(self, report: LayerReport, steps: int) -> None:
        """``steps`` session steps of one layer step that share ``report`` (of a declared
        layer)."""
        pattern = tuple(b.outcome for b in report.branches)
        lost = min(1.0, max(0.0, report.lost_weight))
        with self._lock:
            layer = self._layers[report.layer]
            layer.window.append((pattern, steps))
            layer.held += steps
            while layer.held - layer.window[0][1] >= self.window_steps:
                layer.held -= layer.window.popleft()[1]
            layer.buckets[bisect.bisect_left(LOST_BUCKETS, lost)] += steps
            layer.steps += steps
            layer.lost += lost * steps

    def outcomes(self) -> dict[tuple[int, int], BranchOutcomes]:
        """Per (layer, branch): its outcomes over the window (branches of layers that have
        run no step yet are absent)."""
        found = {}
        with self._lock:
            for i, layer in self._layers.items():
                if not layer.window:
                    continue
                last = layer.window[-1][0]
                for b in range(len(last)):  # branches not called lately have no outcomes
                    counts = dict.fromkeys(OUTCOMES, 0)
                    for pattern, n in layer.window:
                        if b < len(pattern):
                            counts[pattern[b]] += n
                    found[(i, b)] = BranchOutcomes(counts, last[b])
        return found

    def collect(self) -> Iterator[Metric]:
        width = GaugeMetricFamily(
            "mbt_width_diagnostic",
            f"Width diagnostics of the weights each layer step actually fused (alpha of the "
            f"answering branches, renormalized), averaged over the last {self.window_steps} "
            f"session steps",
            labels=["layer", "name"],
        )
        lost_total = CounterMetricFamily(
            "mbt_lost_weight",
            "Aggregation weight renormalized away, summed over session steps",
            labels=["layer"],
        )
        lost = HistogramMetricFamily(
            "mbt_lost_weight_ratio",
            "Aggregation weight renormalized away in one session step (le=0: nothing lost)",
            labels=["layer"],
        )
        with self._lock:  # the cached statistics are filled here, under the same lock
            for i, layer in sorted(self._layers.items()):
                label = str(i)
                mean: dict[str, float] = {}
                for pattern, n in layer.window:
                    for name, value in layer.width(pattern).items():
                        mean[name] = mean.get(name, 0.0) + value * n / layer.held
                for name, value in mean.items():
                    width.add_metric([label, name], value)
                lost_total.add_metric([label], layer.lost)
                cumulative, running = [], 0
                for bound, count in zip(LOST_BUCKETS, layer.buckets, strict=True):
                    running += count
                    cumulative.append((str(bound), running))
                lost.add_metric([label], [*cumulative, ("+Inf", layer.steps)], layer.lost)
        yield width
        yield lost_total
        yield lost
