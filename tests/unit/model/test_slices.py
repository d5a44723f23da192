"""Width slices: what a node's batching needs of them beyond the importer's oracle tests.

(Logits against ``transformers`` for every family are in ``test_hf_import``.)
"""

from __future__ import annotations

import pytest
import torch

from mbt_core.model.config import ModelConfig
from mbt_core.model.decoder import swiglu_decoder
from mbt_core.model.hf_config import spec_from_config
from mbt_core.model.kv import BranchCache, KVSlots, RaggedKV, UniformKV
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.slices import AttentionSlice, DenseAttention, dense_shapes, split_attention
from tests.hf_models import llama


def _attend(piece: AttentionSlice, x: torch.Tensor, cache: BranchCache) -> torch.Tensor:
    """One slice over its own cache, advanced once the step succeeded (as a branch does)."""
    update = piece(x, UniformKV(cache))
    cache.length += x.shape[1]
    return update


def _llama_attention(a: torch.nn.Module) -> DenseAttention:
    linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
    return DenseAttention(*(p.weight for p in linears), *(p.bias for p in linears))


def test_a_ragged_batch_of_sessions_in_slots_equals_each_alone() -> None:
    """A node batches sessions of different lengths through one slot pool: a grouped-query,
    rotary slice must give each session what it gives that session alone."""
    torch.manual_seed(5)
    model = llama().eval()
    spec = spec_from_config(model.config.to_dict())
    attention, _ = dense_shapes(spec, 2)
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


def test_a_swiglu_decoder_widens_with_its_heads_and_neurons_scaled() -> None:
    """``mbt-aggregator-bench --d-model``: the shipped layout at another width still builds."""
    spec = swiglu_decoder(300, 64, 8, 2, 192, 32)
    cfg = ModelConfig.sliced(spec, 4, 32, "float32", eos=0).widened(32)
    assert cfg.decoder is not None
    assert (cfg.d_model, cfg.decoder.head_dim, cfg.decoder.intermediate_size) == (32, 4, 96)
    assert cfg.decoder.rope is not None and cfg.decoder.rope.rotary_dim == 4
    out = MBTLanguageModel(cfg)(torch.randint(0, 300, (1, 5)))
    assert out.shape == (1, 5, 300)
    with pytest.raises(ValueError, match="multiple of 16"):
        cfg.widened(40)
