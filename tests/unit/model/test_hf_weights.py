"""Checkpoint tensors read from real ``save_pretrained`` folders, single and sharded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mbt_core.model.hf_config import UnsupportedModel
from mbt_core.model.hf_weights import INDEX, HFWeights


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=96,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sharded_tensors_come_back_whole_and_in_bfloat16(sharded_llama) -> None:
    folder, state = sharded_llama
    assert len(json.loads((folder / INDEX).read_text())["weight_map"]) == len(state)
    with HFWeights(folder) as weights:
        assert weights.names() == frozenset(state)
        assert weights.dtype() == torch.bfloat16
        for name, expected in state.items():
            got = weights.get(name)
            assert got.dtype == torch.bfloat16 and torch.equal(got, expected), name


def test_a_part_reads_only_the_rows_or_columns_asked_for(sharded_llama) -> None:
    folder, state = sharded_llama
    name = "model.layers.1.mlp.down_proj.weight"  # (d_model, neurons): a branch takes columns
    with HFWeights(folder) as weights:
        assert torch.equal(weights.part(name, 1, 24, 48), state[name][:, 24:48])
        assert torch.equal(weights.part(name, 0, 0, 8), state[name][:8])
        with pytest.raises(UnsupportedModel, match="has no slice 90:100 along 1"):
            weights.part(name, 1, 90, 100)
        with pytest.raises(UnsupportedModel, match=r"lacks tensor 'model\.nope'"):
            weights.get("model.nope")


def test_a_single_file_checkpoint_reads_in_float32(tmp_path: Path) -> None:
    model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_head=2,
            n_layer=1,
            vocab_size=50,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    model.save_pretrained(tmp_path)
    with HFWeights(tmp_path) as weights:
        assert "transformer.wte.weight" in weights
        assert weights.dtype() == torch.float32
        assert torch.equal(weights.get("transformer.wpe.weight"), model.transformer.wpe.weight)


def test_broken_folders_are_refused_in_one_line(tmp_path: Path, sharded_llama) -> None:
    with pytest.raises(UnsupportedModel, match=r"has neither model\.safetensors nor"):
        HFWeights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(UnsupportedModel, match="cannot read"):
        HFWeights(tmp_path)
    folder, _ = sharded_llama
    index = json.loads((folder / INDEX).read_text())
    for bad in ("model-99-of-99.safetensors", "../model-00001-of-00004.safetensors"):
        index["weight_map"]["lm_head.weight"] = bad
        (tmp_path / INDEX).write_text(json.dumps(index))
        with pytest.raises(UnsupportedModel, match="names a missing shard"):
            HFWeights(tmp_path)
    (tmp_path / INDEX).write_text("[1, 2]")
    with pytest.raises(UnsupportedModel, match="cannot read"):
        HFWeights(tmp_path)
