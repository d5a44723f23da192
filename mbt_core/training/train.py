"""Training an MBT LM for partial availability: masked sub-models with renormalization, plus
an entropy floor on every layer's aggregation weights so that no branch starves.

Each step draws masks per layer, runs only the kept branches and renormalizes alpha over them,
exactly as the aggregator does when nodes are missing: the masked model is trained on the
labels (``robust_mode="dropout"``), or on the full model's soft predictions while the full
model trains on the labels (``"distill"``, :mod:`mbt_core.training.objective`). The entropy
floor adds ``entropy_weight * relu(floor * log K - H(alpha))`` per layer to the loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mbt_core.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mbt_core.model.config import ModelConfig
from mbt_core.model.expand import freeze_for_growth
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.masks import outage_masks, training_masks
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.training.data import random_batch, read_texts, split_texts, token_stream
from mbt_core.training.evaluate import perplexity
from mbt_core.training.objective import ROBUST_MODES, dropout_losses, sandwich_losses

FREEZABLE = ("trunk", "alpha", "attention", "mlp", "norms")
CHECKPOINT_NAME = "model.safetensors"
STATE_NAME = "trainer-state.pt"


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out_dir: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 2500
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    branch_drop: float = 0.25  # probability that a branch is out (>= 1 kept per layer)
    # "sequence": one mask per layer and sequence; every branch runs and learns from ~75 % of
    # each batch. "step": one mask per layer and step; dropped branches are skipped (cheaper).
    # On the shipped recipe, per-sequence masks cost far less healthy perplexity (see README).
    mask_per: str = "sequence"
    # "dropout": the masked model on the labels; "distill": the full model on the labels plus
    # ``submodels`` masked ones on its soft predictions at ``distill_temperature``.
    robust_mode: str = "dropout"
    submodels: int = 1
    distill_temperature: float = 1.0
    # Fraction of each batch's sequences that every sub-model re-runs (at least one): the
    # sub-model pass costs this fraction of the full model's.
    distill_fraction: float = 1.0
    entropy_floor: float = 0.9  # fraction of log K that H(alpha) may not fall below
    entropy_weight: float = 0.1
    eval_interval: int = 250
    eval_tokens: int = 16384
    checkpoint_interval: int = 250
    # Fine-tuning (mbt finetune): start from this checkpoint (its architecture, weights and
    # tokenizer; ``model`` is ignored), train in float32, keep the named parts fixed, and cut
    # training sequences (and validation windows) to ``block_size`` positions.
    init: Path | None = None
    freeze: tuple[str, ...] = ()
    block_size: int | None = None
    # Growing (mbt expand): train only the branches beyond these per-layer counts and their
    # alpha logits, everything else bit for bit fixed; ``info`` adds to the checkpoint's info.
    grow_from: tuple[int, ...] | None = None
    info: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if not 0.0 <= self.branch_drop < 1.0:
            raise ValueError(f"branch_drop must be in [0, 1), got {self.branch_drop}")
        if self.mask_per not in ("step", "sequence"):
            raise ValueError(f"mask_per must be 'step' or 'sequence', got {self.mask_per!r}")
        if self.robust_mode not in ROBUST_MODES:
            raise ValueError(
                f"robust_mode must be one of {', '.join(ROBUST_MODES)}, got {self.robust_mode!r}"
            )
        if self.submodels < 0 or self.distill_temperature <= 0:
            raise ValueError("need submodels >= 0 and distill_temperature > 0")
        if not 0.0 < self.distill_fraction <= 1.0:
            raise ValueError(f"distill_fraction must be in (0, 1], got {self.distill_fraction}")
        if not 0.0 <= self.entropy_floor <= 1.0:
            raise ValueError(f"entropy_floor must be in [0, 1], got {self.entropy_floor}")
        if self.warmup_steps < 0 or self.min_lr > self.lr:
            raise ValueError("need warmup_steps >= 0 and min_lr <= lr")
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if unknown:
            raise ValueError(f"cannot freeze {', '.join(unknown)}: choose from {FREEZABLE}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {self.block_size}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def entropy_penalty(model: MBTLanguageModel, floor: float) -> Tensor:
    """Sum over layers of ``relu(floor * log K - H(alpha))`` (zero for single-branch layers)."""
    total = torch.zeros(())
    for layer in model.layers:
        alpha = layer.weights()
        k = alpha.numel()
        if k > 1:
            h = -(alpha * torch.log(alpha.clamp_min(1e-12))).sum()
            total = total + F.relu(floor * math.log(k) - h)
    return total


def trainable(model: MBTLanguageModel) -> MBTLanguageModel:
    """The model in float32: half-precision weights (an imported bfloat16 model) would lose
    most small updates to rounding. Its checkpoints are then float32 too."""
    return in_dtype(model, "float32")


def in_dtype(model: MBTLanguageModel, dtype: str) -> MBTLanguageModel:
    """``model`` stored in ``dtype`` (itself if it already is)."""
    if model.cfg.dtype == dtype:
        return model
    cfg = replace(model.cfg, dtype=dtype)
    with torch.device("meta"):
        out = MBTLanguageModel(cfg)
    state = {k: v.to(cfg.torch_dtype) for k, v in model.state_dict().items()}
    out.load_state_dict(state, assign=True)
    return out


def freeze(model: MBTLanguageModel, parts: tuple[str, ...]) -> int:
    """Stop the gradient of the named parts; returns how many parameters still train.

    ``trunk`` is the embeddings, final norm and head; ``attention``/``mlp`` the branches'
    attention and MLP weights (block or slice); ``norms`` every norm inside the branches.
    """
    for name, p in model.named_parameters():
        if _part_of(name) in parts:
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _part_of(name: str) -> str:
    if not name.startswith("layers."):
        return "trunk"
    if name.endswith("alpha_logits"):
        return "alpha"
    leaf = name.split(".blocks.", 1)[-1].split(".", 1)[-1]  # past the block's index
    if leaf.startswith(("ln", "attn_norm", "mlp_norm")):
        return "norms"
    return "attention" if leaf.startswith("attn") else "mlp"


def train(
    cfg: TrainConfig,
    progress: bool = True,
    until: int | None = None,
    start: Checkpoint | None = None,
) -> Path:
    """Train (or resume) and return the path of the checkpoint written last.

    ``until`` stops this run early at that step (the schedule still spans ``cfg.steps``), as an
    interruption would; a later call resumes from there. ``start`` is the model to begin from
    when not resuming, already in memory (``mbt expand``'s grown one), instead of ``cfg.init``.
    """
    last = cfg.steps if until is None else min(until, cfg.steps)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, state_path = cfg.out_dir / CHECKPOINT_NAME, cfg.out_dir / STATE_NAME
    train_texts, val_texts = split_texts(read_texts(cfg.data))

    torch.manual_seed(cfg.seed)  # before the model is built: its initialization draws from it
    resume = ckpt_path.exists() and state_path.exists()
    if resume or start is not None or cfg.init is not None:
        if resume or start is None:
            start = load_checkpoint(ckpt_path if resume else cfg.init)
        model, tokenizer = trainable(start.model), start.tokenizer
        model.train()
    else:
        tokenizer = Tokenizer.train(train_texts, cfg.model.vocab_size)
        model = MBTLanguageModel(cfg.model.with_vocab(tokenizer.vocab_size))
    train_stream = token_stream(tokenizer, train_texts)
    val_stream = token_stream(tokenizer, val_texts)

    if cfg.grow_from is not None:
        freeze_for_growth(model, cfg.grow_from)
    if freeze(model, cfg.freeze) == 0:
        raise ValueError(f"--freeze {','.join(cfg.freeze)} leaves nothing to train")
    training = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in training if p.dim() >= 2]
    no_decay = [p for p in training if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume:
        state = torch.load(state_path, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])

    def save(val_ppl: float | None) -> None:
        info = {
            "step": str(step),
            "steps": str(cfg.steps),
            "branch_drop": str(cfg.branch_drop),
            "entropy_floor": str(cfg.entropy_floor),
            "mask_per": cfg.mask_per,
            "robust_mode": cfg.robust_mode,
            "distill_fraction": str(cfg.distill_fraction),
            "seed": str(cfg.seed),
        }
        if cfg.init is not None:
            info["finetuned_from"] = cfg.init.name
        if val_ppl is not None:
            info["val_ppl"] = f"{val_ppl:.3f}"
        info.update(cfg.info)
        save_checkpoint(ckpt_path, model, tokenizer, info)
        state = {
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
        }
        tmp = state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(state_path)

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    block = min(cfg.block_size or model.cfg.context_length, model.cfg.context_length)
    tokens_per_step = cfg.batch_size * block
    # The progress bar's masked figure: a fixed quarter of every layer's branches out.
    quarter = outage_masks(model.cfg.branches, 0.25, torch.Generator().manual_seed(0))
    masked_ppl: float | None = None
    val_ppl: float | None = None
    t0, steps_timed = time.perf_counter(), 0
    rows = cfg.batch_size if cfg.mask_per == "sequence" else None
    sub_rows = max(1, round(cfg.distill_fraction * cfg.batch_size))

    def draw(rows: int | None = rows) -> list[Tensor]:
        return training_masks(model.cfg.branches, cfg.branch_drop, gen, rows)

    model.train()
    while step < last:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        x, y = random_batch(train_stream, cfg.batch_size, block, gen)
        if cfg.robust_mode == "distill":
            # Sub-models run in the full model's batch, so their masks are per sequence.
            subs = [draw(sub_rows) for _ in range(cfg.submodels)] if cfg.branch_drop > 0 else []
            losses = sandwich_losses(model, x, y, subs, cfg.distill_temperature)
        else:
            losses = dropout_losses(model, x, y, draw() if cfg.branch_drop > 0 else None)
        lm_loss, loss = losses.labels, losses.total
        if cfg.entropy_weight > 0:
            loss = loss + cfg.entropy_weight * entropy_penalty(model, cfg.entropy_floor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        steps_timed += 1
        elapsed = time.perf_counter() - t0
        postfix = {
            "loss": f"{lm_loss.item():.3f}",
            "tok/s": f"{steps_timed * tokens_per_step / elapsed:.0f}",
        }
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            val_ppl = perplexity(model, val_stream, max_tokens=cfg.eval_tokens, window=block)
            if max(model.cfg.branches) > 1:
                masked_ppl = perplexity(
                    model, val_stream, quarter, max_tokens=cfg.eval_tokens, window=block
                )
            model.train()
        if val_ppl is not None:
            postfix["val_ppl"] = f"{val_ppl:.2f}"
        if masked_ppl is not None:
            postfix["25%_out"] = f"{masked_ppl:.2f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if step % cfg.checkpoint_interval == 0 or step == last:
            save(val_ppl)
    bar.close()
    return ckpt_path
