"""Reading Hugging Face configs into one decoder shape, and refusing what cannot split exactly.

The configs come from ``transformers`` itself (a dev dependency), saved with ``save_pretrained``
the way a downloaded model folder holds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

from mbt_core.model.hf_config import UnsupportedModel, read_spec, spec_from_config

SMALL = {"vocab_size": 96, "num_hidden_layers": 3}


def _saved(tmp_path: Path, config) -> Path:
    config.save_pretrained(tmp_path)
    return tmp_path


def test_gpt2_is_a_sequential_layernorm_model_with_learned_positions(tmp_path: Path) -> None:
    config = GPT2Config(n_embd=64, n_head=4, n_layer=3, n_positions=128, vocab_size=96)
    spec = read_spec(_saved(tmp_path, config))
    assert (spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (64, 4, 4, 16)
    assert spec.intermediate_size == 256 and spec.context_length == 128
    assert spec.norm == "layernorm" and spec.norm_bias and spec.mlp_bias
    assert spec.rope is None and spec.tied_embeddings and not spec.gated_mlp
    assert spec.n_mbt_layers == 6  # attention and MLP are separate layers


def test_gpt_neox_is_one_layer_per_block_with_partial_rotation(tmp_path: Path) -> None:
    config = GPTNeoXConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        **SMALL,
    )
    spec = read_spec(_saved(tmp_path, config))
    assert spec.parallel_residual and spec.n_mbt_layers == 3
    assert spec.rope is not None and spec.rope.rotary_dim == 4  # 0.25 of head_dim 16
    assert spec.activation == "gelu" and not spec.tied_embeddings


def test_gpt_neox_without_parallel_residual_is_sequential(tmp_path: Path) -> None:
    config = GPTNeoXConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        use_parallel_residual=False,
        **SMALL,
    )
    assert read_spec(_saved(tmp_path, config)).n_mbt_layers == 6


@pytest.mark.parametrize("family", [LlamaConfig, Qwen2Config])
def test_llama_and_qwen2_are_gated_rmsnorm_models_with_grouped_queries(tmp_path, family) -> None:
    config = family(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=True,
        **SMALL,
    )
    spec = read_spec(_saved(tmp_path, config))
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim) == (8, 2, 8)
    assert spec.norm == "rmsnorm" and not spec.norm_bias and spec.gated_mlp
    assert spec.activation == "silu" and spec.tied_embeddings
    # Qwen2 biases its query/key/value projections only; Llama has no biases by default.
    assert spec.qkv_bias is (family is Qwen2Config) and not spec.out_bias and not spec.mlp_bias


def test_old_style_rope_keys_read_like_the_new_ones() -> None:
    """Checkpoints saved before ``rope_parameters`` spell theta and scaling at the top level."""
    new = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
        **SMALL,
    ).to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = 500000.0
    old["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    }
    assert spec_from_config(old) == spec_from_config(new)
    assert spec_from_config(new).rope.theta == 500000.0


def test_a_pythia_style_rotary_base_is_read() -> None:
    """Pythia's config.json (written before rope_theta existed) names the base
    rotary_emb_base and the rotated fraction rotary_pct."""
    data = {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "vocab_size": 96,
        "max_position_embeddings": 128,
        "rotary_emb_base": 25000,
        "rotary_pct": 0.5,
    }
    rope = spec_from_config(data).rope
    assert rope is not None and rope.theta == 25000.0 and rope.rotary_dim == 8


def test_eos_lists_take_their_first_id() -> None:
    data = LlamaConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=96, eos_token_id=[5, 9], **SMALL
    ).to_dict()
    assert spec_from_config(data).eos_token_id == 5


def test_k_must_divide_the_kv_groups_and_the_neurons() -> None:
    spec = spec_from_config(
        LlamaConfig(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=96,
            **SMALL,
        ).to_dict()
    )
    for k in (1, 2, 4):
        spec.check_split(k)  # whole KV groups, whole neurons
    with pytest.raises(
        UnsupportedModel,
        match=r"3 branches do not divide the 4 key-value head "
        r"groups.*choose K from 1, 2, 4",
    ):
        spec.check_split(3)
    with pytest.raises(UnsupportedModel, match="positive"):
        spec.check_split(0)
    odd_mlp = spec_from_config(
        LlamaConfig(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=100,
            **SMALL,
        ).to_dict()
    )
    with pytest.raises(UnsupportedModel, match="8 branches do not divide the 100 MLP neurons"):
        odd_mlp.check_split(8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_type": "t5"}, r"architecture 't5' is not supported \(supported: gpt2, gpt_neox"),
        ({"model_type": None}, "architecture None is not supported"),
        ({"hidden_act": "relu2"}, "activation 'relu2' is not supported"),
        ({"num_key_value_heads": 3}, "8 attention heads are not a multiple of 3 KV heads"),
        ({"hidden_size": 0}, "'hidden_size' must be a positive integer"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "'yarn' is not supported"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
        ({"rms_norm_eps": "tiny"}, "'rms_norm_eps' must be a number"),
    ],
)
def test_unsupported_settings_are_refused_in_one_line(edit, message) -> None:
    data = LlamaConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96, **SMALL
    ).to_dict()
    data.update(edit)
    with pytest.raises(UnsupportedModel, match=message) as caught:
        spec_from_config(data)
    assert "\n" not in str(caught.value)


def test_qwen2_sliding_window_is_refused() -> None:
    data = Qwen2Config(
        hidden_size=64, num_attention_heads=4, intermediate_size=96, **SMALL
    ).to_dict()
    data["use_sliding_window"] = True
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        spec_from_config(data)


def test_missing_keys_and_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match=r"has no config\.json"):
        read_spec(tmp_path)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UnsupportedModel, match="cannot read"):
        read_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    with pytest.raises(UnsupportedModel, match=r"gpt2 config\.json lacks 'n_embd'"):
        read_spec(tmp_path)
