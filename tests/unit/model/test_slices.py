"""Width slices fused as an MBT layer equal the dense pretrained sublayers.

``transformers`` is the oracle (a dev dependency only). A tiny random model of each family is
cut into K branches per sublayer with :mod:`mbt_core.model.slices`, run as MBT layers (every
branch ``z_i = h + K u_i``, alpha 1/K), and compared with the HF logits for a prefill and 20
incremental steps. The weight mapping here is the test's own; the importer will own it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mbt_core.model.config import ModelConfig
from mbt_core.model.hf_config import DecoderSpec, spec_from_config
from mbt_core.model.kv import BranchCache, KVSlots, RaggedKV, UniformKV
from mbt_core.model.slices import (
    AttentionShape,
    AttentionSlice,
    DenseAttention,
    DenseMLP,
    MLPShape,
    Norm,
    split_attention,
    split_mlp,
)

PREFILL, STEPS = 7, 20


def _norm(spec: DecoderSpec, module: torch.nn.Module) -> Norm:
    norm = Norm(spec.d_model, spec.norm, spec.norm_eps, spec.norm_bias)
    with torch.no_grad():
        norm.weight.copy_(module.weight)
        if norm.bias is not None:
            norm.bias.copy_(module.bias)
    return norm


def _shapes(spec: DecoderSpec) -> tuple[AttentionShape, MLPShape]:
    attention = AttentionShape(
        spec.d_model,
        spec.n_heads,
        spec.n_kv_heads,
        spec.head_dim,
        spec.qkv_bias,
        spec.out_bias,
        spec.rope,
    )
    mlp = MLPShape(
        spec.d_model, spec.intermediate_size, spec.activation, spec.gated_mlp, spec.mlp_bias
    )
    return attention, mlp


def _fuse(h: torch.Tensor, updates: list[torch.Tensor], k: int | None = None) -> torch.Tensor:
    """Average the branches that answered; each was built for the layer's full width K."""
    k = len(updates) if k is None else k
    return torch.stack([h + k * u for u in updates]).mean(0)


def _attend(piece: AttentionSlice, x: torch.Tensor, cache: BranchCache) -> torch.Tensor:
    """One slice over its own cache, advanced once the step succeeded (as a branch does)."""
    update = piece(x, UniformKV(cache))
    cache.length += x.shape[1]
    return update


class SlicedSequential:
    """Sequential blocks: an attention MBT layer, then an MLP MBT layer."""

    def __init__(self, model, blocks, final, k: int) -> None:
        spec = spec_from_config(model.config.to_dict())
        attention, mlp = _shapes(spec)
        self.model, self.layers = model, []
        for ln1, dense_a, ln2, dense_m in blocks:
            self.layers.append(
                (
                    _norm(spec, ln1),
                    split_attention(dense_a, attention, k),
                    _norm(spec, ln2),
                    split_mlp(dense_m, mlp, k),
                )
            )
        self.final = _norm(spec, final)
        self.cache = [
            [BranchCache(keys=[None], values=[None]) for _ in range(k)] for _ in self.layers
        ]

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids, positions)
        for n, (ln1, attention, ln2, mlp) in enumerate(self.layers):
            x, updates = ln1(h), []
            for i, piece in enumerate(attention):
                updates.append(_attend(piece, x, self.cache[n][i]))
            h = _fuse(h, updates)
            x = ln2(h)
            h = _fuse(h, [piece(x) for piece in mlp])
        return self.model.get_output_embeddings()(self.final(h))


def _llama_attention(a: torch.nn.Module) -> DenseAttention:
    """Llama and Qwen2 attention modules already hold Linear-layout q/k/v/o projections."""
    linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
    return DenseAttention(*(p.weight for p in linears), *(p.bias for p in linears))


