"""Per-branch defenses against broken or hostile branch nodes: bounds, replica votes, audits.

Branches compute different functions, so comparing one branch's output with the others' (a
cross-branch median, or ``aggregate``'s ``norm_factor``) does not show whether that branch is
right. The gateway judges each branch against itself instead:

* **Bounds.** Export signs each branch's calibrated output-norm bound into the manifest
  (:mod:`mbt_core.artifacts.calibration`). A row (one position of one session) holding
  NaN/Inf, or with a norm beyond ``reject_factor`` x the bound, is rejected: the branch is
  masked for that row and the weights renormalized. A row between the bound and that limit is
  clipped to the bound.
  Rows within the bound pass bit for bit, so a healthy step still equals the in-process one.
  Branches without a bound (older manifests) keep the finiteness check and ``aggregate``'s
  cross-branch norm check.
* **Replicas.** A branch served by several nodes is checked against its own replicas. With
  ``median`` and 3 or more live replicas, every step asks 3 and takes the coordinate-wise
  median, so one bad replica out of three cannot move it (this triples that branch's compute).
  With 2, a share of steps (``audit_rate``) goes to both, and the two outputs are compared.
  Two replicas that disagree cannot show which one is wrong: both are counted and the branch is
  masked for those rows. The bounds settle it where they can: a replica they reject is blamed
  alone. A hedged step answered by the second replica is such a pair for free once the late
  primary answers too: the two are compared, though the step has already used the hedge's.
  After any disagreement the branch is audited on every step for ``alert_steps`` steps: a
  lie is then masked instead of fused, and the disagreements pile up fast enough to tell the
  liar (below).
* **The odd one out.** A pair that disagrees cannot say which one lies, but a node that has
  disagreed with two or more different replicas (of any branches) within ``odd_window_s``,
  paired with one that disagreed with nobody else, is blamed alone: the honest nodes agree
  with each other, the liar with nobody.
* **Blame.** A replica rejected by its bound, or outvoted by the median, is reported to the
  registry, which quarantines a node that keeps offending.

A flipped sign, or a random direction with the right norm, passes any norm bound: only a
replica check sees those. :meth:`Defense.screen_layer` is the one entry a layer step uses; it
counts what it catches into the metrics and strikes the registry's nodes (see :meth:`bind`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from mbt_aggregator.metrics import OUTPUT_REJECTIONS, Metrics
from mbt_aggregator.registry import Node, QuarantinePolicy, Registry
from mbt_aggregator.reports import Answer
from mbt_core.artifacts.calibration import DEFAULT_REJECT_FACTOR, check_outputs
from mbt_core.artifacts.manifest import NormBound
from mbt_core.wire.contract import BranchKey

log = logging.getLogger("mbt_aggregator")

OFF, AUDIT, MEDIAN = "off", "audit", "median"
REPLICA_CHECKS = (OFF, AUDIT, MEDIAN)
NON_FINITE, NORM, OUTVOTED, ODD_ONE_OUT, DISAGREEMENT = OUTPUT_REJECTIONS
MEDIAN_REPLICAS = 3  # the fewest that outvote one bad replica; more would cost more calls
_TINY = 1e-12  # keeps relative distances finite for all-zero rows
_UNBOUNDED = torch.finfo(torch.float32).max  # a branch without a bound: only Inf/NaN norms fail


@dataclass(frozen=True)
class DefenseConfig:
    """How the gateway checks branch outputs before fusing them. Built once from the CLI."""

    bounds: bool = True  # enforce the manifest's per-branch output-norm bounds
    reject_factor: float = DEFAULT_REJECT_FACTOR  # reject beyond this x the bound, clip below
    replica_check: str = AUDIT  # off | audit | median
    audit_rate: float = 0.01  # share of a replicated branch's steps also sent to a 2nd replica
    audit_seed: int | None = None  # None: audits no node can predict; a number: reproducible
    # Replicas agree when their rows lie within this relative L2 distance: float32 replicas
    # match bit for bit, a bfloat16 node differs by ~4e-3; a sign flip differs by 2.
    replica_rtol: float = 1e-2
    replica_wait_ms: float = 100.0  # once one replica answered, how long to wait for the others
    alert_steps: int = 64  # after replicas disagreed: audit every one of that branch's next N
    odd_window_s: float = 60.0  # how long a disagreement counts towards telling the liar
    quarantine: QuarantinePolicy = field(default_factory=QuarantinePolicy)

    def __post_init__(self) -> None:
        if self.replica_check not in REPLICA_CHECKS:
            raise ValueError(
                f"replica check must be one of {REPLICA_CHECKS}, got {self.replica_check!r}"
            )
        if not (math.isfinite(self.reject_factor) and self.reject_factor >= 1):
            raise ValueError(f"reject_factor must be >= 1, got {self.reject_factor}")
        if not 0 <= self.audit_rate <= 1:
            raise ValueError(f"audit_rate must be in [0, 1], got {self.audit_rate}")
        if not (math.isfinite(self.replica_rtol) and self.replica_rtol > 0):
            raise ValueError(f"replica_rtol must be positive, got {self.replica_rtol}")
        if not (math.isfinite(self.replica_wait_ms) and self.replica_wait_ms >= 0):
            raise ValueError(f"replica_wait_ms must be >= 0, got {self.replica_wait_ms}")
        if self.alert_steps < 0:
            raise ValueError(f"alert_steps must be >= 0, got {self.alert_steps}")
        if not (math.isfinite(self.odd_window_s) and self.odd_window_s > 0):
            raise ValueError(f"odd_window_s must be positive, got {self.odd_window_s}")


@dataclass(frozen=True)
class Blame:
    """Rows of one replica's answer that were refused for a reason only that replica gave."""

    replica: int  # index into the answers screened
    reason: str  # NON_FINITE, NORM, OUTVOTED or ODD_ONE_OUT
    rows: int


