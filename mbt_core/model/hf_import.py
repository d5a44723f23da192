"""Import a local Hugging Face decoder as an exact width-split MBT model.

Each family's tensor names and layouts are read into one family-neutral :class:`DenseBlock` per
transformer block (weights in ``nn.Linear`` layout, heads contiguous), which
:mod:`mbt_core.model.slices` cuts into K branches. Sequential blocks become an attention layer
and an MLP layer; parallel-residual blocks one layer. Tensors keep their dtype unless one is
asked for, and are read one block at a time from memory-mapped files: ``transformers`` is not
needed, and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from torch import Tensor

from mbt_core.model.checkpoint import Checkpoint, check_state
from mbt_core.model.config import ModelConfig
from mbt_core.model.decoder import DecoderSpec, UnsupportedModel
from mbt_core.model.hf_config import read_spec
from mbt_core.model.hf_weights import HFWeights
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.slices import (
    DenseAttention,
    DenseMLP,
    dense_shapes,
    split_attention,
    split_mlp,
)
from mbt_core.model.tokenizer import EOS, Tokenizer, vocabulary_problem

TOKENIZER_FILE = "tokenizer.json"
NormWeights = tuple[Tensor, Tensor | None]


@dataclass(frozen=True)
class DenseBlock:
    """One transformer block's weights, family-neutral."""

    attn_norm: NormWeights
    attention: DenseAttention
    mlp_norm: NormWeights
    mlp: DenseMLP


@dataclass(frozen=True)
class DenseTrunk:
    embed: Tensor
    positions: Tensor | None  # learned position embeddings (GPT-2)
    final_norm: NormWeights
    head: Tensor | None  # None: tied to ``embed``


class _Reader:
    """Named tensors of one checkpoint, cast to the import dtype as they are read."""

    def __init__(self, weights: HFWeights, dtype: torch.dtype) -> None:
        self.weights, self.dtype = weights, dtype

    def __call__(self, name: str) -> Tensor:
        return self.weights.get(name).to(self.dtype)

    def optional(self, name: str) -> Tensor | None:
        return self(name) if name in self.weights else None

    def norm(self, prefix: str) -> NormWeights:
        return self(prefix + ".weight"), self.optional(prefix + ".bias")

    def linear(self, prefix: str) -> tuple[Tensor, Tensor | None]:
        return self(prefix + ".weight"), self.optional(prefix + ".bias")


def _llama_block(r: _Reader, spec: DecoderSpec, n: int) -> DenseBlock:
    p = f"model.layers.{n}."
    q, k, v, o = (r.linear(f"{p}self_attn.{x}_proj") for x in "qkvo")
    gate, up, down = (r.linear(f"{p}mlp.{x}_proj") for x in ("gate", "up", "down"))
    return DenseBlock(
        r.norm(p + "input_layernorm"),
        DenseAttention(q[0], k[0], v[0], o[0], q[1], k[1], v[1], o[1]),
        r.norm(p + "post_attention_layernorm"),
        DenseMLP(up[0], down[0], gate[0], up[1], gate[1], down[1]),
    )


def _llama_trunk(r: _Reader, spec: DecoderSpec) -> DenseTrunk:
    head = None if spec.tied_embeddings else r("lm_head.weight")
    return DenseTrunk(r("model.embed_tokens.weight"), None, r.norm("model.norm"), head)


def _gpt2_prefix(r: _Reader) -> str:
    """Checkpoints saved by ``GPT2LMHeadModel`` prefix ``transformer.``; the original ones not."""
    return "transformer." if "transformer.wte.weight" in r.weights else ""


def _gpt2_block(r: _Reader, spec: DecoderSpec, n: int) -> DenseBlock:
    """GPT-2 stores Conv1D weights as (in, out): transposed into Linear layout."""
    p = f"{_gpt2_prefix(r)}h.{n}."
    d = spec.d_model
    qkv_w, qkv_b = r(p + "attn.c_attn.weight").t(), r(p + "attn.c_attn.bias")
    q, k, v = qkv_w[:d], qkv_w[d : 2 * d], qkv_w[2 * d :]
    qb, kb, vb = qkv_b[:d], qkv_b[d : 2 * d], qkv_b[2 * d :]
    o, ob = r(p + "attn.c_proj.weight").t(), r(p + "attn.c_proj.bias")
    return DenseBlock(
        r.norm(p + "ln_1"),
        DenseAttention(q, k, v, o, qb, kb, vb, ob),
        r.norm(p + "ln_2"),
        DenseMLP(
            r(p + "mlp.c_fc.weight").t(),
            r(p + "mlp.c_proj.weight").t(),
            up_bias=r(p + "mlp.c_fc.bias"),
            down_bias=r(p + "mlp.c_proj.bias"),
        ),
    )


