"""One branch of an MBT layer: pre-LN causal transformer blocks with an incremental KV cache.

A branch is self-contained (it reads the layer input ``h`` and returns its output ``z``,
residual included) so that a node can host it without the rest of the model. Positions are
added by the trunk's embedding, so a branch needs no position index, only its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from mbt_core.config import ModelConfig
from mbt_core.errors import MbtError


@dataclass
class BranchCache:
    """Keys and values of every block of one branch for one batch of sequences.

    Each block's keys and values live in a buffer that grows by doubling; only the first
    ``length`` positions are valid. A forward writes past ``length`` and the branch advances
    ``length`` once every block succeeded, so a failed forward leaves the cache as it was, and
    a rollback (:meth:`truncate`) copies nothing.
    """

    keys: list[Tensor | None] = field(default_factory=list)  # per block: (B, nh, capacity, hs)
    values: list[Tensor | None] = field(default_factory=list)
    length: int = 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a rollback before recomputing)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def extend(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write block ``i``'s new keys/values (B, nh, T, hs) after the valid positions and
        return views of all of them, (B, nh, length + T, hs)."""
        end = self.length + k.shape[2]
        buf_k, buf_v = self.keys[i], self.values[i]
        if buf_k is None or buf_v is None or buf_k.shape[2] < end:
            capacity = max(end, 2 * (0 if buf_k is None else buf_k.shape[2]), 16)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if buf_k is not None and buf_v is not None:
                new_k[:, :, : self.length] = buf_k[:, :, : self.length]
                new_v[:, :, : self.length] = buf_v[:, :, : self.length]
            self.keys[i], self.values[i] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]


class _UniformKV:
    """Keys and values for a batch whose rows all sit at the same positions (training, and
    in-process decoding), with an optional cache."""

    def __init__(self, cache: BranchCache | None) -> None:
        self.cache = cache

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        if self.cache is not None:
            k, v = self.cache.extend(i, k, v)  # (B, nh, L+T, hs)
        t, offset = q.shape[2], k.shape[2] - q.shape[2]
        if offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        if t == 1:  # one query at the newest position (a decode step): it sees every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        # Query i sits at absolute position offset + i and sees keys 0..offset + i.
        rows = torch.arange(t, device=q.device)[:, None] + offset
        allowed = torch.arange(offset + t, device=q.device)[None, :] <= rows  # (T, L+T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)


class _RaggedKV:
    """Keys and values for a padded batch of sessions, each with its own cache and length.

    Row s holds ``lengths[s]`` new positions (the rest is padding) that follow the
    ``caches[s].length`` cached ones; each session's cache is extended with its real rows only.
    """

    def __init__(self, caches: list[BranchCache], lengths: list[int], device: torch.device) -> None:
        self.caches, self.lengths = caches, lengths
        starts = torch.tensor([c.length for c in caches], device=device)
        t_max = max(lengths)
        ends = starts + torch.tensor(lengths, device=device)
        keys = torch.arange(int(ends.max()), device=device)  # (S,)
        query_pos = starts[:, None] + torch.arange(t_max, device=device)[None, :]  # (B, T)
        # A padded query row still sees key 0, so no row is fully masked (no NaN).
        self.mask = (keys[None, None, :] <= query_pos[:, :, None]) & (
            keys[None, None, :] < ends[:, None, None]
        )
        self.mask = self.mask[:, None]  # (B, 1, T, S)

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        ks, vs = [], []
        for s, (cache, t) in enumerate(zip(self.caches, self.lengths, strict=True)):
            k_s, v_s = cache.extend(i, k[s : s + 1, :, :t], v[s : s + 1, :, :t])
            ks.append(k_s[0].transpose(0, 1))  # (L_s+T_s, nh, hs)
            vs.append(v_s[0].transpose(0, 1))
        k_pad = pad_sequence(ks, batch_first=True).permute(0, 2, 1, 3)  # (B, nh, S, hs)
        v_pad = pad_sequence(vs, batch_first=True).permute(0, 2, 1, 3)
        return F.scaled_dot_product_attention(
            q, k_pad, v_pad, attn_mask=self.mask, dropout_p=dropout
        )


_KV = _UniformKV | _RaggedKV


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, kv: _KV, index: int) -> Tensor:
        b, t, c = x.shape
        nh, hs = self.n_heads, c // self.n_heads
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(b, t, nh, hs).transpose(1, 2)
        v = v.view(b, t, nh, hs).transpose(1, 2)
        y = kv.attend(index, q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

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

    def forward(self, x: Tensor, kv: _KV, index: int) -> Tensor:
        if self.training and self.drop.p > 0:
            x = x + self.drop(self.attn(self.ln1(x), kv, index))
            return x + self.drop(self.mlp(self.ln2(x)))
        # Inference: dropout is the identity, and calling it costs as much as a small op.
        x = x + self.attn(self.ln1(x), kv, index)
        return x + self.mlp(self.ln2(x))


class Branch(nn.Module):
    """``blocks_per_branch`` blocks in sequence; callable alone, as a node hosts it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks_per_branch))

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
        out = self._run(h, _UniformKV(cache))
        if cache is not None:
            cache.length += h.shape[1]  # every block succeeded
        return out

    def forward_ragged(
        self, packed: Tensor, caches: list[BranchCache], lengths: list[int]
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
            return self.forward(packed[None], caches[0])[0]
        rows = pad_sequence(list(packed.split(lengths)), batch_first=True)  # (B, T, C)
        out = self._run(rows, _RaggedKV(caches, lengths, packed.device))
        for cache, t in zip(caches, lengths, strict=True):
            cache.length += t  # every block succeeded
        return torch.cat([out[s, :t] for s, t in enumerate(lengths)])  # (N, C)

    def _run(self, x: Tensor, kv: _KV) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, kv, i)
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
