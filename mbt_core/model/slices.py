"""Width slices of a pretrained decoder's sublayers: the branch kinds an exact import needs.

A pre-norm sublayer adds an update that is a sum over head groups (attention) or neuron groups
(MLP). Branch i of K holds group i and returns ``z_i = h + K * u_i(h)``; with every alpha 1/K
the MBT fusion ``sum_i z_i / K = h + sum_i u_i(h)`` is the dense sublayer exactly. Biases that
the dense sublayer adds once (the output projections') are stored divided by K in every slice,
so the sum adds them once and a missing branch renormalizes them like the rest.

:class:`SliceBlock` is what a branch of an imported model runs; :func:`split_attention` and
:func:`split_mlp` cut dense weights into slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbt_core.model.config import ModelConfig
from mbt_core.model.decoder import DecoderSpec
from mbt_core.model.kv import KVView
from mbt_core.model.rope import RopeConfig, rotary_tables, rotate

NORMS = ("layernorm", "rmsnorm")


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,  # GPT-2's name for the tanh approximation
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": F.silu,
}
ACTIVATIONS = tuple(_ACTIVATIONS)


class Norm(nn.Module):
    """LayerNorm (with or without bias) or RMSNorm, each as the checkpoints compute it.

    RMSNorm normalizes in float32 and casts back before the gain, as Llama and Qwen2 do; doing
    the gain in float32 too would change bfloat16 outputs in the last bit.
    """

    def __init__(self, d_model: int, kind: str, eps: float, bias: bool) -> None:
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"norm {kind!r} is not one of {', '.join(NORMS)}")
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        wide = x.to(torch.float32)
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * normed.to(x.dtype)
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class AttentionShape:
    """The heads one attention slice owns: whole KV groups and the query heads that share them."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool
    out_bias: bool
    rope: RopeConfig | None


