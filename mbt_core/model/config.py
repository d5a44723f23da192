"""Model configuration: the one description a model is rebuilt from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an MBT language model.

    ``branches`` gives K for every layer, so layers may differ in width; ``n_layers`` must match
    its length (it is stored redundantly so that a config file reads naturally).
    """

    vocab_size: int = 2048  # small BPE vocabulary: the embedding stays cheap on a CPU
    d_model: int = 128
    n_heads: int = 4
    context_length: int = 128
    n_layers: int = 4
    branches: tuple[int, ...] = (4, 4, 4, 4)
    blocks_per_branch: int = 1
    mlp_ratio: int = 4
    dropout: float = 0.0
    eos_token_id: int = 0  # the tokenizer puts its end-of-text token first
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "branches", tuple(int(k) for k in self.branches))
        positive = {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "context_length": self.context_length,
            "n_layers": self.n_layers,
            "blocks_per_branch": self.blocks_per_branch,
            "mlp_ratio": self.mlp_ratio,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if len(self.branches) != self.n_layers:
            raise ValueError(
                f"branches lists {len(self.branches)} layers but n_layers is {self.n_layers}"
            )
        if any(k <= 0 for k in self.branches):
            raise ValueError(f"every layer needs at least one branch, got {self.branches}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id {self.eos_token_id} is outside the vocabulary of {self.vocab_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def total_branches(self) -> int:
        return sum(self.branches)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["branches"] = list(self.branches)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class AggregationConfig:
    """How a layer fuses its branch outputs (see ``mbt_core.model.aggregate``)."""

    mode: str = "mean"
    # An output whose norm exceeds this many times the median norm of the layer is rejected.
    # Healthy branch outputs share the residual stream, so their norms stay within ~1.5x.
    norm_factor: float | None = 8.0
    trim_fraction: float = 0.25  # weight mass cut from each tail in ``trimmed`` mode
    modes: tuple[str, ...] = field(default=("mean", "trimmed", "median"), repr=False)

    def __post_init__(self) -> None:
        if self.mode not in self.modes:
            raise ValueError(f"aggregation mode must be one of {self.modes}, got {self.mode!r}")
        if self.norm_factor is not None and self.norm_factor <= 1.0:
            raise ValueError(f"norm_factor must be > 1 or None, got {self.norm_factor}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
