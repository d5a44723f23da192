"""Width diagnostics per layer: is width used as several substitutable paths, or collapsed?

Weight statistics come from alpha = softmax(alpha_logits). Output statistics are computed on
each branch's update ``z_i - h`` (the branch output minus the layer input), because every
``z_i`` carries the same residual stream, which would make all branches look alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mbt_core.model.lm import MBTLanguageModel


@dataclass(frozen=True)
class LayerDiagnostics:
    layer: int
    branches: int
    weights: tuple[float, ...]
    effective_num_paths: float  # exp(H(alpha)), in 1..K
    path_starvation_index: float  # 1 - H(alpha) / log K
    top1_share: float
    margin_top1_top2: float
    gini_concentration: float
    diversity_cosine_distance_mean: float  # mean pairwise 1 - cos(u_i, u_j) per position
    branch_correlation_mean: float  # mean pairwise Pearson correlation per position
    output_energy_cv: float  # std / mean of the branches' mean squared update norm

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def weight_stats(alpha: Tensor) -> dict[str, float]:
    """Concentration of one layer's aggregation weights."""
    a = alpha.double()
    k = a.numel()
    h = float(-(a * a.clamp_min(1e-300).log()).sum())
    ordered = a.sort(descending=True).values
    ascending = ordered.flip(0)
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    gini = float(((2 * ranks - k - 1) * ascending).sum() / (k * ascending.sum())) if k > 1 else 0.0
    return {
        "effective_num_paths": math.exp(h),
        "path_starvation_index": 1.0 - h / math.log(k) if k > 1 else 0.0,
        "top1_share": float(ordered[0]),
        "margin_top1_top2": float(ordered[0] - ordered[1]) if k > 1 else float(ordered[0]),
        "gini_concentration": gini,
    }


def output_stats(updates: Tensor) -> dict[str, float]:
    """Similarity and energy spread of branch updates (K, N, C) over N positions."""
    k = updates.shape[0]
    u = updates.double()
    energy = (u**2).sum(-1).mean(-1)  # (K,)
    cv = float(energy.std(unbiased=False) / energy.mean()) if k > 1 else 0.0
    if k < 2:
        return {
            "diversity_cosine_distance_mean": 0.0,
            "branch_correlation_mean": 1.0,
            "output_energy_cv": cv,
        }
    unit = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    centered = u - u.mean(-1, keepdim=True)
    centered = centered / centered.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cos = torch.stack([(unit[i] * unit[j]).sum(-1).mean() for i, j in pairs])
    corr = torch.stack([(centered[i] * centered[j]).sum(-1).mean() for i, j in pairs])
    return {
        "diversity_cosine_distance_mean": float(1.0 - cos.mean()),
        "branch_correlation_mean": float(corr.mean()),
        "output_energy_cv": cv,
    }


@torch.no_grad()
def diagnose(model: MBTLanguageModel, idx: Tensor) -> list[LayerDiagnostics]:
    """Run ``idx`` (B, T) through the healthy model and describe every layer's width."""
    model.eval()
    h = model.embed(idx)
    report = []
    for li, layer in enumerate(model.layers):
        outputs = torch.stack([branch(h) for branch in layer.branches])  # (K, B, T, C)
        updates = (outputs - h).flatten(1, 2)  # (K, B*T, C)
        alpha = layer.weights()
        report.append(
            LayerDiagnostics(
                layer=li,
                branches=alpha.numel(),
                weights=tuple(round(float(a), 4) for a in alpha),
                **weight_stats(alpha),
                **output_stats(updates),
            )
        )
        h = layer(h).output
    return report
