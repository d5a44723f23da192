"""From raw records to the figures of one run, the terminal table and the JSON file.

Definitions (also in ``mbt-bench outage --help``):

* token latency: time between consecutive tokens of a request as the client sees them (the
  first token: since the request was sent); p50/p95/p99 over every token of the run;
* tokens/s: tokens received over the run's wall time (all clients together);
* tokens lost: tokens asked for by requests that failed and never came;
* KL: mean over the scored text's positions of KL(healthy || run) of the next-token
  distribution, the healthy model being the in-process baseline;
* branches lost: branch steps masked or rejected over the tokens generated while the text was
  scored (they shared its fan-outs);
* time to mask: fault -> first token that no longer used the faulty node (its branches
  masked, rejected, or answered by another replica); time to recover: recovery action
  (restart begun, SIGCONT, link up) -> first token that used the node again. Means over a
  scenario's fault episodes; "-" where it never happened in the run.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mbt_aggregator.outage.faults import Episode, Marker
from mbt_aggregator.outage.workload import RunRecord, TokenRecord


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over rows of KL(P || Q), both given as log-probabilities of shape (N, V).

    Never below 0: float32 rounding of two equal distributions may give -1e-9."""
    if reference.shape != other.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(
            f"need two (N, V) arrays of one shape, got {reference.shape} and {other.shape}"
        )
    p_log = reference.astype(np.float64)
    q_log = other.astype(np.float64)
    p = np.exp(p_log)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, p * (p_log - q_log), 0.0)  # 0 log 0 = 0
    return max(0.0, float(terms.sum(axis=1).mean()))


def time_to_mask(tokens: Iterable[TokenRecord], ids: set[str], after_s: float) -> float | None:
    """Seconds from ``after_s`` to the first token that used none of ``ids``."""
    for tok in tokens:
        if tok.t_s > after_s and not (tok.nodes & ids):
            return tok.t_s - after_s
    return None


def time_to_recover(tokens: Iterable[TokenRecord], ids: set[str], after_s: float) -> float | None:
    """Seconds from ``after_s`` to the first token that used one of ``ids`` again."""
    for tok in tokens:
        if tok.t_s > after_s and tok.nodes & ids:
            return tok.t_s - after_s
    return None


def lost_fraction(
    tokens: Sequence[TokenRecord], start_s: float, end_s: float, fallback: float | None
) -> float | None:
    """Branch steps masked or rejected over the tokens that arrived while the text was scored
    (they shared its fan-outs); ``fallback`` when none did. Score itself counts only masks."""
    during = [t for t in tokens if start_s <= t.t_s <= end_s]
    total = sum(t.branches for t in during)
    return sum(t.lost for t in during) / total if total else fallback


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class RunResult:
    scenario: str
    policy: str
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    tokens_per_s: float
    tokens: int
    requests_sent: int
    requests_completed: int
    tokens_lost: int
    perplexity: float | None
    kl: float | None
    lost_fraction: float | None  # of branch steps, masked or rejected, while scoring
    masked_fraction: float | None  # of the scoring's own branch steps (Score: masked only)
    time_to_mask_s: float | None
    time_to_recover_s: float | None
    greedy_match: float | None  # completed requests whose tokens equal the baseline's
    lost_weight: float  # mean over tokens of the weight renormalized away
    wall_s: float
    score_error: str = ""
    errors: dict[str, int] = field(default_factory=dict)  # failed requests, by message
    episodes: list[dict[str, Any]] = field(default_factory=list)
    markers: list[dict[str, Any]] = field(default_factory=list)
    series: list[tuple[float, float, float]] = field(default_factory=list)  # t, ms, lost
    ramp: list[dict[str, Any]] = field(default_factory=list)  # an expansion's Status samples


