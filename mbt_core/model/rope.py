"""Rotary position embeddings as pretrained decoders define them.

Imported Llama, Qwen2 and GPT-NeoX checkpoints rotate queries and keys instead of adding learned
positions. The frequencies must match the checkpoint's to the last bit for imported logits to
equal the original model's, so this module reproduces the two schedules those configs use: the
default ``theta ** (-2i/d)`` and the Llama 3 rescaling of long wavelengths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """The rotary schedule of one model.

    ``rotary_dim`` is how many leading dimensions of each head rotate (GPT-NeoX rotates only a
    fraction of them); the llama3 fields are used only when ``rope_type`` is ``"llama3"``.
    """

    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            supported = ", ".join(ROPE_TYPES)
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported (supported: {supported})"
            )
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")
        if self.rope_type == "llama3" and not (
            self.factor > 0 and self.high_freq_factor > self.low_freq_factor > 0
        ):
            raise ValueError(
                "llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RopeConfig:
        return cls(**data)


def inverse_frequencies(config: RopeConfig) -> torch.Tensor:
    """One angular frequency per rotated pair, in float32 (what the checkpoints were trained on)."""
    exponents = torch.arange(0, config.rotary_dim, 2, dtype=torch.int64).to(torch.float32)
    inv_freq = 1.0 / (config.theta ** (exponents / config.rotary_dim))
    if config.rope_type == "llama3":
        inv_freq = _llama3_rescale(inv_freq, config)
    return inv_freq


def _llama3_rescale(inv_freq: torch.Tensor, config: RopeConfig) -> torch.Tensor:
    """Slow the long wavelengths by ``factor``, keep the short ones, blend in between."""
    old_context = config.original_max_position_embeddings
    low_freq_wavelen = old_context / config.low_freq_factor
    high_freq_wavelen = old_context / config.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / config.factor, inv_freq)
    smooth = (old_context / wavelen - config.low_freq_factor) / (
        config.high_freq_factor - config.low_freq_factor
    )
    blended = (1 - smooth) * scaled / config.factor + smooth * scaled
    between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(between, blended, scaled)


def rotary_tables(
    config: RopeConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` for ``positions`` (shape ``(..., T)``), shaped ``(..., T, rotary_dim)``.

    The angles are computed in float32 and only then cast, as the reference implementations do:
    computing them in bfloat16 would lose the position for any sequence longer than a few
    hundred tokens.
    """
    inv_freq = inverse_frequencies(config).to(positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    doubled = torch.cat((angles, angles), dim=-1)
    return doubled.cos().to(dtype), doubled.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading ``rotary_dim`` features of ``x`` (``(B, H, T, head_dim)``).

    ``cos``/``sin`` are ``(B, T, rotary_dim)``; pairs are (i, i + rotary_dim/2), the
    "rotate half" layout every supported checkpoint uses.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    turned = torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1)
    return torch.cat((rotated * cos + turned * sin, passed), dim=-1)
