"""Growing layers by new branches: every old tensor and branch output stays bit for bit, the
new branches start as documented, and training moves only the new branches and logits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mbt_core.model.checkpoint import Checkpoint, load_checkpoint
from mbt_core.model.expand import (
    changed_parameters,
    expand_model,
    freeze_for_growth,
    new_branch_mass,
)
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.training.train import TrainConfig, freeze, train
from tests.conftest import SAMPLE_TEXT
from tests.unit.model.test_split import sliced_config


@pytest.fixture()
def sliced_model() -> MBTLanguageModel:
    torch.manual_seed(1)
    model = MBTLanguageModel(replace(sliced_config(2), vocab_size=300))
    with torch.no_grad():
        for layer in model.layers:
            layer.alpha_logits.normal_()
    return model.eval()


@pytest.mark.parametrize("init", ["copy", "fresh"])
@pytest.mark.parametrize("kind", ["block", "sliced"])
def test_growing_keeps_every_old_tensor_and_output(
    kind: str, init: str, tiny_model: MBTLanguageModel, sliced_model: MBTLanguageModel
) -> None:
    base = tiny_model if kind == "block" else sliced_model
    grown = expand_model(base, [1], 2, init=init)
    k0, k1 = base.cfg.branches
    assert grown.cfg.branches == (k0, k1 + 2) and grown.cfg.split == base.cfg.branches
    assert changed_parameters(base, grown) == []
    old_logits = base.layers[1].alpha_logits
    assert torch.equal(grown.layers[1].alpha_logits[k1:], old_logits.mean().expand(2))
    torch.manual_seed(2)
    h = torch.randn(2, 6, base.cfg.d_model)
    with torch.no_grad():
        for li in range(2):
            for b in range(base.cfg.branches[li]):
                assert torch.equal(grown.layers[li].branches[b](h), base.layers[li].branches[b](h))
        assert torch.equal(grown.layers[0](h).output, base.layers[0](h).output)
        # Masking the new branches leaves exactly the base layer's fusion (same weights).
        keep = torch.arange(k1 + 2) < k1
        fused = grown.layers[1](h, keep).output
    assert torch.allclose(fused, base.layers[1](h).output, atol=1e-6)
    mass = new_branch_mass(grown, base.cfg.branches)
    assert mass[0] == 0.0 and 0.0 < mass[1] < 1.0
    assert changed_parameters(base, expand_model(base, [0], 1)) == []
    moved = expand_model(base, [0], 1)
    with torch.no_grad():
        moved.layers[0].branches[0].blocks[0].parameters().__next__().add_(1e-3)
        moved.layers[0].alpha_logits[0] += 1e-3
    assert len(changed_parameters(base, moved)) == 2  # the check sees a single changed value


def test_copy_takes_the_largest_alpha_first_plus_scaled_noise(
    sliced_model: MBTLanguageModel,
) -> None:
    with torch.no_grad():
        sliced_model.layers[0].alpha_logits.copy_(torch.tensor([0.1, 0.7]))
    exact = expand_model(sliced_model, [0], 3, noise=0.0)
    sources = [1, 0, 1]  # by alpha, descending, then cycling
    for j, src in enumerate(sources):
        new, old = (
            exact.layers[0].branches[2 + j].state_dict(),
            sliced_model.layers[0].branches[src],
        )
        assert all(torch.equal(new[n], t) for n, t in old.state_dict().items())
    noisy = expand_model(sliced_model, [0], 1, noise=0.1, seed=3)
    old = sliced_model.layers[0].branches[1].state_dict()
    for name, t in noisy.layers[0].branches[2].state_dict().items():
        if t.dim() == 2:
            ratio = float((t - old[name]).std() / old[name].std())
            assert 0.08 < ratio < 0.12, name
    again = expand_model(sliced_model, [0], 1, noise=0.1, seed=3)
    assert changed_parameters(noisy, again) == []  # seeded
    assert changed_parameters(noisy, expand_model(sliced_model, [0], 1, noise=0.1, seed=4))


def test_fresh_branches_are_initialized_as_a_new_model(sliced_model: MBTLanguageModel) -> None:
    grown = expand_model(sliced_model, [0, 1], 1, init="fresh", seed=5)
    depth = grown.cfg.n_layers
    for name, t in grown.layers[1].branches[2].named_parameters():
        if t.dim() == 1:
            assert torch.equal(t, torch.ones_like(t)), name  # RMSNorm gains
            continue
        std = 0.02 / (2 * depth) ** 0.5 if name.endswith((".o.weight", ".down.weight")) else 0.02
        assert abs(float(t.detach().std()) / std - 1) < 0.1, name


@pytest.mark.parametrize(
    ("layers", "add", "init", "message"),
    [
        ([2], 1, "copy", "layer 2 does not exist"),
        ([-1], 1, "copy", "layer -1 does not exist"),
        ([0, 0], 1, "copy", "name a layer twice"),
        ([], 1, "copy", "at least one layer"),
        ([0], 0, "copy", "--add must be a positive"),
        ([0], 1, "clone", "--init must be one of"),
    ],
)
def test_bad_growth_is_refused(
    tiny_model: MBTLanguageModel, layers: list[int], add: int, init: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        expand_model(tiny_model, layers, add, init=init)


def _train(model: MBTLanguageModel, tokenizer: Tokenizer, out: Path, **kwargs: object) -> Path:
    text = out.parent / "text.txt"
    text.write_text(SAMPLE_TEXT * 3)
    cfg = TrainConfig(
        data=text, out_dir=out, steps=8, batch_size=4, lr=1e-2, warmup_steps=0,
        eval_interval=10**6, eval_tokens=64, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return train(cfg, progress=False, start=Checkpoint(model, tokenizer))


def test_training_moves_only_the_new_branches_and_logits(
    tmp_path: Path, tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer
) -> None:
    base = tiny_model
    grown = expand_model(base, [1], 2, init="fresh")
    path = _train(grown, tiny_tokenizer, tmp_path / "grow", grow_from=base.cfg.branches)
    trained = load_checkpoint(path).model
    assert changed_parameters(base, trained) == []  # trunk, old branches, old logits
    start = expand_model(base, [1], 2, init="fresh")
    assert not torch.equal(trained.layers[1].alpha_logits[3:], start.layers[1].alpha_logits[3:])
    moved = changed_parameters(start, trained)
    assert moved and all(
        n.startswith(("layers.1.branches.3.", "layers.1.branches.4."))
        or n == "layers.1.alpha_logits"
        for n in moved
    )
    # The control: the same training without freeze_for_growth moves old weights and logits.
    loose = _train(expand_model(base, [1], 2, init="fresh"), tiny_tokenizer, tmp_path / "loose")
    changed = changed_parameters(base, load_checkpoint(loose).model)
    assert "layers.1.alpha_logits" in changed and "tok_emb.weight" in changed


def test_freeze_for_growth_counts_and_holds_old_logit_gradients(
    tiny_model: MBTLanguageModel,
) -> None:
    grown = expand_model(tiny_model, [0], 1)
    per_branch = sum(p.numel() for p in grown.layers[0].branches[2].parameters())
    assert freeze_for_growth(grown, tiny_model.cfg.branches) == per_branch + 1
    assert freeze(grown, ()) == per_branch + 3  # the whole logits tensor of layer 0 trains
    grown.layers[0].weights()[0].backward()
    grad = grown.layers[0].alpha_logits.grad
    assert grad is not None and grad[:2].eq(0).all() and grad[2] != 0
    assert grown.layers[1].alpha_logits.grad is None
    with pytest.raises(ValueError, match="cannot have grown"):
        freeze_for_growth(grown, (4, 3))
