"""Training objectives for partial availability: branch dropout, or the sandwich rule with
in-place distillation.

*Dropout* trains only masked models: each step's loss is the labels' cross-entropy of one
random sub-model. The healthy model (all branches) is then never trained as such, which is
what its perplexity pays for. *Distill* (the sandwich rule of slimmable networks) trains the
full model on the labels every step, and ``submodels`` masked sub-models on the full model's
detached soft predictions; the losses are summed. The teacher is detached, so the sub-models
pull the shared weights toward what the full model predicts without ever pulling the full
model's predictions toward theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mbt_core.model.lm import MBTLanguageModel

ROBUST_MODES = ("dropout", "distill")


@dataclass(frozen=True)
class StepLosses:
    total: Tensor  # what is minimized
    labels: Tensor  # cross-entropy on the labels (of the full model under distill)
    distill: Tensor | None = None  # mean KL of the sub-models from the full model


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` per token, the teacher detached.

    (The ``T^2`` keeps the gradient's scale independent of the temperature.)
    """
    t = temperature
    target = F.log_softmax(teacher.detach().flatten(0, -2) / t, dim=-1)
    predicted = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
    kl = F.kl_div(predicted, target, log_target=True, reduction="batchmean")
    return kl * (t * t)


def dropout_losses(
    model: MBTLanguageModel, x: Tensor, y: Tensor, masks: list[Tensor] | None
) -> StepLosses:
    labels = F.cross_entropy(model(x, masks=masks).flatten(0, 1), y.flatten())
    return StepLosses(labels, labels)


def sandwich_losses(
    model: MBTLanguageModel,
    x: Tensor,
    y: Tensor,
    submodel_masks: list[list[Tensor]],
    temperature: float = 1.0,
) -> StepLosses:
    """The full model on the labels, plus each masked sub-model on its soft predictions.

    ``submodel_masks[s][l]`` is layer l's (K, m) per-sequence mask of sub-model s, which
    re-runs the first m sequences of the batch (m <= B: a fraction of the batch makes the
    sub-model pass cheaper). The full model and every sub-model run as one batch of
    ``B + sum(m)`` rows, whose logits are then split again.
    """
    b = x.shape[0]
    if not submodel_masks:
        full = model(x)
        labels = F.cross_entropy(full.flatten(0, 1), y.flatten())
        return StepLosses(labels, labels)
    rows = [masks[0].shape[-1] for masks in submodel_masks]
    if any(m > b for m in rows):
        raise ValueError(f"a sub-model cannot re-run more than the batch's {b} sequences")
    batch = torch.cat([x] + [x[:m] for m in rows])
    masks = [
        torch.cat([torch.ones(k, b, dtype=torch.bool)] + [sub[li] for sub in submodel_masks], 1)
        for li, k in enumerate(model.cfg.branches)
    ]
    logits = model(batch, masks=masks)
    full = logits[:b]
    labels = F.cross_entropy(full.flatten(0, 1), y.flatten())
    kl, start = [], b
    for m in rows:
        kl.append(distillation_loss(logits[start : start + m], full[:m], temperature))
        start += m
    kl_t = torch.stack(kl)
    return StepLosses(labels + kl_t.sum(), labels, kl_t.mean())
