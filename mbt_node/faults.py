"""Test-only fault injection: a Byzantine node that corrupts the outputs of its ``Forward``.

For outage drills (``mbt-bench outage``) and tests of the gateway's output checks. It must be
impossible to switch on by accident: ``mbt-node --unsafe-test-fault`` is refused unless the
environment also sets ``MBT_ENABLE_TEST_FAULTS=1``, and an active fault is logged loudly. The
corruption is applied to the response after the real compute, so the node's KV caches stay
correct and only what the gateway receives is wrong.

Modes: ``nan`` (NaN everywhere: caught by the finiteness check), ``huge`` (outputs scaled by
``HUGE_FACTOR``: caught by the norm check), ``flip`` (sign flipped) and ``random`` (a random
direction of the same norm): the last two pass both checks, as a subtle attacker would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger("mbt_node")

ENABLE_ENV = "MBT_ENABLE_TEST_FAULTS"
MODES = ("nan", "huge", "flip", "random")
HUGE_FACTOR = 1e4  # far beyond the gateway's default norm bound (8x the median)


@dataclass(frozen=True)
class CorruptionFault:
    """Corrupt each output row (one position of one branch) with probability ``rate``."""

    mode: str
    rate: float = 1.0
    seed: int = 0
    _gen: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"corrupt must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (math.isfinite(self.rate) and 0.0 < self.rate <= 1.0):
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")
        object.__setattr__(self, "_gen", torch.Generator().manual_seed(self.seed))

    def __str__(self) -> str:
        return f"corrupt={self.mode},rate={self.rate:g},seed={self.seed}"

    def apply(self, outputs: Tensor) -> Tensor:
        """A corrupted copy of ``outputs`` (positions, C); the input is left untouched."""
        x = outputs.detach().to("cpu", torch.float32)  # (N, C)
        if self.mode == "nan":
            bad = torch.full_like(x, float("nan"))
        elif self.mode == "huge":
            bad = x * HUGE_FACTOR
        elif self.mode == "flip":
            bad = -x
        else:  # random: same norm per row, random direction
            noise = torch.randn(x.shape, generator=self._gen)
            scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            bad = noise / torch.linalg.vector_norm(noise, dim=-1, keepdim=True) * scale
        if self.rate < 1.0:
            hit = torch.rand(x.shape[0], generator=self._gen) < self.rate  # (N,)
            bad = torch.where(hit[:, None], bad, x)
        return bad.to(outputs.device, outputs.dtype)


def parse_fault(spec: str) -> CorruptionFault:
    """``corrupt=MODE[,rate=R][,seed=S]`` -> :class:`CorruptionFault` (ValueError if malformed)."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not value or key in fields:
            raise ValueError(f"expected corrupt=MODE[,rate=R][,seed=S], got {spec!r}")
        fields[key] = value
    unknown = set(fields) - {"corrupt", "rate", "seed"}
    if unknown or "corrupt" not in fields:
        raise ValueError(
            f"expected corrupt=MODE[,rate=R][,seed=S], got {spec!r}"
            + (f" (unknown key {sorted(unknown)[0]!r})" if unknown else "")
        )
    try:
        rate = float(fields.get("rate", "1"))
        seed = int(fields.get("seed", "0"))
    except ValueError as exc:
        raise ValueError(f"{spec!r}: rate must be a number and seed an integer") from exc
    return CorruptionFault(fields["corrupt"], rate, seed)


def require_enabled(
    fault: CorruptionFault | None, environ: Mapping[str, str]
) -> CorruptionFault | None:
    """Refuse a fault unless ``MBT_ENABLE_TEST_FAULTS=1``; warn loudly when one is active."""
    if fault is None:
        return None
    if environ.get(ENABLE_ENV) != "1":
        raise ValueError(
            f"--unsafe-test-fault corrupts this node's outputs and is for tests only; "
            f"set {ENABLE_ENV}=1 to allow it"
        )
    log.warning("TEST FAULT ACTIVE: this node corrupts its Forward outputs (%s)", fault)
    return fault


def corrupt(fault: CorruptionFault | None, outputs: Tensor) -> Tensor:
    """``outputs`` as sent: corrupted when a test fault is on, else unchanged."""
    return outputs if fault is None else fault.apply(outputs)
