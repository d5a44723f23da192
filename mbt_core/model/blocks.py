"""One branch of an MBT layer: pre-LN causal transformer blocks with an incremental KV cache.

A branch is self-contained (it reads the layer input ``h`` and returns its output ``z``,
residual included) so that a node can host it without the rest of the model. Learned positions
are added by the trunk's embedding; rotary ones are taken from the cache's length (the KV
views of :mod:`mbt_core.model.kv`), so a branch needs no position index either way. A branch
of a ``sliced`` model holds one :class:`~mbt_core.model.slices.SliceBlock` instead of blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from mbt_core.errors import MbtError
from mbt_core.model.config import ModelConfig
from mbt_core.model.kv import BranchCache, KVView, RaggedKV, UniformKV
from mbt_core.model.slices import SliceBlock

M = TypeVar("M", bound=nn.Module)


class Modules(nn.ModuleList, Generic[M]):
    """An ``nn.ModuleList`` that says what it holds, so that ``model.layers[i].branches[b]``
    is typed; the state dict and everything else are a plain ``ModuleList``'s."""

    def __iter__(self) -> Iterator[M]:
        return cast(Iterator[M], super().__iter__())

    @overload
    def __getitem__(self, idx: slice) -> Modules[M]: ...

    @overload
    def __getitem__(self, idx: int) -> M: ...

    def __getitem__(self, idx: int | slice) -> M | Modules[M]:
        return cast("M | Modules[M]", super().__getitem__(idx))