class SlicedLlama(SlicedSequential):
    def __init__(self, model: LlamaForCausalLM, k: int) -> None:
        blocks = []
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            dense_a = _llama_attention(a)
            dense_m = DenseMLP(m.up_proj.weight, m.down_proj.weight, m.gate_proj.weight)
            blocks.append((block.input_layernorm, dense_a, block.post_attention_layernorm, dense_m))
        super().__init__(model, blocks, model.model.norm, k)


class SlicedGPT2(SlicedSequential):
    """GPT-2 stores Conv1D weights as (in, out): transpose into Linear layout."""

    def __init__(self, model: GPT2LMHeadModel, k: int) -> None:
        blocks = []
        for block in model.transformer.h:
            qkv_w, qkv_b = block.attn.c_attn.weight.t(), block.attn.c_attn.bias
            d = qkv_w.shape[1]
            dense_a = DenseAttention(
                *qkv_w.split(d),
                block.attn.c_proj.weight.t(),
                *qkv_b.split(d),
                block.attn.c_proj.bias,
            )
            mlp = block.mlp
            dense_m = DenseMLP(
                mlp.c_fc.weight.t(),
                mlp.c_proj.weight.t(),
                up_bias=mlp.c_fc.bias,
                down_bias=mlp.c_proj.bias,
            )
            blocks.append((block.ln_1, dense_a, block.ln_2, dense_m))
        super().__init__(model, blocks, model.transformer.ln_f, k)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.wte(ids) + self.model.transformer.wpe(positions)


class SlicedNeoX:
    """Parallel residual: one MBT layer per block, branch i = head group i + neuron group i."""

    def __init__(self, model: GPTNeoXForCausalLM, k: int) -> None:
        spec = spec_from_config(model.config.to_dict())
        attention, mlp = _shapes(spec)
        self.model, self.layers = model, []
        heads, hd = spec.n_heads, spec.head_dim
        for block in model.gpt_neox.layers:
            qkv = block.attention.query_key_value
            # NeoX interleaves per head: rows are (head, [q, k, v], head_dim).
            w = qkv.weight.view(heads, 3, hd, -1)
            b = qkv.bias.view(heads, 3, hd)
            dense_a = DenseAttention(
                *(w[:, j].reshape(heads * hd, -1) for j in range(3)),
                block.attention.dense.weight,
                *(b[:, j].reshape(-1) for j in range(3)),
                block.attention.dense.bias,
            )
            dense_m = DenseMLP(
                block.mlp.dense_h_to_4h.weight,
                block.mlp.dense_4h_to_h.weight,
                up_bias=block.mlp.dense_h_to_4h.bias,
                down_bias=block.mlp.dense_4h_to_h.bias,
            )
            self.layers.append(
                (
                    _norm(spec, block.input_layernorm),
                    split_attention(dense_a, attention, k),
                    _norm(spec, block.post_attention_layernorm),
                    split_mlp(dense_m, mlp, k),
                )
            )
        self.final = _norm(spec, model.gpt_neox.final_layer_norm)
        self.cache = [
            [BranchCache(keys=[None], values=[None]) for _ in range(k)] for _ in self.layers
        ]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.model.gpt_neox.embed_in(ids)
        for n, (ln1, attention, ln2, mlp) in enumerate(self.layers):
            x1, x2, updates = ln1(h), ln2(h), []
            for i, (a, m) in enumerate(zip(attention, mlp, strict=True)):
                updates.append(_attend(a, x1, self.cache[n][i]) + m(x2))
            h = _fuse(h, updates)
        return self.model.get_output_embeddings()(self.final(h))


def _llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=97,
        max_position_embeddings=4096,
        attention_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    return LlamaForCausalLM(config)


def _neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=97,
        max_position_embeddings=256,
    )
    return GPTNeoXForCausalLM(config)


