"""Import a local Hugging Face decoder (GPT-2, GPT-NeoX/Pythia, Llama, Qwen2) as an MBT model.

Cuts every attention into K groups of whole key-value heads and every MLP into K groups of
neurons; branch i of a layer holds group i, and the fused layer equals the dense one exactly.
Sequential models get two MBT layers per block (attention, MLP), parallel-residual ones one.
HF_DIR is a folder with config.json, *.safetensors (one file or a sharded index) and
tokenizer.json, e.g. from `huggingface-cli download MODEL --local-dir HF_DIR`; nothing is
downloaded here. The result is an ordinary checkpoint: `mbt generate`, `mbt export`, the
nodes and the gateway take it unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from mbt_core.model.checkpoint import save_checkpoint
from mbt_core.model.config import STORAGE_DTYPES
from mbt_core.model.decoder import UnsupportedModel
from mbt_core.model.hf_import import MAX_DEFAULT_CONTEXT, ImportOptions, import_decoder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="local Hugging Face model folder")
    p.add_argument(
        "--branches",
        "-k",
        type=int,
        required=True,
        help="K: branches per layer (must divide the key-value heads and the MLP neurons)",
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    p.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default=None,
        help="store the weights in this dtype (default: the checkpoint's own)",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="positions to serve; nodes reserve this many keys per session "
        f"(default: the model's, at most {MAX_DEFAULT_CONTEXT})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and args.out.is_dir():
        raise UnsupportedModel(f"--out {args.out} is a folder; name the checkpoint file to write")
    bar = tqdm(disable=args.quiet, unit="block", desc="import", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    options = ImportOptions(args.branches, args.dtype, args.context_length)
    try:
        ckpt = import_decoder(args.hf_dir, options, progress)
    finally:
        bar.close()
    save_checkpoint(args.out, ckpt.model, ckpt.tokenizer, ckpt.info)
    cfg = ckpt.model.cfg
    spec = cfg.decoder
    assert spec is not None
    print(
        f"imported {spec.model_type} ({ckpt.model.num_parameters() / 1e6:.1f}M parameters, "
        f"{cfg.dtype}) as {cfg.n_layers} MBT layers x {args.branches} branches "
        f"({cfg.layer_kind(0)}{'' if spec.parallel_residual else ' + mlp'} layers), "
        f"context {cfg.context_length}: {args.out}"
    )
    return 0
