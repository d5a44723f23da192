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


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
