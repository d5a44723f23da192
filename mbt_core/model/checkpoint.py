"""Checkpoints: config + tokenizer + weights in one safetensors file, validated on load.

Weights keep the config's dtype on disk (bfloat16 stays bfloat16), and loading holds the
file once: the model's parameters are views of the bytes read (:mod:`mbt_core.model.tensorfile`).

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

from mbt_core.errors import CheckpointError, TokenizerError
from mbt_core.fileio import atomic_write_stream
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tensorfile import metadata_of, read_whole, tensors_of, write_tensors
from mbt_core.model.tokenizer import Tokenizer, vocabulary_problem

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
    problem = vocabulary_problem(tokenizer, model.cfg.vocab_size, model.cfg.kind == "sliced")
    if problem:
        raise CheckpointError(problem)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "tokenizer": tokenizer.to_json(),
        "info": json.dumps(info or {}, sort_keys=True),
    }
    atomic_write_stream(path, lambda fh: write_tensors(fh, tensors, metadata))


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Read, validate and rebuild; every failure is a :class:`CheckpointError` naming the file."""
    file = Path(path) if path is not None else default_checkpoint_path()
    try:
        data = read_whole(file)  # the tensors below are views of these bytes: held once
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read checkpoint ({exc.strerror})") from exc
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc
    try:
        tensors = tensors_of(data)
        metadata = metadata_of(data)
    except ValueError as exc:
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
        tokenizer = Tokenizer.from_json(metadata["tokenizer"], tokenizer_eos(cfg))
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, ValueError, TypeError, TokenizerError) as exc:
        raise CheckpointError(f"{file}: invalid checkpoint header: {exc}") from exc
    problem = vocabulary_problem(tokenizer, cfg.vocab_size, cfg.kind == "sliced")
    if problem:
        raise CheckpointError(f"{file}: {problem}")
    with torch.device("meta"):  # no weights allocated: the file's tensors become the model's
        model = MBTLanguageModel(cfg)
    check_state(model, tensors, str(file))
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, info=info)


def tokenizer_eos(cfg: ModelConfig) -> int | None:
    """The end token an imported model's config names; trained ones look theirs up."""
    return cfg.eos_token_id if cfg.kind == "sliced" else None


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