def _gpt2_trunk(r: _Reader, spec: DecoderSpec) -> DenseTrunk:
    p = _gpt2_prefix(r)
    head = None if spec.tied_embeddings else r("lm_head.weight")
    return DenseTrunk(r(p + "wte.weight"), r(p + "wpe.weight"), r.norm(p + "ln_f"), head)


def _neox_block(r: _Reader, spec: DecoderSpec, n: int) -> DenseBlock:
    """NeoX interleaves its fused projection per head: rows are (head, [q, k, v], head_dim)."""
    p = f"gpt_neox.layers.{n}."
    heads, hd = spec.n_heads, spec.head_dim
    w, b = r.linear(p + "attention.query_key_value")
    w = w.view(heads, 3, hd, -1)
    q, k, v = (w[:, j].reshape(heads * hd, -1) for j in range(3))
    qb = kb = vb = None
    if b is not None:
        qb, kb, vb = (b.view(heads, 3, hd)[:, j].reshape(-1) for j in range(3))
    o, ob = r.linear(p + "attention.dense")
    up, upb = r.linear(p + "mlp.dense_h_to_4h")
    down, downb = r.linear(p + "mlp.dense_4h_to_h")
    return DenseBlock(
        r.norm(p + "input_layernorm"),
        DenseAttention(q, k, v, o, qb, kb, vb, ob),
        r.norm(p + "post_attention_layernorm"),
        DenseMLP(up, down, up_bias=upb, down_bias=downb),
    )


def _neox_trunk(r: _Reader, spec: DecoderSpec) -> DenseTrunk:
    head = None if spec.tied_embeddings else r("embed_out.weight")
    return DenseTrunk(
        r("gpt_neox.embed_in.weight"), None, r.norm("gpt_neox.final_layer_norm"), head
    )


_FAMILIES: dict[
    str,
    tuple[
        Callable[[_Reader, DecoderSpec, int], DenseBlock],
        Callable[[_Reader, DecoderSpec], DenseTrunk],
    ],
] = {
    "gpt2": (_gpt2_block, _gpt2_trunk),
    "gpt_neox": (_neox_block, _neox_trunk),
    "llama": (_llama_block, _llama_trunk),
    "qwen2": (_llama_block, _llama_trunk),
}


@dataclass(frozen=True)
class ImportOptions:
    branches: int
    dtype: str | None = None  # None: the checkpoint's own
    context_length: int | None = None  # None: the model's, capped at MAX_DEFAULT_CONTEXT


# A node keeps a whole context window of keys per session: a 128k default would reserve
# gigabytes per session of a small model. Longer windows are one flag away.
MAX_DEFAULT_CONTEXT = 4096


def import_decoder(
    folder: Path, options: ImportOptions, progress: Callable[[int, int], None] | None = None
) -> Checkpoint:
    """The MBT model (in-process, on the CPU) of the decoder in ``folder``.

    ``progress(done, total)`` is called after each block. Every refusal is an
    :class:`UnsupportedModel` with one line that names the reason.
    """
    if not folder.is_dir():
        raise UnsupportedModel(f"{folder} is not a folder")
    spec = read_spec(folder)
    spec.check_split(options.branches)
    block_of, trunk_of = _FAMILIES[spec.model_type]
    tokenizer = _tokenizer(folder, spec)
    with HFWeights(folder) as weights:
        dtype = _dtype(options.dtype, weights)
        cfg = _config(spec, options, dtype, tokenizer.eos_id)
        reader = _Reader(weights, dtype)
        state: dict[str, Tensor] = {}
        state.update(_trunk_state(trunk_of(reader, spec), cfg))
        for n in range(spec.n_blocks):
            state.update(_block_state(block_of(reader, spec, n), spec, cfg, n))
            if progress is not None:
                progress(n + 1, spec.n_blocks)
    with torch.device("meta"):
        model = MBTLanguageModel(cfg)
    for li, k in enumerate(cfg.branches):
        state[f"layers.{li}.alpha_logits"] = torch.zeros(k, dtype=dtype)  # alpha = 1/K
    check_state(model, state, str(folder))
    model.load_state_dict(state, strict=True, assign=True)
    info = {
        "imported_from": spec.model_type,
        "source": folder.name,
        "branches": str(options.branches),
    }
    return Checkpoint(model=model.eval(), tokenizer=tokenizer, info=info)