class AttentionSlice(nn.Module):
    """Grouped-query causal attention over a slice of heads; returns this slice's update."""

    def __init__(self, shape: AttentionShape) -> None:
        super().__init__()
        if shape.n_heads % shape.n_kv_heads:
            raise ValueError(
                f"{shape.n_heads} query heads do not share {shape.n_kv_heads} KV heads evenly"
            )
        self.shape = shape
        inner, kv_inner = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
        self.q = nn.Linear(shape.d_model, inner, bias=shape.qkv_bias)
        self.k = nn.Linear(shape.d_model, kv_inner, bias=shape.qkv_bias)
        self.v = nn.Linear(shape.d_model, kv_inner, bias=shape.qkv_bias)
        self.o = nn.Linear(inner, shape.d_model, bias=shape.out_bias)

    def forward(self, x: Tensor, kv: KVView, index: int = 0) -> Tensor:
        """``x`` is the normed input ``(B, T, d)``; ``kv`` gives the rows' positions and holds
        the keys (only this slice's KV heads, rotated) under block ``index``."""
        shape, (batch, steps, _) = self.shape, x.shape
        q = self.q(x).view(batch, steps, shape.n_heads, shape.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, steps, shape.n_kv_heads, shape.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, steps, shape.n_kv_heads, shape.head_dim).transpose(1, 2)
        if shape.rope is not None:
            cos, sin = rotary_tables(shape.rope, kv.positions(steps, x.device), x.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = kv.attend(index, q, k, v, 0.0)
        update: Tensor = self.o(out.transpose(1, 2).reshape(batch, steps, -1))
        return update


@dataclass(frozen=True)
class MLPShape:
    d_model: int
    neurons: int
    activation: str
    gated: bool
    bias: bool


class MLPSlice(nn.Module):
    """A slice of neurons: ``down(act(up x))``, or ``down(act(gate x) * up x)`` when gated."""

    def __init__(self, shape: MLPShape) -> None:
        super().__init__()
        if shape.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {shape.activation!r} is not supported")
        self.shape = shape
        self.up = nn.Linear(shape.d_model, shape.neurons, bias=shape.bias)
        self.gate = (
            nn.Linear(shape.d_model, shape.neurons, bias=shape.bias) if shape.gated else None
        )
        self.down = nn.Linear(shape.neurons, shape.d_model, bias=shape.bias)

    def forward(self, x: Tensor) -> Tensor:
        act = _ACTIVATIONS[self.shape.activation]
        hidden = act(self.up(x)) if self.gate is None else act(self.gate(x)) * self.up(x)
        update: Tensor = self.down(hidden)
        return update


def dense_shapes(spec: DecoderSpec, k: int = 1) -> tuple[AttentionShape, MLPShape]:
    """The attention and MLP shapes of one of ``k`` slices (``k=1``: the dense sublayers)."""
    attention = AttentionShape(
        spec.d_model,
        spec.n_heads // k,
        spec.n_kv_heads // k,
        spec.head_dim,
        spec.qkv_bias,
        spec.out_bias,
        spec.rope,
    )
    mlp = MLPShape(
        spec.d_model, spec.intermediate_size // k, spec.activation, spec.gated_mlp, spec.mlp_bias
    )
    return attention, mlp


def layer_shapes(cfg: ModelConfig, layer: int) -> tuple[AttentionShape | None, MLPShape | None]:
    """The slice shapes one branch of ``layer`` holds (None where its kind has no such part):
    one of ``cfg.slices(layer)`` slices, which a grown layer has fewer of than branches."""
    kind = cfg.layer_kind(layer)
    if cfg.decoder is None:
        raise ValueError(f"layer {layer} of a {cfg.kind!r} model has no width slices")
    attention, mlp = dense_shapes(cfg.decoder, cfg.slices(layer))
    return (
        attention if kind in ("attention", "parallel") else None,
        mlp if kind in ("mlp", "parallel") else None,
    )


class SliceBlock(nn.Module):
    """One branch of an imported layer: ``z = x + S * u(x)``, S the layer's slice count
    (``cfg.slices``: K unless the layer was grown by new branches, which keeps S so that the
    old branches compute exactly what they did).

    ``u`` is this branch's attention slice update, MLP slice update, or (parallel residual)
    both read from the same ``x``, each behind its own norm, as the dense block computes them.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        spec = cfg.decoder
        assert spec is not None  # layer_shapes refuses block models first
        attention, mlp = layer_shapes(cfg, layer)
        self.scale = float(cfg.slices(layer))

        def norm() -> Norm:
            return Norm(spec.d_model, spec.norm, spec.norm_eps, spec.norm_bias)

        self.attn_norm = norm() if attention else None
        self.attn = AttentionSlice(attention) if attention else None
        self.mlp_norm = norm() if mlp else None
        self.mlp = MLPSlice(mlp) if mlp else None

    @property
    def kv_heads(self) -> int:
        return 0 if self.attn is None else self.attn.shape.n_kv_heads

    def forward(self, x: Tensor, kv: KVView, index: int) -> Tensor:
        update: Tensor | None = None
        if self.attn is not None and self.attn_norm is not None:
            update = self.attn(self.attn_norm(x), kv, index)
        if self.mlp is not None and self.mlp_norm is not None:
            m = self.mlp(self.mlp_norm(x))
            update = m if update is None else update + m
        assert update is not None
        return x + self.scale * update


@dataclass(frozen=True)
class DenseAttention:
    """A dense attention's weights in ``nn.Linear`` layout (out, in), heads contiguous."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    o_bias: Tensor | None = None


@dataclass(frozen=True)
class DenseMLP:
    up: Tensor
    down: Tensor
    gate: Tensor | None = None
    up_bias: Tensor | None = None
    gate_bias: Tensor | None = None
    down_bias: Tensor | None = None


def split_attention(dense: DenseAttention, part: AttentionShape, k: int) -> list[AttentionSlice]:
    """K slices of whole KV groups, each of shape ``part`` (:func:`dense_shapes` with K)."""
    if dense.k.shape[0] != k * part.n_kv_heads * part.head_dim:
        raise ValueError(f"{k} slices of {part.n_kv_heads} KV heads do not cover this attention")
    q_rows, kv_rows = part.n_heads * part.head_dim, part.n_kv_heads * part.head_dim
    slices = []
    for i in range(k):
        piece = AttentionSlice(part).to(dense.q.dtype)
        with torch.no_grad():
            _take(piece.q, dense.q, dense.q_bias, i, q_rows)
            _take(piece.k, dense.k, dense.k_bias, i, kv_rows)
            _take(piece.v, dense.v, dense.v_bias, i, kv_rows)
            piece.o.weight.copy_(dense.o[:, i * q_rows : (i + 1) * q_rows])
            if piece.o.bias is not None and dense.o_bias is not None:
                piece.o.bias.copy_(dense.o_bias / k)
        slices.append(piece)
    return slices


def split_mlp(dense: DenseMLP, part: MLPShape, k: int) -> list[MLPSlice]:
    """K slices of ``part.neurons`` contiguous neurons each; the down projection's bias is
    shared out 1/K each."""
    rows = part.neurons
    if dense.up.shape[0] != k * rows:
        raise ValueError(f"{k} slices of {rows} neurons do not cover this MLP")
    slices = []
    for i in range(k):
        piece = MLPSlice(part).to(dense.up.dtype)
        with torch.no_grad():
            _take(piece.up, dense.up, dense.up_bias, i, rows)
            if piece.gate is not None and dense.gate is not None:
                _take(piece.gate, dense.gate, dense.gate_bias, i, rows)
            piece.down.weight.copy_(dense.down[:, i * rows : (i + 1) * rows])
            if piece.down.bias is not None and dense.down_bias is not None:
                piece.down.bias.copy_(dense.down_bias / k)
        slices.append(piece)
    return slices


def _take(linear: nn.Linear, weight: Tensor, bias: Tensor | None, i: int, rows: int) -> None:
    linear.weight.copy_(weight[i * rows : (i + 1) * rows])
    if linear.bias is not None and bias is not None:
        linear.bias.copy_(bias[i * rows : (i + 1) * rows])