def summarize(
    scenario: str,
    policy: str,
    record: RunRecord,
    episodes: Sequence[Episode],
    markers: Sequence[Marker],
    ids: Sequence[set[str]],
    reference: np.ndarray,
    expected: Sequence[Sequence[int]],
    max_new_tokens: int,
    branch_steps: int,
) -> RunResult:
    """One run's figures; ``expected`` are the baseline's greedy tokens per prompt and
    ``branch_steps`` the branch steps one scoring of the text takes when healthy."""
    tokens = sorted(record.tokens, key=lambda t: t.t_s)
    lat_ms = [t.latency_s * 1e3 for t in tokens]
    done = [r for r in record.requests if r.ok]
    score = record.score
    kl = ppl = masked = lost = None
    if score is not None and score.logprobs is not None:
        ppl = score.perplexity
        kl = kl_divergence(reference, score.logprobs)
        masked = score.masked_branch_steps / branch_steps if branch_steps else None
        lost = lost_fraction(tokens, score.sent_s, score.done_s, masked)
    eps = []
    for ep in episodes:
        mask = time_to_mask(tokens, ids[ep.node], ep.injected_s)
        recover = None
        if ep.recovered_s is not None:
            recover = time_to_recover(tokens, ids[ep.node], ep.recovered_s)
        eps.append({**asdict(ep), "time_to_mask_s": mask, "time_to_recover_s": recover})
    return RunResult(
        scenario=scenario,
        policy=policy,
        latency_p50_ms=percentile(lat_ms, 50),
        latency_p95_ms=percentile(lat_ms, 95),
        latency_p99_ms=percentile(lat_ms, 99),
        tokens_per_s=len(tokens) / record.wall_s if record.wall_s > 0 else 0.0,
        tokens=len(tokens),
        requests_sent=len(record.requests),
        requests_completed=len(done),
        tokens_lost=sum(max_new_tokens - len(r.tokens) for r in record.requests if not r.ok),
        perplexity=ppl,
        kl=kl,
        lost_fraction=lost,
        masked_fraction=masked,
        time_to_mask_s=_mean(e["time_to_mask_s"] for e in eps),
        time_to_recover_s=_mean(e["time_to_recover_s"] for e in eps),
        greedy_match=(
            sum(tuple(r.tokens) == tuple(expected[r.prompt]) for r in done) / len(done)
            if done
            else None
        ),
        lost_weight=sum(t.lost_weight for t in tokens) / len(tokens) if tokens else 0.0,
        wall_s=record.wall_s,
        score_error=score.error if score is not None else "not scored",
        errors=dict(Counter(r.error for r in record.requests if not r.ok)),
        episodes=eps,
        markers=[asdict(m) for m in markers],
        series=[(t.t_s, t.latency_s * 1e3, t.lost_weight) for t in tokens],
        ramp=list(record.ramp),
    )


# -- output ------------------------------------------------------------------------------------

_COLUMNS = (
    ("scenario", 13, "s"),
    ("policy", 14, "s"),
    ("p50 ms", 7, ".1f"),
    ("p95 ms", 7, ".1f"),
    ("p99 ms", 7, ".1f"),
    ("tok/s", 6, ".1f"),
    ("req ok/sent", 11, "s"),
    ("lost", 5, "d"),
    ("ppl", 7, ".2f"),
    ("KL", 7, ".4f"),
    ("br lost", 7, ".0%"),
    ("mask s", 6, ".2f"),
    ("recov s", 7, ".2f"),
    ("match", 5, ".0%"),
)


def _cell(value: Any, width: int, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    else:
        text = format(value, fmt)
    return text.ljust(width) if fmt == "s" else text.rjust(width)


def table(rows: Sequence[Sequence[Any]]) -> str:
    head = "  ".join(_cell(name, w, "s") for name, w, _ in _COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append("  ".join(_cell(v, w, f) for v, (_, w, f) in zip(row, _COLUMNS, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def table_row(r: RunResult) -> list[Any]:
    return [
        r.scenario,
        r.policy,
        r.latency_p50_ms,
        r.latency_p95_ms,
        r.latency_p99_ms,
        r.tokens_per_s,
        f"{r.requests_completed}/{r.requests_sent}",
        r.tokens_lost,
        r.perplexity,
        r.kl,
        r.lost_fraction,
        r.time_to_mask_s,
        r.time_to_recover_s,
        r.greedy_match,
    ]


def baseline_row(p50: float, p95: float, p99: float, tps: float, ppl: float) -> list[Any]:
    return ["baseline", "in-process", p50, p95, p99, tps, "-", None, ppl, 0.0, 0.0, None, None, 1.0]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Strict JSON: NaN and infinities become null."""
    text = json.dumps(_clean(payload), indent=1, default=_jsonable, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
