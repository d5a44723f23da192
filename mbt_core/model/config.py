"""Model configuration: the one description a model is rebuilt from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from mbt_core.model.decoder import DecoderSpec

KINDS = ("block", "sliced")
STORAGE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an MBT language model.

    ``branches`` gives K for every layer, so layers may differ in width; ``n_layers`` must match
    its length (it is stored redundantly so that a config file reads naturally).

    ``kind`` says what a branch is. ``"block"`` branches are whole pre-LN transformer blocks
    (what ``mbt train`` makes, learned positions). ``"sliced"`` branches are width slices of an
    imported decoder, described by ``decoder``: per layer an attention slice, an MLP slice, or
    both side by side for parallel-residual models (see :meth:`layer_kind`). ``dtype`` is what
    the weights are stored and computed in.

    ``split`` says into how many equal width slices each layer's decoder width was cut (None:
    ``branches``). A sliced branch takes its heads, neurons and scale ``z = x + S * u(x)`` from
    ``S = split[l]``, so a layer may hold more branches than slices (``branches[l] >=
    split[l]``, every branch of one shape): what :func:`mbt_core.model.expand.expand_model`
    makes when it grows a layer by new branches. A block branch is a whole block whatever K
    is, so for ``"block"`` models split is validated but changes nothing.
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
    kind: str = "block"
    dtype: str = "float32"
    decoder: DecoderSpec | None = None
    split: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # JSON gives lists and objects; keep the dataclass hashable and comparable.
        object.__setattr__(self, "branches", tuple(int(k) for k in self.branches))
        if self.split is not None:
            if not isinstance(self.split, list | tuple):
                raise ValueError(f"split must list one slice count per layer, got {self.split!r}")
            object.__setattr__(self, "split", tuple(self.split))
        if isinstance(self.decoder, dict):
            object.__setattr__(self, "decoder", DecoderSpec.from_dict(self.decoder))
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}"
            )
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
        if len(self.branches) != self.n_layers:
            raise ValueError(
                f"branches lists {len(self.branches)} layers but n_layers is {self.n_layers}"
            )
        if any(k <= 0 for k in self.branches):
            raise ValueError(f"every layer needs at least one branch, got {self.branches}")
        self._check_split_field()
        if self.kind == "sliced":
            self._check_decoder()
        elif self.decoder is not None:
            raise ValueError("a decoder description belongs to a model of kind 'sliced'")
        elif self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id {self.eos_token_id} is outside the vocabulary of {self.vocab_size}"
            )

    def _check_decoder(self) -> None:
        spec = self.decoder
        if spec is None:
            raise ValueError("a model of kind 'sliced' needs its decoder description")
        shared = {
            "vocab_size": spec.vocab_size,
            "d_model": spec.d_model,
            "n_heads": spec.n_heads,
            "n_layers": spec.n_mbt_layers,
            "blocks_per_branch": 1,
        }
        for name, value in shared.items():
            if getattr(self, name) != value:
                raise ValueError(f"{name} is {getattr(self, name)} but the decoder's is {value}")
        if self.context_length > spec.context_length:
            raise ValueError(
                f"context_length {self.context_length} exceeds the decoder's "
                f"{spec.context_length} positions"
            )
        for k in set(self.split or self.branches):
            spec.check_split(k)

    def _check_split_field(self) -> None:
        if self.split is None:
            return
        if len(self.split) != self.n_layers:
            raise ValueError(
                f"split lists {len(self.split)} layers but n_layers is {self.n_layers}"
            )
        for li, (s, k) in enumerate(zip(self.split, self.branches, strict=True)):
            if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
                raise ValueError(f"split of layer {li} must be a positive integer, got {s!r}")
            if s > k:
                raise ValueError(f"layer {li} is split into {s} slices but holds {k} branches")

    @classmethod
    def sliced(
        cls, spec: DecoderSpec, branches: int, context_length: int, dtype: str, eos: int
    ) -> ModelConfig:
        """The MBT of decoder ``spec`` cut into ``branches`` per layer."""
        return cls(
            vocab_size=spec.vocab_size,
            d_model=spec.d_model,
            n_heads=spec.n_heads,
            context_length=context_length,
            n_layers=spec.n_mbt_layers,
            branches=(branches,) * spec.n_mbt_layers,
            eos_token_id=eos,
            kind="sliced",
            dtype=dtype,
            decoder=spec,
        )

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        """This shape over a vocabulary of ``vocab_size`` (a freshly trained tokenizer's)."""
        decoder = None if self.decoder is None else replace(self.decoder, vocab_size=vocab_size)
        return replace(self, vocab_size=vocab_size, decoder=decoder)

    def widened(self, d_model: int) -> ModelConfig:
        """This layout ``d_model`` wide, the heads kept (untrained, for payload-size benchmarks):
        a sliced model's head and MLP sizes scale with the width."""
        if d_model <= 0 or d_model % self.n_heads or (d_model // self.n_heads) % 2:
            raise ValueError(
                f"--d-model must be a positive multiple of {2 * self.n_heads} "
                f"(the {self.n_heads} heads, of an even dimension)"
            )
        spec = self.decoder
        if spec is None:
            return replace(self, d_model=d_model)
        head_dim = d_model // self.n_heads
        rope = None if spec.rope is None else replace(spec.rope, rotary_dim=head_dim)
        neurons = spec.intermediate_size * d_model // spec.d_model
        neurons -= neurons % max(self.split or self.branches)  # every slice an equal share
        decoder = replace(
            spec, d_model=d_model, head_dim=head_dim, intermediate_size=neurons, rope=rope
        )
        return replace(self, d_model=d_model, decoder=decoder)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.decoder is None else self.decoder.head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    @property
    def learned_positions(self) -> bool:
        """Whether the trunk adds position embeddings (otherwise attention rotates)."""
        return self.decoder is None or self.decoder.rope is None

    def layer_kind(self, layer: int) -> str:
        """What each branch of ``layer`` computes: ``block``, ``attention``, ``mlp`` or
        ``parallel`` (attention and MLP slices reading the same input)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.n_layers - 1}")
        if self.decoder is None:
            return "block"
        if self.decoder.parallel_residual:
            return "parallel"
        return "attention" if layer % 2 == 0 else "mlp"

    def slices(self, layer: int) -> int:
        """How many equal width slices ``layer``'s decoder width is cut into (``split``)."""
        return self.branches[layer] if self.split is None else self.split[layer]

    @property
    def total_branches(self) -> int:
        return sum(self.branches)

    def to_dict(self) -> dict[str, Any]:
        """Settings left at their defaults are omitted (kind, dtype, decoder, split) so that the
        configs of trained float32 models, and the manifests signed over them before those
        settings existed, keep their bytes."""
        data = asdict(self)
        data["branches"] = list(self.branches)
        for name in _OMITTED_AT_DEFAULT:
            if getattr(self, name) == ModelConfig.__dataclass_fields__[name].default:
                del data[name]
        if self.decoder is not None:
            data["decoder"] = self.decoder.to_dict()
        if self.split is not None:
            data["split"] = list(self.split)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


_OMITTED_AT_DEFAULT = ("kind", "dtype", "decoder", "split")


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
