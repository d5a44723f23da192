"""``ModelConfig.split``: a sliced layer's branch shape and scale come from its slice count, so a
layer may hold more branches than slices; configs without it keep their bytes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mbt_core.model.blocks import Branch
from mbt_core.model.checkpoint import default_checkpoint_path
from mbt_core.model.config import ModelConfig
from mbt_core.model.decoder import swiglu_decoder
from mbt_core.model.slices import SliceBlock, layer_shapes
from mbt_core.model.tensorfile import metadata_of, read_whole


def sliced_config(branches: int = 2) -> ModelConfig:
    spec = swiglu_decoder(300, 32, 4, 2, 64, 48)
    return ModelConfig.sliced(spec, branches, 48, "float32", eos=0)


def test_configs_without_split_keep_their_bytes() -> None:
    stored = metadata_of(read_whole(default_checkpoint_path()))["config"]
    cfg = ModelConfig.from_dict(json.loads(stored))
    assert cfg.split is None and "split" not in cfg.to_dict()
    assert json.dumps(cfg.to_dict(), sort_keys=True) == stored
    assert [cfg.slices(li) for li in range(cfg.n_layers)] == list(cfg.branches)


def test_split_round_trips_and_sets_shapes_and_scale() -> None:
    cfg = replace(sliced_config(2), branches=(3, 4), split=(2, 2))
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.split == (2, 2) and cfg.to_dict()["split"] == [2, 2]
    dense = replace(sliced_config(2), branches=(2, 2))
    for li in range(2):
        assert layer_shapes(cfg, li) == layer_shapes(dense, li)  # 2 of 4 heads, 32 neurons
        block = Branch(cfg, li).blocks[0]
        assert isinstance(block, SliceBlock) and block.scale == 2.0
    attention, mlp = layer_shapes(cfg, 0)
    assert attention is not None and mlp is not None
    assert (attention.n_heads, mlp.neurons) == (2, 32)
    # Without split, 4 branches would be 4 slices: other shapes, another scale.
    four = Branch(replace(sliced_config(2), branches=(4, 4)), 1).blocks[0]
    assert isinstance(four, SliceBlock) and four.scale == 4.0


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ((2,), "split lists 1 layers"),
        ((2, 0), "positive integer"),
        ((2, True), "positive integer"),
        ((2, 5), "split into 5 slices but holds 4"),
        (3, "one slice count per layer"),
        ((3, 3), "do not divide"),  # 3 slices cannot cut 4 heads: the decoder's split check
    ],
)
def test_bad_splits_are_refused(split: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(sliced_config(2), branches=(4, 4), split=split)  # type: ignore[arg-type]


def test_block_branches_ignore_split(tiny_config: ModelConfig) -> None:
    grown = replace(tiny_config, branches=(4, 5), split=tiny_config.branches)
    shapes = [(n, p.shape) for n, p in Branch(tiny_config, 1).named_parameters()]
    assert [(n, p.shape) for n, p in Branch(grown, 1).named_parameters()] == shapes
    with pytest.raises(ValueError, match="holds 2 branches"):
        replace(tiny_config, split=(3, 3))
    torch.manual_seed(0)
    h = torch.randn(1, 5, tiny_config.d_model)
    a, b = Branch(tiny_config, 0), Branch(grown, 0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(h), b(h))
