"""Tiny random Hugging Face decoders of every supported family, saved as a user's download is.

``transformers`` is the oracle here (a dev dependency only): each model is built with
``from_config``, its biases and norm gains perturbed (from_config leaves them at 0 and 1, which
would hide a mapping that drops them), and saved with ``save_pretrained`` next to a
``tokenizer.json``, so the importer reads exactly what it reads from a real download.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mbt_core.model.tokenizer import Tokenizer

VOCAB = 300  # room for the test tokenizer's bytes, merges and end token (id 0)


def llama() -> PreTrainedModel:
    """Grouped-query attention (8 heads over 4 KV groups), llama3 rope scaling, untied head."""
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=96,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            max_position_embeddings=4096,
            attention_bias=True,
            bos_token_id=0,
            eos_token_id=0,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 50000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    )


def qwen2() -> PreTrainedModel:
    """Grouped-query attention with q/k/v biases, tied head."""
    return Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=96,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def gpt_neox() -> PreTrainedModel:
    """Parallel residual, partial rotary (a quarter of each head), untied head."""
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def gpt2() -> PreTrainedModel:
    """Learned positions, Conv1D weights, tanh GELU, tied head."""
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=64,
            n_head=4,
            n_layer=2,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


FAMILIES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": llama,
    "qwen2": qwen2,
    "gpt_neox": gpt_neox,
    "gpt2": gpt2,
}


def randomize(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def save_hf(family: str, folder: Path, tokenizer: Tokenizer, seed: int = 0) -> PreTrainedModel:
    """Build, perturb and save one family's model into ``folder``; returns it in eval mode."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    return model


def imported_llama(tmp_path: Path, tokenizer: Tokenizer) -> Path:
    """A tiny Llama imported as 2 bfloat16 branches per layer, saved as a checkpoint, with
    a training text ``text.txt`` beside it: what mbt finetune and mbt expand start from."""
    from mbt_core.model.checkpoint import save_checkpoint
    from mbt_core.model.hf_import import ImportOptions, import_decoder
    from tests.conftest import SAMPLE_TEXT

    folder = tmp_path / "hf"
    folder.mkdir()
    save_hf("llama", folder, tokenizer)
    ckpt = import_decoder(folder, ImportOptions(branches=2, dtype="bfloat16"))
    path = tmp_path / "llama-k2.safetensors"
    save_checkpoint(path, ckpt.model, ckpt.tokenizer, ckpt.info)
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 3)
    return path
