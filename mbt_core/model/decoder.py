"""The shape of an imported decoder, family-neutral: what a width-sliced MBT is rebuilt from.

:mod:`mbt_core.model.hf_config` reads it from a Hugging Face ``config.json``; the model config
stores it (:class:`~mbt_core.model.config.ModelConfig` ``decoder``) so that checkpoints and
artifacts of an imported model rebuild without the original folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mbt_core.model.rope import RopeConfig


class UnsupportedModel(ValueError):
    """The checkpoint, or the requested split of it, cannot be imported exactly."""


@dataclass(frozen=True)
class DecoderSpec:
    """One pretrained decoder's shape, family-neutral.

    ``parallel_residual`` models (GPT-NeoX) become one MBT layer per block; sequential ones two
    (attention, then MLP). ``rope`` is None for learned positions (GPT-2).
    """

    model_type: str
    vocab_size: int
    d_model: int
    n_blocks: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    norm: str  # "layernorm" or "rmsnorm"
    norm_eps: float
    norm_bias: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    activation: str
    gated_mlp: bool
    parallel_residual: bool
    tied_embeddings: bool
    rope: RopeConfig | None
    eos_token_id: int | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rope"] = None if self.rope is None else self.rope.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown decoder config keys: {', '.join(unknown)}")
        rope = data.get("rope")
        return cls(**{**data, "rope": None if rope is None else RopeConfig.from_dict(rope)})

    @property
    def n_mbt_layers(self) -> int:
        return self.n_blocks if self.parallel_residual else 2 * self.n_blocks

    def check_split(self, branches: int) -> None:
        """Refuse a K that would cut a KV head group or leave a branch without neurons."""
        if branches <= 0:
            raise UnsupportedModel(f"--branches must be a positive integer, got {branches}")
        if self.n_kv_heads % branches:
            raise UnsupportedModel(
                f"{branches} branches do not divide the {self.n_kv_heads} key-value head groups "
                f"of this {self.model_type} model; choose K from {_divisors(self.n_kv_heads)}"
            )
        if self.intermediate_size % branches:
            raise UnsupportedModel(
                f"{branches} branches do not divide the {self.intermediate_size} MLP neurons of "
                f"this {self.model_type} model"
            )


def swiglu_decoder(
    vocab_size: int,
    d_model: int,
    n_heads: int,
    n_blocks: int,
    intermediate: int,
    context: int,
    *,
    kv_heads: int | None = None,
    parallel_residual: bool = True,
    tied_embeddings: bool = True,
    eos_token_id: int | None = None,
) -> DecoderSpec:
    """A bias-free RMSNorm, rotary, SwiGLU decoder. Its defaults are the architecture
    ``mbt train --arch parallel`` trains from scratch, in width slices: parallel residual
    blocks (attention and MLP read the same input, so one MBT layer per block), the head
    tied to the embedding. ``mbt-scale-bench`` describes its Llama-style model with it."""
    if n_heads <= 0 or d_model % n_heads or (d_model // n_heads) % 2:
        raise ValueError(
            f"d_model ({d_model}) must split into {n_heads} heads of an even dimension"
        )
    return DecoderSpec(
        model_type="mbt-parallel" if parallel_residual else "llama",
        vocab_size=vocab_size,
        d_model=d_model,
        n_blocks=n_blocks,
        n_heads=n_heads,
        n_kv_heads=n_heads if kv_heads is None else kv_heads,
        head_dim=d_model // n_heads,
        intermediate_size=intermediate,
        context_length=context,
        norm="rmsnorm",
        norm_eps=1e-5,
        norm_bias=False,
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        activation="silu",
        gated_mlp=True,
        parallel_residual=parallel_residual,
        tied_embeddings=tied_embeddings,
        rope=RopeConfig(rotary_dim=d_model // n_heads),
        eos_token_id=eos_token_id,
    )


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
