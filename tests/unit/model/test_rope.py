"""Rotary embeddings match the reference implementation bit for bit in float32.

``transformers`` is the oracle here (a dev dependency only): imported Llama, Qwen2 and GPT-NeoX
logits can equal the originals only if the angles do.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from mbt_core.model.hf_config import spec_from_config
from mbt_core.model.rope import RopeConfig, inverse_frequencies, rotary_tables, rotate

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _llama(rope_parameters: dict[str, object]) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=1,
        vocab_size=64,
        max_position_embeddings=4096,
        rope_parameters=rope_parameters,
    )


def _reference_tables(rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dummy = torch.zeros(1, dtype=torch.float32)
    return rotary(dummy, positions)


@pytest.mark.parametrize(
    "rope_parameters",
    [{"rope_type": "default", "rope_theta": 10000.0}, LLAMA3],
    ids=["default", "llama3"],
)
def test_llama_angles_and_rotation_equal_the_reference(rope_parameters) -> None:
    config = _llama(rope_parameters)
    ours = spec_from_config(config.to_dict()).rope
    assert ours is not None and ours.rope_type == rope_parameters["rope_type"]
    positions = torch.tensor([[0, 1, 7, 300, 4000]])
    ref_cos, ref_sin = _reference_tables(LlamaRotaryEmbedding(config), positions)
    cos, sin = rotary_tables(ours, positions, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 64, generator=generator)
    ref_q, _ = apply_rotary_pos_emb(q, q, ref_cos, ref_sin)
    assert torch.allclose(rotate(q, cos, sin), ref_q, atol=1e-6, rtol=0)


def test_llama3_scaling_slows_only_the_long_wavelengths() -> None:
    plain = inverse_frequencies(RopeConfig(rotary_dim=64, theta=500000.0))
    scaled = inverse_frequencies(
        RopeConfig(
            rotary_dim=64,
            **{k: v for k, v in LLAMA3.items() if k not in ("rope_theta",)} | {"theta": 500000.0},
        )
    )
    assert torch.equal(scaled[:4], plain[:4])  # fastest rotations untouched
    assert torch.allclose(scaled[-1], plain[-1] / 8.0)  # slowest divided by the factor


def test_partial_rotation_of_gpt_neox_equals_the_reference() -> None:
    config = GPTNeoXConfig(
        hidden_size=128,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=1,
        vocab_size=64,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
    )
    ours = spec_from_config(config.to_dict()).rope
    assert ours is not None and ours.rotary_dim == 8  # a quarter of head_dim 32
    positions = torch.tensor([[0, 3, 9]])
    ref_cos, ref_sin = _reference_tables(GPTNeoXRotaryEmbedding(config), positions)
    cos, sin = rotary_tables(ours, positions, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    x = torch.randn(1, 4, 3, 32, generator=torch.Generator().manual_seed(1))
    rotated = rotate(x, cos, sin)
    assert torch.equal(rotated[..., 8:], x[..., 8:])  # the rest of each head passes through


def test_tables_keep_the_angle_in_float32_before_casting() -> None:
    config = RopeConfig(rotary_dim=16)
    positions = torch.tensor([[3000]])
    cos16, _ = rotary_tables(config, positions, torch.bfloat16)
    cos32, _ = rotary_tables(config, positions, torch.float32)
    assert cos16.dtype == torch.bfloat16
    assert torch.equal(cos16, cos32.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rotary_dim": 7}, "even"),
        ({"rotary_dim": 8, "rope_type": "yarn"}, "not supported"),
        ({"rotary_dim": 8, "theta": 0.0}, "theta"),
        (
            {
                "rotary_dim": 8,
                "rope_type": "llama3",
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
            },
            "high_freq_factor",
        ),
    ],
)
def test_bad_rope_settings_are_refused(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        RopeConfig(**fields)
