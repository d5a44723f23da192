"""The sandwich rule with in-place distillation: its loss, its gradients, a tiny run, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.masks import outage_masks
from mbt_core.training.objective import distillation_loss, sandwich_losses
from mbt_core.training.train import train
from tests.conftest import SAMPLE_TEXT
from tests.unit.training.test_train import TINY, _config


def test_the_distillation_loss_is_zero_for_a_student_equal_to_its_teacher() -> None:
    logits = torch.randn(2, 5, 11)
    for t in (0.5, 1.0, 2.0):
        assert distillation_loss(logits, logits.clone(), t).item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(torch.randn(2, 5, 11), logits).item() > 0.01


def test_no_gradient_reaches_the_teacher() -> None:
    teacher = torch.randn(3, 7, requires_grad=True)
    student = torch.randn(3, 7, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None


def test_the_full_models_gradient_is_its_label_gradient_plus_the_students_only() -> None:
    """The sandwich gradient equals label CE of the full model plus the KL of the sub-model
    (here on 2 of the batch's 3 sequences, one mask each) from a *constant* copy of the full
    model's logits: the teacher path adds nothing, and the one batched pass splits right."""
    torch.manual_seed(0)
    model = MBTLanguageModel(TINY)
    x = torch.randint(0, TINY.vocab_size, (3, 9))
    y = torch.randint(0, TINY.vocab_size, (3, 9))
    # (K, m) per sequence: layer 0 keeps branch 0 then 1, layer 1 keeps branch 1 then both.
    masks = [
        torch.tensor([[True, False], [False, True]]),
        torch.tensor([[False, True], [True, True]]),
    ]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()
        ]

    got = grads(sandwich_losses(model, x, y, [masks], temperature=2.0).total)
    full = model(x)
    constant = full.detach().clone()
    students = [
        model(x[i : i + 1], masks=[m[:, i] for m in masks]) for i in range(2)
    ]  # each sequence alone, with its own (K,) mask
    kl = distillation_loss(torch.cat(students), constant[:2], 2.0)
    want = grads(F.cross_entropy(full.flatten(0, 1), y.flatten()) + kl)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_a_sub_model_cannot_re_run_more_sequences_than_the_batch_has() -> None:
    model = MBTLanguageModel(TINY)
    x = torch.randint(0, TINY.vocab_size, (2, 5))
    too_many = [torch.ones(k, 3, dtype=torch.bool) for k in TINY.branches]
    with pytest.raises(ValueError, match="batch's 2 sequences"):
        sandwich_losses(model, x, x, [too_many])


def _losses(path: Path, masks: list[torch.Tensor] | None) -> float:
    ckpt = load_checkpoint(path)
    ids = torch.tensor([ckpt.tokenizer.encode(SAMPLE_TEXT)[:33]])
    with torch.no_grad():
        logits = ckpt.model(ids[:, :-1], masks=masks)
    return F.cross_entropy(logits[0], ids[0, 1:]).item()


def test_a_tiny_distill_run_lowers_the_healthy_and_the_masked_loss(tmp_path: Path) -> None:
    half = outage_masks(TINY.branches, 0.5, torch.Generator().manual_seed(0))
    first = train(_config(tmp_path / "a", steps=1, robust_mode="distill"), progress=False)
    last = train(_config(tmp_path / "b", steps=60, robust_mode="distill"), progress=False)
    assert _losses(last, None) < _losses(first, None) - 1.0
    assert _losses(last, half) < _losses(first, half) - 1.0
    assert load_checkpoint(last).info["robust_mode"] == "distill"


def test_a_resumed_distill_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    kw = {
        "robust_mode": "distill",
        "submodels": 2,
        "distill_temperature": 2.0,
        "distill_fraction": 0.5,
    }
    straight = _config(tmp_path / "a", steps=20, **kw)
    train(straight, progress=False)
    resumed = _config(tmp_path / "b", steps=20, **kw)
    train(resumed, progress=False, until=10)
    path = train(resumed, progress=False)
    a = load_checkpoint(straight.out_dir / "model.safetensors").model.state_dict()
    b = load_checkpoint(path).model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
