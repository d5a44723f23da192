"""A dense Llama-shaped decoder trained on the shipped corpus: the stand-in for a pretrained
checkpoint in the import-and-fine-tune figures of the README (no download is possible here).

It is trained by ``transformers`` itself (a dev dependency, hence a tool under ``tests/``),
without branch dropout, with the shipped model's tokenizer, data split and schedule, and saved
with ``save_pretrained`` next to a ``tokenizer.json``: exactly what ``mbt import`` reads from a
real download. ::

    python -m tests.dense_standin --out runs/dense-hf          # about 4 minutes on 2 cores
    mbt import runs/dense-hf --branches 4 --out runs/dense-k4.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.training.data import (
    default_corpus_path,
    random_batch,
    read_texts,
    split_texts,
    token_stream,
)
from mbt_core.training.train import TrainConfig, learning_rate


@dataclass(frozen=True)
class StandinConfig:
    out: Path
    steps: int = 1200
    d_model: int = 128
    blocks: int = 4
    heads: int = 4
    intermediate: int = 512
    context: int = 128
    batch_size: int = 16
    seed: int = 1337
    data: Path | None = None  # a .txt file or folder; default: the shipped corpus


def train_standin(cfg: StandinConfig, progress: bool = True) -> float:
    """Train and save the stand-in; returns the minutes it took."""
    tokenizer = load_checkpoint().tokenizer  # the shipped model's BPE, end-of-text id 0
    texts, _ = split_texts(read_texts(cfg.data or default_corpus_path()))
    stream = token_stream(tokenizer, texts)
    schedule = TrainConfig(data=Path("."), out_dir=cfg.out, steps=cfg.steps)  # lr, warmup
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=cfg.d_model,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.blocks,
            vocab_size=tokenizer.vocab_size,
            max_position_embeddings=cfg.context,
            bos_token_id=tokenizer.eos_id,
            eos_token_id=tokenizer.eos_id,
            tie_word_embeddings=True,
        )
    )
    opt = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=schedule.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(schedule, step)
        x, y = random_batch(stream, cfg.batch_size, cfg.context, gen)
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out, safe_serialization=True)
    (cfg.out / "tokenizer.json").write_text(tokenizer.to_json())
    return (time.perf_counter() - t0) / 60


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.dense_standin",
        description="Train a dense Llama-shaped decoder on the shipped corpus (no branch "
        "dropout) and save it as a Hugging Face folder, for mbt import.",
    )
    p.add_argument("--out", type=Path, required=True, help="the folder to save into")
    d = StandinConfig.__dataclass_fields__
    p.add_argument("--steps", type=int, default=d["steps"].default, help="training steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps <= 0:
        print("error: --steps must be positive", file=sys.stderr)
        return 2
    minutes = train_standin(StandinConfig(out=args.out, steps=args.steps), not args.no_progress)
    print(f"saved {args.out} after {args.steps} steps ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