def _dtype(name: str | None, weights: HFWeights) -> torch.dtype:
    if name is None:
        return weights.dtype()
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UnsupportedModel(f"--dtype {name!r} is not a floating-point dtype")
    return dtype


def _config(spec: DecoderSpec, options: ImportOptions, dtype: torch.dtype, eos: int) -> ModelConfig:
    context = options.context_length or min(spec.context_length, MAX_DEFAULT_CONTEXT)
    if context > spec.context_length:
        raise UnsupportedModel(
            f"--context-length {context} exceeds the model's {spec.context_length} positions"
        )
    name = str(dtype).removeprefix("torch.")
    try:
        return ModelConfig.sliced(spec, options.branches, context, name, eos)
    except ValueError as exc:
        raise UnsupportedModel(str(exc)) from None


def _tokenizer(folder: Path, spec: DecoderSpec) -> Tokenizer:
    path = folder / TOKENIZER_FILE
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # the backend raises plain Exception subclasses
        raise UnsupportedModel(f"cannot read {path}: {exc}") from None
    eos = spec.eos_token_id if spec.eos_token_id is not None else backend.token_to_id(EOS)
    if eos is None or not 0 <= eos < spec.vocab_size:
        raise UnsupportedModel(
            f"{folder}: config.json names no end-of-text token inside the vocabulary (eos_token_id)"
        )
    tokenizer = Tokenizer(backend, eos)
    problem = vocabulary_problem(tokenizer, spec.vocab_size, padded=True)
    if problem:
        raise UnsupportedModel(f"{path}: {problem}")
    return tokenizer


def _trunk_state(trunk: DenseTrunk, cfg: ModelConfig) -> dict[str, Tensor]:
    state = {"tok_emb.weight": trunk.embed}
    if trunk.positions is not None:
        state["pos_emb.weight"] = trunk.positions[: cfg.context_length]
    state.update(_norm_state("ln_f.", trunk.final_norm))
    if trunk.head is not None:
        state["head.weight"] = trunk.head
    return state


def _block_state(
    block: DenseBlock, spec: DecoderSpec, cfg: ModelConfig, n: int
) -> dict[str, Tensor]:
    """The branches' tensors of block ``n``: every branch holds a copy of the norms it reads."""
    k = cfg.branches[0]
    attention, mlp = dense_shapes(spec, k)
    attn_pieces = split_attention(block.attention, attention, k)
    mlp_pieces = split_mlp(block.mlp, mlp, k)
    layers = (n, n) if spec.parallel_residual else (2 * n, 2 * n + 1)
    state: dict[str, Tensor] = {}
    for i in range(k):
        parts = (
            (layers[0], "attn", block.attn_norm, attn_pieces[i].state_dict()),
            (layers[1], "mlp", block.mlp_norm, mlp_pieces[i].state_dict()),
        )
        for layer, name, norm, tensors in parts:
            prefix = f"layers.{layer}.branches.{i}.blocks.0."
            copy = (norm[0].clone(), None if norm[1] is None else norm[1].clone())
            state.update(_norm_state(f"{prefix}{name}_norm.", copy))  # a node holds its own
            state.update({f"{prefix}{name}.{key}": value for key, value in tensors.items()})
    return state


def _norm_state(prefix: str, norm: NormWeights) -> dict[str, Tensor]:
    weight, bias = norm
    return {prefix + "weight": weight} | ({} if bias is None else {prefix + "bias": bias})
