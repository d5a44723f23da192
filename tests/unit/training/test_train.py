from pathlib import Path

import pytest
import torch

from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.masks import outage_masks, parse_drop_spec, training_masks
from mbt_core.training.train import TrainConfig, entropy_penalty, learning_rate, train
from tests.conftest import SAMPLE_TEXT

TINY = ModelConfig(
    vocab_size=300, d_model=32, n_heads=2, context_length=32, n_layers=2, branches=(2, 2)
)


def _config(tmp_path: Path, steps: int, **kw: object) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "text.txt"
    data.write_text(SAMPLE_TEXT * 3)
    return TrainConfig(
        data=data,
        out_dir=tmp_path / "run",
        model=TINY,
        steps=steps,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_interval=10**6,
        checkpoint_interval=10,
        eval_tokens=512,
        **kw,
    )


def _loss_on(path: Path, text: str) -> float:
    ckpt = load_checkpoint(path)
    ids = torch.tensor([ckpt.tokenizer.encode(text)[:33]])
    with torch.no_grad():
        logits = ckpt.model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()


def test_tiny_training_run_lowers_the_loss(tmp_path: Path) -> None:
    cfg = _config(tmp_path, steps=1)
    before = _loss_on(train(cfg, progress=False), SAMPLE_TEXT)
    cfg = _config(tmp_path / "b", steps=60)
    after = _loss_on(train(cfg, progress=False), SAMPLE_TEXT)
    assert after < before - 1.0


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    straight = _config(tmp_path / "a", steps=20)
    train(straight, progress=False)
    resumed = _config(tmp_path / "b", steps=20)
    assert load_checkpoint(train(resumed, progress=False, until=10)).info["step"] == "10"
    ckpt_path = train(resumed, progress=False)
    assert load_checkpoint(ckpt_path).info["step"] == "20"
    a = load_checkpoint(straight.out_dir / "model.safetensors").model.state_dict()
    b = load_checkpoint(ckpt_path).model.state_dict()
    for name in a:  # same data order, masks and optimizer state: same weights
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_training_masks_keep_a_branch_and_drop_at_the_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.cat(training_masks((1, 4, 4), 0.9, gen)) for _ in range(2000)])
    assert kept[:, 0].all()  # a single-branch layer is never emptied
    assert kept[:, 1:5].any(1).all() and kept[:, 5:9].any(1).all()
    rate = 1 - training_masks((1000,), 0.3, gen)[0].float().mean().item()
    assert rate == pytest.approx(0.3, abs=0.05)


def test_outage_masks_remove_an_exact_fraction() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = outage_masks((4, 4, 8, 1), 0.5, gen)
    assert [int((~m).sum()) for m in masks] == [2, 2, 4, 0]


def test_drop_spec_parsing_and_errors() -> None:
    masks = parse_drop_spec("0:1, 1:0", (2, 3))
    assert masks[0].tolist() == [True, False] and masks[1].tolist() == [False, True, True]
    for spec, msg in [
        ("5:0", "layer 5 does not exist"),
        ("0:9", "branch 9 does not exist"),
        ("0-1", "expected LAYER:BRANCH"),
        ("0:0,0:1", "every branch of layer 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_drop_spec(spec, (2, 3))


def test_entropy_floor_penalizes_only_concentrated_weights() -> None:
    model = MBTLanguageModel(TINY)
    assert entropy_penalty(model, 0.9).item() == 0.0  # uniform alpha
    with torch.no_grad():
        model.layers[0].alpha_logits.copy_(torch.tensor([5.0, -5.0]))
    penalty = entropy_penalty(model, 0.9)
    assert penalty.item() > 0.5
    penalty.backward()
    grad = model.layers[0].alpha_logits.grad
    assert grad[0] > 0 > grad[1]  # descending the penalty evens the weights out


def test_learning_rate_schedule_warms_up_then_decays(tmp_path: Path) -> None:
    cfg = _config(tmp_path, steps=100)
    assert learning_rate(cfg, 0) < learning_rate(cfg, 4) == pytest.approx(cfg.lr)
    assert learning_rate(cfg, 99) == pytest.approx(cfg.min_lr, rel=0.01)


def test_train_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="branch_drop"):
        _config(tmp_path, steps=1, branch_drop=1.0)
