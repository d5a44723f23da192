"""Checkpoints: config + tokenizer + weights in one safetensors file, validated on load.

The safetensors header carries the format name and version, the model config (JSON) and the
tokenizer (JSON). Loading rebuilds the model from that config ("load with rebuild"), so the LM
head always matches the stored vocabulary, then checks every tensor's name, shape and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mbt_core.errors import CheckpointError, TokenizerError
from mbt_core.fileio import atomic_write_bytes
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer

FORMAT = "mbt-checkpoint"
FORMAT_VERSION = 1
DEFAULT_MODEL = "default-model.safetensors"


@dataclass
class Checkpoint:
    model: MBTLanguageModel
    tokenizer: Tokenizer
    info: dict[str, str] = field(default_factory=dict)  # free-form (training step, data, ...)


def default_checkpoint_path() -> Path:
    """The small model shipped inside the package, used whenever no model is given."""
    return Path(str(resources.files("mbt_core") / "assets" / DEFAULT_MODEL))


def save_checkpoint(
    path: str | Path,
    model: MBTLanguageModel,
    tokenizer: Tokenizer,
    info: dict[str, str] | None = None,
) -> None:
    """Write atomically (temporary file, fsync, rename)."""
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens "
            f"but the model expects {model.cfg.vocab_size}"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "tokenizer": tokenizer.to_json(),
        "info": json.dumps(info or {}, sort_keys=True),
    }
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Read, validate and rebuild; every failure is a :class:`CheckpointError` naming the file."""
    file = Path(path) if path is not None else default_checkpoint_path()
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read checkpoint ({exc.strerror})") from exc
    try:
        tensors = st_load(data)
        metadata = read_metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: not a valid checkpoint file (truncated or corrupt: {exc})"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an MBT checkpoint (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{file}: checkpoint format version {metadata.get('format_version')!r}, "
            f"this program reads version {FORMAT_VERSION}"
        )
    try:
        cfg = ModelConfig.from_dict(json.loads(metadata["config"]))
        tokenizer = Tokenizer.from_json(metadata["tokenizer"])
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, ValueError, TypeError, TokenizerError) as exc:
        raise CheckpointError(f"{file}: invalid checkpoint header: {exc}") from exc
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{file}: tokenizer has {tokenizer.vocab_size} tokens, config says {cfg.vocab_size}"
        )
    model = MBTLanguageModel(cfg)
    check_state(model, tensors, str(file))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, info=info)


def check_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse missing, unexpected, mis-shaped or mis-typed tensors before touching the model."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match the model config "
            f"(missing: {', '.join(missing[:5]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:5]) or '-'})"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckpointError(
                f"{source}: tensor {name} is {got.dtype} {tuple(got.shape)}, "
                f"expected {ref.dtype} {tuple(ref.shape)}"
            )


def read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length beyond end of file")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return meta
