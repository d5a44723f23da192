"""Text corpora: reading, the train/validation split by work, token streams and batches."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from mbt_core.model.tokenizer import Tokenizer

# Whole works held out, so validation text is never seen in training.
VALIDATION_WORKS = ("tempest_gut.txt", "macbeth_gut.txt")
_SINGLE_FILE_VAL_FRACTION = 0.1


def default_corpus_path() -> Path:
    """The Shakespeare corpus shipped inside the package (public domain)."""
    return Path(str(resources.files("mbt_core") / "assets" / "shakespeare"))


def read_texts(path: str | Path) -> dict[str, str]:
    """File name -> text for a ``.txt`` file or every ``.txt`` file in a folder (sorted)."""
    root = Path(path)
    if root.is_dir():
        files = sorted(root.glob("*.txt"))
        if not files:
            raise ValueError(f"{root}: no .txt files in this folder")
    elif root.is_file():
        files = [root]
    else:
        raise ValueError(f"{root}: no such file or folder")
    return {f.name: f.read_text(encoding="utf-8", errors="replace") for f in files}


def split_texts(texts: dict[str, str]) -> tuple[list[str], list[str]]:
    """(train, validation) texts: the held-out works if present, else the tail of each text."""
    held = [name for name in texts if name in VALIDATION_WORKS]
    if held and len(held) < len(texts):
        train = [t for n, t in texts.items() if n not in VALIDATION_WORKS]
        return train, [texts[n] for n in held]
    train, val = [], []
    for text in texts.values():
        cut = int(len(text) * (1.0 - _SINGLE_FILE_VAL_FRACTION))
        train.append(text[:cut])
        val.append(text[cut:])
    return train, val


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> Tensor:
    """All texts encoded and joined, each followed by end-of-text: a 1-D int64 tensor."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def random_batch(
    stream: Tensor, batch: int, length: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets, each (batch, length), from random offsets."""
    if stream.numel() <= length + 1:
        raise ValueError(f"text of {stream.numel()} tokens is too short for windows of {length}")
    starts = torch.randint(stream.numel() - length - 1, (batch,), generator=gen)
    x = torch.stack([stream[s : s + length] for s in starts.tolist()])
    y = torch.stack([stream[s + 1 : s + length + 1] for s in starts.tolist()])
    return x, y


def evaluation_texts(path: Path | None) -> list[str]:
    """The given file's text, or the shipped corpus's validation works."""
    if path is not None:
        return list(read_texts(path).values())
    return split_texts(read_texts(default_corpus_path()))[1]
