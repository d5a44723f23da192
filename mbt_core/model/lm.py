"""The MBT language model: embeddings, MBT layers of parallel branches, final norm, LM head.

The trunk (``embed`` and ``logits``) and each branch are callable on their own: the aggregator
gateway runs the trunk and fuses, the nodes run the branches; :func:`aggregate` is the seam.
An imported decoder's trunk may lack position embeddings (rotary models), use RMSNorm, and
have an LM head of its own (untied); the config says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbt_core.errors import MbtError
from mbt_core.model.aggregate import Aggregated, aggregate
from mbt_core.model.blocks import Branch, Modules
from mbt_core.model.config import AggregationConfig, ModelConfig
from mbt_core.model.kv import BranchCache
from mbt_core.model.slices import Norm


@dataclass
class ModelCache:
    """Per-layer, per-branch KV caches of one batch of sequences, plus the shared length."""

    layers: list[list[BranchCache]]
    length: int = 0


@dataclass
class StepInfo:
    """What each layer's branches did in one forward: used, masked, rejected, and weights."""

    layers: list[Aggregated] = field(default_factory=list)


class MBTLayer(nn.Module):
    """K parallel branches and their aggregation weights ``alpha = softmax(alpha_logits)``."""

    def __init__(self, cfg: ModelConfig, n_branches: int, layer: int = 0) -> None:
        super().__init__()
        self.branches: Modules[Branch] = Modules(Branch(cfg, layer) for _ in range(n_branches))
        self.alpha_logits = nn.Parameter(torch.zeros(n_branches))

    def weights(self) -> Tensor:
        return torch.softmax(self.alpha_logits, dim=0)

    def forward(
        self,
        h: Tensor,
        mask: Tensor | None = None,
        caches: list[BranchCache] | None = None,
        aggregation: AggregationConfig | None = None,
    ) -> Aggregated:
        """Run every unmasked branch on ``h`` (B, T, C) and fuse their outputs.

        ``mask`` is (K,) for the whole batch, or (K, B) per sequence. With a (K,) mask, masked
        branches are not computed at all (their cache, if any, is not advanced).
        ``aggregation=None`` means plain weighted mean without output rejection (training).
        """
        k = len(self.branches)
        if mask is not None and mask.shape not in ((k,), (k, h.shape[0])):
            raise ValueError(
                f"layer mask must have shape ({k},) or ({k}, {h.shape[0]}), got {tuple(mask.shape)}"
            )
        if mask is not None and mask.dim() == 2:
            mask = mask[:, :, None].expand(k, h.shape[0], h.shape[1])  # (K, B, T) rows
        outputs = []
        for i, branch in enumerate(self.branches):
            if mask is not None and not bool(mask[i].any()):
                outputs.append(torch.zeros_like(h))
                continue
            outputs.append(branch(h, None if caches is None else caches[i]))
        # Half-precision models fuse in float32 and round once, as the gateway does (it
        # fuses what nodes send in float32): the two then agree bit for bit.
        stacked = torch.stack(outputs).float()  # (K, B, T, C)
        if aggregation is None:
            fused = aggregate(stacked, self.weights(), mask, "mean", norm_factor=None)
        else:
            fused = aggregate(
                stacked,
                self.weights(),
                mask,
                aggregation.mode,
                norm_factor=aggregation.norm_factor,
                trim_fraction=aggregation.trim_fraction,
            )
        if fused.output.dtype == h.dtype:
            return fused
        return replace(fused, output=fused.output.to(h.dtype))


def init_weights(module: nn.Module, cfg: ModelConfig, gen: torch.Generator | None = None) -> None:
    """GPT-2 style: N(0, 0.02), residual projections scaled down by the residual depth; norms
    keep their ones. Works on a whole model or one branch (``mbt expand --init fresh``)."""
    depth = cfg.n_layers * cfg.blocks_per_branch
    for name, p in module.named_parameters():
        if name.endswith("alpha_logits"):
            continue
        if p.dim() >= 2:
            std = (
                0.02 / math.sqrt(2 * depth)
                if name.endswith(("proj.weight", "2.weight", ".o.weight", ".down.weight"))
                else 0.02
            )
            nn.init.normal_(p, mean=0.0, std=std, generator=gen)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class MBTLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.learned_positions else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.layers: Modules[MBTLayer] = Modules(
            MBTLayer(cfg, k, li) for li, k in enumerate(cfg.branches)
        )
        spec = cfg.decoder
        self.ln_f: nn.Module = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
            if spec is None
            else Norm(cfg.d_model, spec.norm, spec.norm_eps, spec.norm_bias)
        )
        untied = spec is not None and not spec.tied_embeddings
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if untied else None
        self._init_weights()
        if cfg.torch_dtype != torch.float32:
            self.to(cfg.torch_dtype)

    def _init_weights(self) -> None:
        init_weights(self, self.cfg)

    def new_cache(self) -> ModelCache:
        return ModelCache(layers=[[b.new_cache() for b in layer.branches] for layer in self.layers])

    def embed(self, idx: Tensor, start: int = 0) -> Tensor:
        """Token + position embeddings of ``idx`` (B, T) at positions ``start..start+T``."""
        t = idx.shape[1]
        if start + t > self.cfg.context_length:
            raise MbtError(
                f"positions {start}..{start + t} exceed "
                f"the context length {self.cfg.context_length}"
            )
        h: Tensor = self.tok_emb(idx)
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(start, start + t, device=idx.device))
        out: Tensor = self.drop(h)  # (B, T, C)
        return out

    def logits(self, h: Tensor) -> Tensor:
        """Final norm and LM head (tied to the token embedding unless the model has its own)."""
        head = self.tok_emb.weight if self.head is None else self.head.weight
        return F.linear(self.ln_f(h), head)  # (B, T, V)

    def forward(
        self,
        idx: Tensor,
        masks: list[Tensor | None] | None = None,
        cache: ModelCache | None = None,
        aggregation: AggregationConfig | None = None,
        info: StepInfo | None = None,
    ) -> Tensor:
        """Logits for ``idx`` (B, T); with ``cache``, ``idx`` continues the cached positions.

        ``masks[l]`` (K_l,) bools removes branches of layer l; ``info`` collects per-layer
        aggregation results when given.
        """
        if masks is not None and len(masks) != self.cfg.n_layers:
            raise ValueError(f"expected {self.cfg.n_layers} layer masks, got {len(masks)}")
        start = 0 if cache is None else cache.length
        h = self.embed(idx, start)
        for li, layer in enumerate(self.layers):
            result = layer(
                h,
                None if masks is None else masks[li],
                None if cache is None else cache.layers[li],
                aggregation,
            )
            h = result.output
            if info is not None:
                info.layers.append(result)
        if cache is not None:
            cache.length = start + idx.shape[1]
        return self.logits(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