@dataclass(frozen=True)
class Screened:
    """One branch's answer(s) after the checks: what to fuse and who to blame."""

    output: Tensor  # (N, C): the rows to fuse; zeros where refused
    refused: Tensor  # (N,) bool: no trustworthy row; the branch counts as rejected there
    clipped: int = 0  # rows scaled down to the bound
    blame: tuple[Blame, ...] = ()
    disagreed: tuple[int, ...] = ()  # replicas of a pair that differed (both suspect)
    disagreement_rows: int = 0  # rows refused because a pair differed

    @property
    def clean(self) -> bool:
        """Nothing to count: the answer passed as it came."""
        return not (self.clipped or self.blame or self.disagreed)


@dataclass(frozen=True)
class _Checked:
    """One replica's rows after its own checks (bound, finiteness)."""

    rows: Tensor  # (N, C): clipped where above the bound, zeros where rejected
    rejected: Tensor  # (N,) bool
    reasons: dict[str, int]  # rejected rows by reason
    clipped: int


class Defense:
    """The checks of one gateway: its config, the manifest's bounds and the audit dice."""

    _metrics: Metrics  # set by bind(): where what the checks catch is counted
    _registry: Registry

    def __init__(
        self,
        config: DefenseConfig | None = None,
        bounds: Mapping[BranchKey, NormBound] | None = None,
    ) -> None:
        self.config = config or DefenseConfig()
        self.bounds = {k: b.bound for k, b in (bounds or {}).items()} if self.config.bounds else {}
        self._dice = random.Random(self.config.audit_seed)
        self._limits: dict[int, Tensor] = {}  # per layer, (K, 1): each branch's bound
        self._alerts: dict[BranchKey, int] = {}  # branch -> steps left to audit, all of them
        self._disagreed: dict[str, dict[str, float]] = {}  # node -> other node -> when
        self._clock = time.monotonic

    def add_bounds(self, bounds: Mapping[BranchKey, NormBound]) -> None:
        """Bounds of branches that joined (an expansion's manifest signs them)."""
        if self.config.bounds:
            self.bounds.update({k: b.bound for k, b in bounds.items()})
            self._limits.clear()

    @classmethod
    def off(cls) -> Defense:
        """No bounds, no replica checks: only the finiteness check (always on)."""
        return cls(DefenseConfig(bounds=False, replica_check=OFF))

    def bind(self, metrics: Metrics, registry: Registry) -> None:
        """Where what the checks catch is counted, and whose nodes they strike."""
        self._metrics, self._registry = metrics, registry

    @property
    def checks_replicas(self) -> bool:
        return self.config.replica_check != OFF

    def screen_layer(
        self, layer: int, k: int, results: Mapping[int, Answer], n: int, like: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """A layer step's answers, screened: every branch's outputs (K, N, C), which rows are
        present, and which of those the checks refused; ``None, None`` when every branch
        answered and passed (the healthy step, which then builds no masks). The step has ``n``
        rows, with the width and dtype of ``like``.

        The one screening the fan-out asks for: what the checks catch is counted and blamed
        here, and a branch whose replicas disagreed is put on alert. A hedge audited by its
        late primary comes here too, as a lone pair (its result then only counts)."""
        single = [b for b, answer in results.items() if not answer.others]
        if len(single) == k:  # one answer from every branch (no audit, no vote)
            outputs = torch.stack([results[b].outputs for b in range(k)])
            single = list(range(k))
        else:
            outputs = like.new_zeros((k, n, like.shape[-1]))
            for b in single:
                outputs[b] = results[b].outputs
        # One check for all single answers; only what fails it (or a vote) is screened alone.
        passed = dict(zip(single, self.passing(layer, single, outputs), strict=True))
        if len(single) == k and all(passed.values()):
            return outputs, None, None
        present = torch.zeros(k, outputs.shape[1], dtype=torch.bool)  # (K, N)
        refused = torch.zeros_like(present)  # present, failed the checks
        for b, answer in results.items():
            if passed.get(b, False):
                present[b] = True
                continue
            screened = self._screen_answer(layer, b, answer)
            outputs[b] = screened.output
            present[b] = ~screened.refused
            refused[b] = screened.refused
        return outputs, present, refused

    def _screen_answer(self, layer: int, branch: int, answer: Answer) -> Screened:
        """The checks on one branch's answer(s); counts and blames what they caught (a pair's
        disagreement, once it tells the liar, too), and puts a branch whose replicas disagreed
        on alert."""
        answers = [answer, *answer.others]
        screened = self.screen((layer, branch), [a.outputs for a in answers])
        if screened.disagreed:
            screened = self.odd_one_out(screened, [a.node.node_id for a in answers])
        if not screened.clean:
            nodes = [a.node for a in answers]
            quarantine = self.config.quarantine
            account(screened, nodes, layer, branch, self._metrics, self._registry, quarantine)
            if screened.disagreed:
                self.alert((layer, branch))
        return screened

    def replicas_to_ask(self, live: int, key: BranchKey | None = None) -> int:
        """How many of a branch's ``live`` replicas one layer step asks (1, 2: audit, 3: vote);
        every step of a branch on alert is audited."""
        check = self.config.replica_check
        if check == MEDIAN and live >= MEDIAN_REPLICAS:
            return MEDIAN_REPLICAS
        if check == OFF or live < 2:
            return 1
        left = self._alerts.get(key, 0) if key is not None else 0
        if left:
            self._alerts[key] = left - 1  # type: ignore[index]
            return 2
        return 2 if self._dice.random() < self.config.audit_rate else 1

    def alert(self, key: BranchKey) -> None:
        """Two replicas of ``key`` disagreed: audit its next ``alert_steps`` steps."""
        if self.config.replica_check != OFF and self.config.alert_steps:
            self._alerts[key] = self.config.alert_steps

    def odd_one_out(self, screened: Screened, node_ids: Sequence[str]) -> Screened:
        """Note who disagreed with whom (``node_ids``: the screened answers' nodes); blame a
        node of the pair that has disagreed with others too, while its partner has not."""
        if len(screened.disagreed) != 2:
            return screened
        a, b = (node_ids[i] for i in screened.disagreed)
        if a == b:
            return screened
        now = self._clock()
        for x, y in ((a, b), (b, a)):
            self._disagreed.setdefault(x, {})[y] = now
        partners = {x: self._recent(x, now) for x in (a, b)}
        for index, x, y in ((screened.disagreed[0], a, b), (screened.disagreed[1], b, a)):
            if len(partners[x]) >= 2 and partners[y] == {x}:
                blame = Blame(index, ODD_ONE_OUT, screened.disagreement_rows)
                return replace(screened, blame=(*screened.blame, blame))
        return screened

    def _recent(self, node_id: str, now: float) -> set[str]:
        seen = self._disagreed.get(node_id, {})
        for other in [o for o, t in seen.items() if now - t > self.config.odd_window_s]:
            del seen[other]
        return set(seen)

    def norm_factor(self, layer: int, branches: int, fallback: float | None) -> float | None:
        """``aggregate``'s cross-branch norm check: only for a layer with an unbounded branch."""
        if all((layer, b) in self.bounds for b in range(branches)):
            return None
        return fallback

    def passing(self, layer: int, branches: Sequence[int], outputs: Tensor) -> list[bool]:
        """One check over a layer's single answers, ``outputs`` (K, N, C): which of
        ``branches`` pass as they came (every row finite and within its bound), so that
        :meth:`screen` needs to look at the others only. A row whose norm is not finite fails
        here even for an unbounded branch; ``screen`` then tells NaN/Inf from mere size."""
        if not branches:
            return []
        limits = self._limits.get(layer)
        if limits is None or limits.shape[0] != outputs.shape[0]:  # width changed
            limits = self._limits[layer] = torch.tensor(
                [[self.bounds.get((layer, b), _UNBOUNDED)] for b in range(outputs.shape[0])]
            )  # (K, 1)
        if outputs.dtype != torch.float32:
            outputs = outputs.float()
        if list(branches) == list(range(outputs.shape[0])):  # all, in order: nothing to pick
            norms = torch.linalg.vector_norm(outputs, dim=-1)  # (K, N)
            return (norms <= limits).all(1).tolist()
        index = torch.tensor(branches)
        norms = torch.linalg.vector_norm(outputs[index], dim=-1)  # (B, N)
        return (norms <= limits[index]).all(1).tolist()

    def screen(self, key: BranchKey, answers: Sequence[Tensor]) -> Screened:
        """Check one branch's answers, (N, C) each: the primary replica's first, then any
        others asked with it (an audit or a vote)."""
        bound = self.bounds.get(key)
        checked = [self._check(x, bound) for x in answers]
        blame = tuple(
            Blame(i, reason, rows)
            for i, c in enumerate(checked)
            for reason, rows in c.reasons.items()
            if rows
        )
        clipped = sum(c.clipped for c in checked)
        if len(checked) == 1:
            return Screened(checked[0].rows, checked[0].rejected, clipped, blame)
        return self._vote(checked, blame, clipped)

    def _check(self, x: Tensor, bound: float | None) -> _Checked:
        if bound is None:
            rejected = ~torch.isfinite(x).all(-1)
            y = x
        else:
            y, rejected = check_outputs(x, bound, self.config.reject_factor)
        if y is x and not bool(rejected.any()):
            return _Checked(x, rejected, {}, 0)  # the healthy path: nothing changed
        non_finite = ~torch.isfinite(x).all(-1)
        reasons = {NON_FINITE: int(non_finite.sum()), NORM: int((rejected & ~non_finite).sum())}
        clipped = int(((y != x).any(-1) & ~rejected).sum()) if y is not x else 0
        rows = torch.where(rejected[:, None], torch.zeros((), dtype=x.dtype), y)
        return _Checked(rows, rejected, reasons, clipped)

    def _vote(self, checked: list[_Checked], blame: tuple[Blame, ...], clipped: int) -> Screened:
        """Several replicas' rows: the median of 3 or more valid ones; the first of two that
        agree; the only valid one; nothing where two disagree or none is valid."""
        z = torch.stack([c.rows for c in checked])  # (R, N, C)
        valid = ~torch.stack([c.rejected for c in checked])  # (R, N)
        count = valid.sum(0)  # (N,)
        rows = torch.arange(z.shape[1])
        first = z[valid.int().argmax(0), rows]  # (N, C): the first valid replica's row
        nan = torch.full((), float("nan"), dtype=z.dtype)
        median = torch.where(valid[..., None], z, nan).nanmedian(0).values  # (N, C)
        voted = count >= MEDIAN_REPLICAS
        reference = torch.where(voted[:, None], median, first)
        far = valid & (_relative_distance(z, reference) > self.config.replica_rtol)  # (R, N)
        outvoted = far & voted
        split = (count == 2) & far.any(0)  # two valid replicas that disagree
        refused = (count == 0) | split
        output = torch.where(refused[:, None], torch.zeros((), dtype=z.dtype), reference)
        blame += tuple(Blame(i, OUTVOTED, n) for i, n in enumerate(outvoted.sum(1).tolist()) if n)
        disagreed = tuple(i for i, hit in enumerate((valid & split).any(1).tolist()) if hit)
        return Screened(output, refused, clipped, blame, disagreed, int(split.sum()))


def account(
    screened: Screened,
    nodes: Sequence[Node],
    layer: int,
    branch: int,
    metrics: Metrics,
    registry: Registry,
    quarantine: QuarantinePolicy,
) -> None:
    """Count what the checks caught on one branch's answers from ``nodes`` (in the order
    screened), strike the replicas to blame, and announce a quarantine."""
    labels = {"layer": str(layer), "branch": str(branch)}
    if screened.clipped:
        metrics.clipped_outputs.labels(**labels).inc(screened.clipped)
    for blame in screened.blame:
        metrics.rejected_outputs.labels(**labels, reason=blame.reason).inc(blame.rows)
    for node in {nodes[b.replica].node_id: nodes[b.replica] for b in screened.blame}.values():
        period = registry.strike(node.node_id, quarantine)
        if period is not None:
            metrics.quarantines.inc()
            reasons = sorted({b.reason for b in screened.blame if nodes[b.replica] is node})
            log.warning(
                "quarantined node %s (%s) for %.0f s: its outputs of layer %d branch %d keep "
                "being rejected (%s); it returns on probation",
                node.node_id[:16],
                node.address,
                period,
                layer,
                branch,
                ", ".join(reasons),
            )
    if screened.disagreed:
        metrics.rejected_outputs.labels(**labels, reason=DISAGREEMENT).inc(
            screened.disagreement_rows
        )
        suspects = [nodes[i] for i in screened.disagreed]
        for node in suspects:
            metrics.replica_disagreements.labels(node=node.node_id[:16]).inc()
        log.warning(
            "replicas %s of layer %d branch %d disagree on %d rows: neither is used there",
            " and ".join(n.node_id[:16] for n in suspects),
            layer,
            branch,
            screened.disagreement_rows,
        )


def _relative_distance(z: Tensor, reference: Tensor) -> Tensor:
    """||z_r - reference|| / ||reference|| per replica and row: (R, N)."""
    diff = torch.linalg.vector_norm((z - reference).float(), dim=-1)
    scale = torch.linalg.vector_norm(reference.float(), dim=-1).clamp(min=_TINY)
    return diff / scale