class CausalSelfAttention(nn.Module):
    """Holds the attention's parameters; :class:`Block` runs the math (see :func:`_attend`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, kv: KVView, index: int) -> Tensor:
        dropout = self.dropout if self.training else 0.0
        qkv, proj = self.qkv, self.proj
        return _attend(
            x, qkv.weight, qkv.bias, proj.weight, proj.bias, self.n_heads, kv, index, dropout
        )


def _attend(
    x: Tensor,
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    heads: int,
    kv: KVView,
    index: int,
    dropout: float,
) -> Tensor:
    """Causal self-attention of ``x`` (B, T, C) over ``kv``'s keys and values."""
    b, t, c = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).view(b, t, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
    y = kv.attend(index, q, k, v, dropout)
    y = y.transpose(1, 2).reshape(b, t, c)  # (B, T, C)
    return F.linear(y, proj_w, proj_b)


class _Weights(NamedTuple):
    """A block's parameters (and settings) gathered in one tuple."""

    ln1: tuple[tuple[int, ...], Tensor, Tensor, float]  # normalized shape, weight, bias, eps
    qkv_w: Tensor
    qkv_b: Tensor
    proj_w: Tensor
    proj_b: Tensor
    heads: int
    ln2: tuple[tuple[int, ...], Tensor, Tensor, float]
    fc_w: Tensor
    fc_b: Tensor
    approximate: str  # the GELU's
    out_w: Tensor
    out_b: Tensor


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    The forward applies the functional ops to the parameters, gathered once in a tuple: on a
    one-token decode step, calling nine modules and looking up their parameters through
    nn.Module's attributes costs a fifth of the whole step. The submodules stay, so the
    parameters keep their names in checkpoints and artifacts. The tuple holds the Parameter
    objects themselves (in-place updates, optimizer steps and ``load_state_dict`` show through)
    and is rebuilt after ``to()`` and ``load_state_dict``, which may replace them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def _apply(self, fn: Any, recurse: bool = True) -> Block:
        self.__dict__.pop("_gathered", None)
        return cast(Block, super()._apply(fn, recurse))  # type: ignore[no-untyped-call]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_gathered", None)  # load_state_dict(assign=True) swaps parameters
        super()._load_from_state_dict(*args, **kwargs)

    def _weights(self) -> _Weights:
        """The gathered parameters, gathered now if they are not."""
        gathered = self.__dict__.get("_gathered")
        if gathered is None:
            ln1, attn, ln2 = self.ln1, self.attn, self.ln2
            fc, act, out = cast(tuple[nn.Linear, nn.GELU, nn.Linear], tuple(self.mlp))
            gathered = _Weights(
                (ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps),
                attn.qkv.weight,
                attn.qkv.bias,
                attn.proj.weight,
                attn.proj.bias,
                attn.n_heads,
                (ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps),
                fc.weight,
                fc.bias,
                act.approximate,
                out.weight,
                out.bias,
            )
            self.__dict__["_gathered"] = gathered  # a plain attribute, not a registered one
        return gathered

    def forward(self, x: Tensor, kv: KVView, index: int) -> Tensor:
        w = self._weights()
        p = self.drop.p if self.training else 0.0  # at inference dropout is the identity
        h = F.layer_norm(x, *w.ln1)
        a = _attend(h, w.qkv_w, w.qkv_b, w.proj_w, w.proj_b, w.heads, kv, index, p)
        x = x + (F.dropout(a, p, True) if p > 0 else a)
        h = F.gelu(F.linear(F.layer_norm(x, *w.ln2), w.fc_w, w.fc_b), approximate=w.approximate)
        m = F.linear(h, w.out_w, w.out_b)
        return x + (F.dropout(m, p, True) if p > 0 else m)


class Branch(nn.Module):
    """``blocks_per_branch`` blocks in sequence (or one slice block of an imported layer);
    callable alone, as a node hosts it. ``layer`` matters only to sliced models, whose
    layers alternate kinds and may differ in width."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks: Modules[Block | SliceBlock] = Modules(
            SliceBlock(cfg, layer) if cfg.kind == "sliced" else Block(cfg)
            for _ in range(cfg.blocks_per_branch)
        )
        if cfg.torch_dtype != torch.float32:
            self.to(cfg.torch_dtype)

    def kv_heads(self) -> tuple[int, int]:
        """``(heads, head_dim)`` of the keys this branch caches per block (0 heads: none)."""
        first = self.blocks[0]
        heads = first.kv_heads if isinstance(first, SliceBlock) else self.cfg.n_heads
        return heads, self.cfg.head_dim

    def new_cache(self) -> BranchCache:
        n = len(self.blocks)
        return BranchCache(keys=[None] * n, values=[None] * n)

    def forward(self, h: Tensor, cache: BranchCache | None = None) -> Tensor:
        """Map the layer input ``h`` (B, T, C) to the branch output ``z`` (B, T, C).

        With a cache, ``h`` holds the T positions that follow the cached ones, and the cache is
        extended in place: a prefill of T tokens, then one-token steps.
        """
        self._check_input(h, 3)
        if cache is not None:
            self._check_room(cache, h.shape[1])
        out = self._run(h, UniformKV(cache))
        if cache is not None:
            cache.length += h.shape[1]  # every block succeeded
        return out

    def forward_ragged(
        self, packed: Tensor, caches: Sequence[BranchCache], lengths: list[int]
    ) -> Tensor:
        """Run many sessions at once: ``packed`` (sum(lengths), C) holds each session's new
        positions in order; each continues its own cache. Returns outputs in the same packing.
        """
        self._check_input(packed, 2)
        if len(caches) != len(lengths) or not caches:
            raise ValueError(f"need one length per cache, got {len(lengths)} for {len(caches)}")
        if any(t <= 0 for t in lengths) or sum(lengths) != packed.shape[0]:
            raise ValueError(f"lengths {lengths} do not pack {packed.shape[0]} positions")
        for cache, t in zip(caches, lengths, strict=True):
            self._check_room(cache, t)
        if len(caches) == 1:  # nothing to pad: the plain cached path, bit for bit the same
            out = self._run(packed[None], UniformKV(caches[0]))[0]
            caches[0].length += lengths[0]  # every block succeeded
            return out
        t = lengths[0]
        uniform = all(n == t for n in lengths)  # decode steps: one position each, no padding
        if uniform:
            rows = packed.view(len(lengths), t, packed.shape[1])  # (B, T, C)
        else:
            rows = pad_sequence(list(torch.split(packed, lengths)), batch_first=True)
        out = self._run(rows, RaggedKV(caches, lengths, packed.device))
        for cache, n in zip(caches, lengths, strict=True):
            cache.length += n  # every block succeeded
        if uniform:
            return out.reshape(packed.shape)
        return torch.cat([out[s, :n] for s, n in enumerate(lengths)])  # (N, C)

    def _run(self, x: Tensor, kv: KVView) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block.forward(x, kv, i)
        return x

    def _check_input(self, h: Tensor, rank: int) -> None:
        if h.dim() != rank or h.shape[-1] != self.cfg.d_model:
            want = "(B, T, C)" if rank == 3 else "(N, C)"
            raise ValueError(
                f"branch input must have shape {want} with C={self.cfg.d_model}, "
                f"got {tuple(h.shape)}"
            )

    def _check_room(self, cache: BranchCache, new: int) -> None:
        if cache.length + new > self.cfg.context_length:
            raise MbtError(
                f"{cache.length} cached + {new} new positions exceed the context length "
                f"{self.cfg.context_length}"
            )
