"""The same workload on the same model in this one process: the single-machine baseline.

Greedy generation is ``mbt_core.model.sampling.generate`` (the gateway's loop mirrors it step for
step), and scoring cuts the text into the same non-overlapping context windows as the
gateway's ``Score``, so a healthy distributed run must match both exactly: the greedy tokens,
and the next-token distributions up to float rounding (KL ~ 0). Generations run one after
another on one thread: tokens/s here is one stream's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mbt_aggregator.outage.workload import Workload, perplexity_text
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig, generate


@dataclass(frozen=True)
class Baseline:
    outputs: tuple[tuple[int, ...], ...]  # greedy tokens per prompt
    latencies_s: tuple[float, ...]  # per token, as the bench measures remote tokens
    wall_s: float
    perplexity: float
    logprobs: np.ndarray  # (tokens, vocab) float32

    @property
    def tokens_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else 0.0


@torch.no_grad()
def window_logprobs(model: MBTLanguageModel, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities (len(ids) - 1, V), scored in the gateway's windows."""
    window = model.cfg.context_length
    rows = []
    for start in range(0, max(0, len(ids) - 1), window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = model(torch.tensor([chunk[:-1]]))[0]  # (T, V)
        rows.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(rows)


def run_baseline(ckpt: Checkpoint, workload: Workload) -> Baseline:
    model = ckpt.model.eval()
    cfg = SamplingConfig(max_new_tokens=workload.max_new_tokens, temperature=0.0)
    outputs, latencies = [], []
    t_start = time.perf_counter()
    for prompt in workload.prompts:
        produced = []
        prev = time.perf_counter()
        for token, _ in generate(model, ckpt.tokenizer.encode(prompt), cfg):
            now = time.perf_counter()
            latencies.append(now - prev)
            prev = now
            produced.append(token)
        outputs.append(tuple(produced))
    wall = time.perf_counter() - t_start
    ids = ckpt.tokenizer.encode(perplexity_text(workload.text_chars))
    logprobs = window_logprobs(model, ids)
    targets = torch.tensor(ids[1 : logprobs.shape[0] + 1])
    nll = -logprobs.gather(1, targets[:, None]).mean().item()
    return Baseline(tuple(outputs), tuple(latencies), wall, math.exp(nll), logprobs.numpy())
