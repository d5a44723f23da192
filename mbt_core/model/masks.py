"""Branch masks: random dropout for training, fixed outages for evaluation, user drop lists."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def training_masks(
    branches: tuple[int, ...], drop_prob: float, gen: torch.Generator, rows: int | None = None
) -> list[Tensor]:
    """Drop each branch with probability ``drop_prob``, keeping at least one per layer.

    With ``rows``, every layer's mask is (K, rows): an independent draw per sequence.
    """
    masks = []
    for k in branches:
        keep = torch.rand((k,) if rows is None else (k, rows), generator=gen) >= drop_prob
        empty = ~keep.any(0)  # () or (rows,)
        if bool(empty.any()):  # give every emptied layer (or row) one random survivor
            rescue = torch.randint(k, empty.shape, generator=gen)
            keep |= F.one_hot(rescue, k).movedim(-1, 0).bool() & empty
        masks.append(keep)
    return masks


def outage_masks(branches: tuple[int, ...], fraction: float, gen: torch.Generator) -> list[Tensor]:
    """Take exactly ``round(fraction * K)`` random branches out of every layer (at most K-1)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outage fraction must be in [0, 1), got {fraction}")
    masks = []
    for k in branches:
        n_out = min(round(fraction * k), k - 1)
        keep = torch.ones(k, dtype=torch.bool)
        keep[torch.randperm(k, generator=gen)[:n_out]] = False
        masks.append(keep)
    return masks


def parse_drop_spec(spec: str, branches: tuple[int, ...]) -> list[Tensor]:
    """Masks from ``"L:B,L:B"`` (layer:branch pairs to remove), validated against the model."""
    masks = [torch.ones(k, dtype=torch.bool) for k in branches]
    for item in filter(None, (p.strip() for p in spec.split(","))):
        try:
            layer_s, branch_s = item.split(":")
            layer, branch = int(layer_s), int(branch_s)
        except ValueError:
            raise ValueError(f"bad branch {item!r}: expected LAYER:BRANCH, e.g. 0:2") from None
        if not 0 <= layer < len(branches):
            raise ValueError(f"layer {layer} does not exist (the model has {len(branches)})")
        if not 0 <= branch < branches[layer]:
            raise ValueError(f"branch {branch} does not exist in layer {layer} ({branches[layer]})")
        masks[layer][branch] = False
    for layer, keep in enumerate(masks):
        if not bool(keep.any()):
            raise ValueError(f"--drop removes every branch of layer {layer}; keep at least one")
    return masks


def describe(masks: list[Tensor]) -> str:
    """``L0: 1101`` style summary (1 = branch present)."""
    return " ".join(
        f"L{i}:" + "".join("1" if b else "0" for b in m.tolist()) for i, m in enumerate(masks)
    )
