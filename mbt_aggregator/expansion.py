"""Live expansion: a gateway serving version N takes a compatible N+1 that adds branches,
without a restart, and ramps them in while watching what they change.

A manifest N+1 is a *compatible expansion* of the N being served when it says so (its
``expansion`` entry, signed with it), keeps the model id, every setting but the branch counts,
every old branch's artifact hash and the trunk's tensors (all but the alpha logits), and only
adds branches at the end of layers. Then (:class:`Expander`, on SIGHUP or when the artifacts
folder changes):

- the gateway admits nodes of N+1, and keeps the nodes of N: their branches' hashes are the
  same in N+1 (:class:`~mbt_aggregator.admission.Expectation` ``earlier``); nobody restarts;
- once every new branch has a live replica, beta ramps from the schedule's start to its
  target over its seconds, the layers fusing with ``(1 - beta) alpha_N + beta alpha_N1``
  (:mod:`mbt_aggregator.mix`; beta = 0 is N bit for bit);
- every ``probe_interval_s`` a probe text runs through the swarm at the current beta, and its
  next-token distributions are compared with those of beta = 0 (the same swarm, the same
  text): the drift is their KL divergence, in nats per token, next to the probe's perplexity;
- a drift or a probe perplexity beyond its limit freezes beta or rolls back to N (the new
  branches are no longer called, the nodes of N+1 leave at their next health check). That is
  logged, counted and shown in ``Status``.

Anything else (an old branch's hash changed, an unsigned or expired manifest, a rollback) is
refused and N keeps serving: a new model that is not an expansion is an ordinary upgrade,
a gateway restart on the new artifacts.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry, Counter, Gauge
from torch import Tensor

from mbt_aggregator.admission import Expectation
from mbt_aggregator.engine import Engine
from mbt_aggregator.membership import Membership
from mbt_aggregator.mix import Mix
from mbt_aggregator.reports import OK, LayerReport
from mbt_core.artifacts.layout import split_state
from mbt_core.artifacts.load import load_trunk, load_verified_manifest, trunk_model
from mbt_core.artifacts.manifest import Manifest, manifest_digest
from mbt_core.artifacts.rollback import default_state_file, record_accepted
from mbt_core.errors import MbtError
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.root import Trust

log = logging.getLogger("mbt_aggregator")

ACTIONS = ("rollback", "freeze")
EVENTS = ("accepted", "refused", "ramp_started", "completed", "frozen", "rolled_back")
# What a Status shows of the last expansion: none yet, refused, waiting for replicas of the
# new branches, ramping, complete, frozen by a limit, rolled back by one.
STATES = ("none", "refused", "waiting", "ramping", "complete", "frozen", "rolled_back")
PROBE_CHARS = 1200  # of the built-in probe text: a passage of a play the shipped model never saw


@dataclass(frozen=True)
class ExpansionConfig:
    """When a gateway looks for an expansion, and the limits its ramp must stay within."""

    watch_s: float = 5.0  # how often the artifacts folder is checked for a change; 0: SIGHUP only
    max_kl: float = 0.5  # nats per token between the probe at beta and at beta = 0
    max_ppl_increase: float = 0.25  # the probe's perplexity may grow by this fraction
    on_limit: str = "rollback"  # or "freeze": stop the ramp where it is
    probe_interval_s: float = 2.0
    tick_s: float = 0.25  # how often beta moves along the schedule
    probe_text: str | None = None  # None: the built-in passage

    def __post_init__(self) -> None:
        if self.on_limit not in ACTIONS:
            raise ValueError(f"--expand-on-limit must be one of {', '.join(ACTIONS)}")
        if self.watch_s < 0 or self.probe_interval_s <= 0 or self.tick_s <= 0:
            raise ValueError("--watch-artifacts must be >= 0 and the probe interval > 0")
        if not (self.max_kl > 0 and self.max_ppl_increase > 0):
            raise ValueError("--expand-max-kl and --expand-max-ppl-increase must be > 0")


@dataclass(frozen=True)
class ExpansionState:
    """The last expansion as ``Status`` shows it."""

    state: str = "none"
    from_version: int = 0
    to_version: int = 0
    beta: float = 0.0
    target: float = 0.0
    drift_kl: float | None = None
    probe_perplexity: float | None = None
    base_perplexity: float | None = None
    reason: str = ""  # why it was refused, frozen or rolled back
    new_branches: tuple[tuple[int, int], ...] = ()


def builtin_probe() -> str:
    text = (resources.files("mbt_core") / "assets" / "shakespeare" / "tempest_gut.txt").read_text(
        "utf-8"
    )
    start = len(text) // 2
    return text[start : start + PROBE_CHARS]


def expansion_problem(current: Manifest, new: Manifest) -> str | None:
    """Why ``new`` is not a compatible expansion of ``current`` (None when it is)."""
    grown = new.expansion
    if new.model_id != current.model_id:
        return f"it is model {new.model_id}, this gateway serves {current.model_id}"
    if new.model_version <= current.model_version:
        return f"its version {new.model_version} is not above {current.model_version}"
    if grown is None:
        return "its manifest has no expansion entry"
    old, cfg = current.config, new.config
    if grown.base_branches != old.branches:
        return (
            f"it expands branches {list(grown.base_branches)}, "
            f"this gateway serves {list(old.branches)}"
        )
    keep = ("branches", "split")
    if {k: v for k, v in cfg.to_dict().items() if k not in keep} != {
        k: v for k, v in old.to_dict().items() if k not in keep
    }:
        return "its model settings differ beyond the branch counts"
    if (cfg.split or cfg.branches) != (old.split or old.branches):
        return "its branches are cut to another width"
    if cfg.branches == old.branches or any(
        n < o for n, o in zip(cfg.branches, old.branches, strict=True)
    ):
        return "it adds no branch (or removes one)"
    for entry in current.artifacts:
        if entry.role != "branch" or entry.layer is None or entry.branch is None:
            continue
        ours = new.branch(entry.layer, entry.branch)
        if ours.sha256 != entry.sha256:
            return f"layer {entry.layer} branch {entry.branch} changed (artifact hash)"
    return None


def trunk_problem(current: MBTLanguageModel, new: MBTLanguageModel) -> str | None:
    """Why ``new``'s trunk is not ``current``'s apart from the alpha logits (None: it is)."""
    ours, theirs = split_state(current)[0], split_state(new)[0]  # a trunk has no branches
    if set(ours) != set(theirs):
        return "its trunk holds other tensors"
    for name, tensor in ours.items():
        if name.endswith("alpha_logits"):
            continue
        if theirs[name].shape != tensor.shape or not torch.equal(theirs[name], tensor):
            return f"its trunk's {name} changed"
    return None


@dataclass(frozen=True)
class ProbeResult:
    log_probs: Tensor  # (T, V)
    perplexity: float
    complete: bool  # every branch called answered and was used at every layer


@dataclass
class _Metrics:
    beta: Gauge
    drift: Gauge
    perplexity: Gauge
    events: Counter

    @classmethod
    def on(cls, registry: CollectorRegistry) -> _Metrics:
        events = Counter(
            "mbt_expansion_events",
            "Live expansions by what happened: accepted, refused, ramp_started, completed, "
            "frozen, rolled_back",
            ["event"],
            registry=registry,
        )
        for event in EVENTS:  # every series from the start: the first one raises increase()
            events.labels(event=event)
        return cls(
            Gauge(
                "mbt_expansion_beta",
                "Injection rate of the new branches of the last live expansion (0: none)",
                registry=registry,
            ),
            Gauge(
                "mbt_expansion_drift_kl",
                "KL divergence, nats per token, of the probe text's next-token distributions "
                "at the current beta from those at beta 0",
                registry=registry,
            ),
            Gauge(
                "mbt_expansion_probe_perplexity",
                "Perplexity of the probe text at the current beta",
                registry=registry,
            ),
            events,
        )


@dataclass
class Serving:
    """What a gateway serves, which an accepted expansion changes (and a rollback restores)."""

    manifest: Manifest
    expectation: Expectation
    on_change: Callable[[Manifest], None] = field(default=lambda _m: None)


class Expander:
    """Watches the artifacts for a compatible expansion, ramps it in, guards the ramp."""

    def __init__(
        self,
        config: ExpansionConfig,
        artifacts: Path,
        trust: Trust,
        threshold: int,
        state_file: Path | None,
        serving: Serving,
        engine: Engine,
        membership: Membership,
        tokenizer: Tokenizer,
        metrics: CollectorRegistry,
    ) -> None:
        self.config = config
        self._artifacts, self._trust, self._threshold = artifacts, trust, threshold
        self._state_file = state_file
        self.serving = serving
        self.engine, self.membership = engine, membership
        ids = tokenizer.encode(config.probe_text or builtin_probe())
        self._probe_ids = ids[: engine.trunk.cfg.context_length + 1]
        if len(self._probe_ids) < 2:
            raise ValueError("the probe text must be at least two tokens long")
        self.metrics = _Metrics.on(metrics)
        self.state = ExpansionState()
        self._wake = asyncio.Event()
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._refused: set[str] = set()  # digests refused or rolled back: not tried again
        self._ramp: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- finding an expansion ----------------------------------------------------------------

    def start(self) -> None:
        self._seen = self._fingerprint()
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    def check_now(self) -> None:
        """Look at the artifacts folder now (SIGHUP)."""
        self._wake.set()

    async def stop(self) -> None:
        for task in (self._watch, self._ramp):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._watch, self._ramp) if t is not None), return_exceptions=True
        )

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        try:
            found = [
                (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self._artifacts.iterdir()
            ]
        except OSError:
            return ()
        return tuple(sorted(found))

    async def _watch_loop(self) -> None:
        while True:
            asked = False
            wait_s = self.config.watch_s or None
            try:
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
                asked = True
            except TimeoutError:
                pass
            self._wake.clear()
            seen = self._fingerprint()
            if asked or seen != self._seen:
                self._seen = seen
                await self.consider()

    async def consider(self) -> bool:
        """Take the artifacts folder's manifest if it is a compatible expansion; True when an
        expansion was accepted. Never raises for what it finds: it refuses."""
        current = self.serving.manifest
        try:
            new = await asyncio.to_thread(
                load_verified_manifest,
                self._artifacts,
                self._trust,
                self._threshold,
                self._state_file,
                record=False,
            )
        except MbtError as exc:
            self._refuse(current, None, str(exc))
            return False
        digest = manifest_digest(new)
        if digest == manifest_digest(current) or digest in self._refused:
            return False
        if self._ramp is not None and not self._ramp.done():
            self._refuse(current, new, "an expansion is still ramping")
            return False
        problem = expansion_problem(current, new)
        if problem is None:
            try:
                files = await asyncio.to_thread(load_trunk, self._artifacts, new)
                model = trunk_model(new, files)
                problem = trunk_problem(self.engine.trunk, model)
                with torch.no_grad():
                    grown = [layer.weights().detach().cpu() for layer in model.layers]
            except MbtError as exc:
                problem = str(exc)
        if problem is not None:
            self._refused.add(digest)
            self._refuse(current, new, problem)
            return False
        self._accept(current, new, grown)
        return True

    def _refuse(self, current: Manifest, new: Manifest | None, why: str) -> None:
        version = f"v{new.model_version}" if new is not None else "in the artifacts folder"
        log.error(
            "expansion %s refused: %s; still serving v%d (a model that is not a compatible "
            "expansion is an ordinary upgrade: restart the gateway on it)",
            version,
            why,
            current.model_version,
        )
        self.metrics.events.labels(event="refused").inc()
        if self.state.state not in ("waiting", "ramping"):
            self.state = ExpansionState(
                "refused",
                current.model_version,
                0 if new is None else new.model_version,
                reason=why,
            )

    # -- the ramp -----------------------------------------------------------------------------

    def _accept(self, current: Manifest, new: Manifest, grown: list[Tensor]) -> None:
        assert new.expansion is not None  # expansion_problem checked it
        base = self.serving
        added = tuple(
            (layer, b)
            for layer, (old, now) in enumerate(
                zip(current.config.branches, new.config.branches, strict=True)
            )
            for b in range(old, now)
        )
        engine = self.engine
        engine.defense.add_bounds(new.norm_bounds())
        engine.weights.grow(grown)
        engine.fanout.reweighed()
        expect = Expectation.from_manifest(
            new,
            base.expectation.allowed_ids,
            base.expectation.roster_ids,
            base.expectation.earlier | {(current.model_version, manifest_digest(current))},
        )
        self.serving = Serving(new, expect, base.on_change)
        self.membership.expect_now(expect)
        base.on_change(new)
        self.metrics.events.labels(event="accepted").inc()
        self.state = ExpansionState(
            "waiting",
            current.model_version,
            new.model_version,
            new.expansion.start,
            new.expansion.target,
            new_branches=added,
        )
        log.warning(
            "expansion v%d -> v%d accepted: %d new branches (%s); nodes of v%d stay; beta "
            "ramps %.2f -> %.2f over %.0f s once every new branch has a replica",
            current.model_version,
            new.model_version,
            len(added),
            ",".join(f"{lay}:{b}" for lay, b in added),
            current.model_version,
            new.expansion.start,
            new.expansion.target,
            new.expansion.ramp_s,
        )
        self._ramp = asyncio.get_running_loop().create_task(self._run(base, new, added))

    async def _run(self, base: Serving, new: Manifest, added: tuple[tuple[int, int], ...]) -> None:
        assert new.expansion is not None
        schedule, cfg, registry = new.expansion, self.config, self.engine.registry
        while not all(registry.live_replicas(key) for key in added):
            await asyncio.sleep(cfg.tick_s)
        reference = await self._complete_probe(self.engine.weights.at(0.0))
        self.state = replace(self.state, state="ramping", base_perplexity=reference.perplexity)
        self.metrics.events.labels(event="ramp_started").inc()
        loop = asyncio.get_running_loop()
        began = loop.time()
        next_probe = began
        while True:
            elapsed = loop.time() - began
            beta = schedule.beta_at(elapsed)
            self._set_beta(beta)
            done = elapsed >= schedule.ramp_s
            if done or loop.time() >= next_probe:
                next_probe = loop.time() + cfg.probe_interval_s
                broken = await self._judge(reference, beta)
                if broken is not None:
                    self._limit(base, new, broken)
                    return
                if done:
                    break
            await asyncio.sleep(cfg.tick_s)
        self.state = replace(self.state, state="complete")
        self.metrics.events.labels(event="completed").inc()
        record_accepted(self._state_file or default_state_file(), new)
        self.engine.weights.settle()
        log.warning("expansion to v%d complete at beta %.2f", new.model_version, beta)

    def _set_beta(self, beta: float) -> None:
        self.engine.weights.set_beta(beta)
        self.engine.fanout.reweighed()
        self.state = replace(self.state, beta=beta)
        self.metrics.beta.set(beta)

    async def _judge(self, reference: ProbeResult, beta: float) -> str | None:
        """Probe at the current mix: the broken limit, or None."""
        probe = await self._probe(self.engine.weights.current)
        if not probe.complete:  # an outage, not the new branches: judged at the next probe
            return None
        p = probe.log_probs.exp()
        kl = float((p * (probe.log_probs - reference.log_probs)).sum(-1).mean())
        self.state = replace(self.state, drift_kl=kl, probe_perplexity=probe.perplexity)
        self.metrics.drift.set(kl)
        self.metrics.perplexity.set(probe.perplexity)
        limit_ppl = reference.perplexity * (1 + self.config.max_ppl_increase)
        if kl > self.config.max_kl:
            return f"drift {kl:.4f} nats/token at beta {beta:.3f} is above {self.config.max_kl}"
        if probe.perplexity > limit_ppl:
            return (
                f"probe perplexity {probe.perplexity:.2f} at beta {beta:.3f} is above "
                f"{limit_ppl:.2f} (v{self.state.from_version} "
                f"+{self.config.max_ppl_increase:.0%})"
            )
        return None

    def _limit(self, base: Serving, new: Manifest, why: str) -> None:
        if self.config.on_limit == "freeze":
            self.state = replace(self.state, state="frozen", reason=why)
            self.metrics.events.labels(event="frozen").inc()
            log.error(
                "expansion to v%d frozen at beta %.3f: %s", new.model_version, self.state.beta, why
            )
            return
        self.engine.weights.rollback()
        self.engine.fanout.reweighed()
        self.serving = base
        self.membership.expect_now(base.expectation)
        base.on_change(base.manifest)
        self._refused.add(manifest_digest(new))
        self.state = replace(self.state, state="rolled_back", beta=0.0, reason=why)
        self.metrics.events.labels(event="rolled_back").inc()
        self.metrics.beta.set(0.0)
        log.error(
            "expansion to v%d rolled back to v%d: %s; its nodes leave, v%d's stay",
            new.model_version,
            base.manifest.model_version,
            why,
            base.manifest.model_version,
        )

    async def _complete_probe(self, mix: Mix) -> ProbeResult:
        """A probe in which every branch answered (retried until one is)."""
        while True:
            probe = await self._probe(mix)
            if probe.complete:
                return probe
            await asyncio.sleep(self.config.probe_interval_s)

    async def _probe(self, mix: Mix) -> ProbeResult:
        """The probe text through the swarm, fused with ``mix``."""
        engine, ids = self.engine, self._probe_ids
        session = await engine.open_session()
        session.mix = mix
        try:
            logits, reports = await engine.run_token(session, ids[:-1], 0)
        except MbtError as exc:
            log.info("expansion probe failed: %s", exc)
            return ProbeResult(torch.empty(0), math.inf, False)
        finally:
            await engine.end_session(session)
        log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
        target = torch.tensor(ids[1:])
        nll = -log_probs.gather(1, target[:, None]).mean()
        return ProbeResult(log_probs, math.exp(float(nll)), _complete(reports, mix))


def _complete(reports: list[LayerReport], mix: Mix) -> bool:
    return all(
        len(r.branches) == mix.width(r.layer) and all(b.outcome == OK for b in r.branches)
        for r in reports
    )