def _qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=97,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def _gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        n_embd=64,
        n_head=4,
        n_layer=2,
        vocab_size=97,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _randomize(model: torch.nn.Module) -> None:
    """from_config leaves biases and norm gains at 0 and 1; perturb them so they are checked."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize(
    ("build", "sliced"),
    [(_llama, SlicedLlama), (_qwen2, SlicedLlama), (_neox, SlicedNeoX), (_gpt2, SlicedGPT2)],
    ids=["llama", "qwen2", "gpt_neox", "gpt2"],
)
def test_sliced_logits_equal_the_dense_model(build, sliced, k: int) -> None:
    torch.manual_seed(k)
    model = build().eval()
    _randomize(model)
    ours = sliced(model, k)
    ids = torch.randint(0, 97, (1, PREFILL + STEPS))
    with torch.no_grad():
        reference = model(ids).logits
        got = [ours(ids[:, :PREFILL], torch.arange(PREFILL)[None])]
        for t in range(PREFILL, PREFILL + STEPS):
            got.append(ours(ids[:, t : t + 1], torch.tensor([[t]])))
    diff = (torch.cat(got, dim=1) - reference).abs().max().item()
    assert diff < 1e-4, diff


def test_a_missing_branch_renormalizes_the_others() -> None:
    """Dropping a slice and re-averaging the rest scales their updates by K/(K-1): finite,
    different from the dense output, and not an error."""
    torch.manual_seed(0)
    model = _llama().eval()
    spec = spec_from_config(model.config.to_dict())
    _, mlp_shape = _shapes(spec)
    m = model.model.layers[0].mlp
    pieces = split_mlp(
        DenseMLP(m.up_proj.weight, m.down_proj.weight, m.gate_proj.weight), mlp_shape, 4
    )
    h = torch.randn(1, 3, 64)
    with torch.no_grad():
        updates = [piece(h) for piece in pieces]
        dense = _fuse(h, updates)
        degraded = _fuse(h, updates[1:], k=4)  # branch 0 gone: alphas renormalize to 1/3
        assert torch.allclose(dense, h + m(h), atol=1e-5)
        assert torch.allclose(degraded, h + sum(updates[1:]) * 4 / 3, atol=1e-5)
        assert torch.isfinite(degraded).all() and not torch.allclose(degraded, dense)


def test_a_ragged_batch_of_sessions_in_slots_equals_each_alone() -> None:
    """A node batches sessions of different lengths through one slot pool: a grouped-query,
    rotary slice must give each session what it gives that session alone."""
    torch.manual_seed(5)
    model = _llama().eval()
    spec = spec_from_config(model.config.to_dict())
    attention, _ = _shapes(spec)
    a = model.model.layers[0].self_attn
    dense = _llama_attention(a)
    piece = split_attention(dense, attention, 2)[1]  # 4 query heads over 2 KV heads
    cfg = ModelConfig(d_model=64, n_heads=8, context_length=64, n_layers=1, branches=(2,))
    slots = KVSlots(cfg, torch.float32, "cpu", kv_heads=(2, spec.head_dim))
    lengths = [5, 2, 7]
    inputs = [torch.randn(t, 64) for t in lengths]
    steps = [torch.randn(len(lengths), 1, 64) for _ in range(3)]
    with torch.no_grad():
        alone = []
        for s, x in enumerate(inputs):
            cache = BranchCache(keys=[None], values=[None])
            outs = [_attend(piece, x[None], cache)[0]]
            outs += [_attend(piece, step[s : s + 1], cache)[0] for step in steps]
            alone.append(torch.cat(outs))
        caches = [slots.new_cache() for _ in lengths]
        padded = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True)
        first = piece(padded, RaggedKV(caches, lengths, torch.device("cpu")))
        for cache, t in zip(caches, lengths, strict=True):
            cache.length += t
        batched = [[first[s, :t]] for s, t in enumerate(lengths)]
        for step in steps:  # decode steps: one position each, all sessions at once
            out = piece(step, RaggedKV(caches, [1] * len(lengths), torch.device("cpu")))
            for s, cache in enumerate(caches):
                cache.length += 1
                batched[s].append(out[s])
    for s in range(len(lengths)):
        assert torch.allclose(torch.cat(batched[s]), alone[s], atol=1e-5), s
