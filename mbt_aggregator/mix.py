"""The weights a gateway fuses each layer with, and how they change while width grows.

A served model fuses layer l with its alpha. During a live expansion (:mod:`.expansion`) the
layer also holds new branches, and the gateway fuses with the blend at injection rate beta::

    w(beta) = (1 - beta) * alpha_N + beta * alpha_N1

``alpha_N`` padded with zeros for the new branches. beta = 0 is the old model: the new branches
are then not called at all and the fusion runs over the old ones with the old tensor itself,
so its output equals version N bit for bit; beta = 1 is the expanded checkpoint's alpha itself.
New branches are always the last of their layer, so the branches a mix calls are a prefix.

A :class:`Mix` is one moment's weights. Sessions normally follow the current one; a session
can be pinned to another (the drift probe compares beta with beta = 0 on the same swarm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)  # compared by identity: the fan-out groups steps by mix
class Mix:
    """Per layer the alpha of the branches called (branches ``0..width-1``)."""

    beta: float
    alphas: tuple[Tensor, ...]
    weights: tuple[dict[int, float], ...]  # the same, as floats: for the policy and reports

    @classmethod
    def of(cls, beta: float, alphas: Sequence[Tensor]) -> Mix:
        return cls(beta, tuple(alphas), tuple(dict(enumerate(a.tolist())) for a in alphas))

    def width(self, layer: int) -> int:
        return self.alphas[layer].numel()


def blend(base: Tensor, grown: Tensor, beta: float) -> Tensor:
    """``(1 - beta) * base + beta * grown``, ``base`` zero-padded to ``grown``'s length; the
    ends are the tensors themselves (no rounding)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return base
    if beta == 1.0:
        return grown
    return (1.0 - beta) * _padded(base, grown) + beta * grown


class FusionWeights:
    """The served model's alpha, or during an expansion its blend with the grown model's."""

    def __init__(self, alphas: Sequence[Tensor]) -> None:
        self._base = Mix.of(0.0, alphas)
        self._grown: tuple[Tensor, ...] | None = None
        self.current = self._base

    @property
    def growing(self) -> bool:
        return self._grown is not None

    def at(self, beta: float) -> Mix:
        """The weights at injection rate ``beta`` (the base model's own mix at 0)."""
        if self._grown is None or beta == 0.0:
            return self._base
        return Mix.of(
            beta, [blend(b, g, beta) for b, g in zip(self._base.alphas, self._grown, strict=True)]
        )

    def grow(self, grown: Sequence[Tensor]) -> None:
        """Start blending towards ``grown`` (every layer at least as wide as now), at beta 0."""
        base = self._base.alphas
        if len(grown) != len(base) or any(
            g.numel() < b.numel() for b, g in zip(base, grown, strict=True)
        ):
            raise ValueError("a grown model keeps every layer and every branch")
        self._grown = tuple(grown)
        self.current = self._base

    def set_beta(self, beta: float) -> None:
        self.current = self.at(beta)

    def rollback(self) -> None:
        """Back to the base model: the new branches are no longer called."""
        self._grown = None
        self.current = self._base

    def settle(self) -> None:
        """The current mix becomes the served model (an expansion is done): a later one
        blends from here."""
        self._base = Mix.of(0.0, self.current.alphas)
        self._grown = None
        self.current = self._base

    def shown(self) -> list[Tensor]:
        """Every branch's current weight, new ones included (0 while beta is 0): for Status."""
        if self._grown is None:
            return list(self.current.alphas)
        beta = self.current.beta
        return [
            blend(b, g, beta) if beta else _padded(b, g)
            for b, g in zip(self._base.alphas, self._grown, strict=True)
        ]


def _padded(base: Tensor, grown: Tensor) -> Tensor:
    out = torch.zeros_like(grown)
    out[: base.numel()] = base
    return out
