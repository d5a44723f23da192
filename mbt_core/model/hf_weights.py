"""The tensors of a Hugging Face checkpoint folder, read one at a time in their own dtype.

A model folder holds either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tensors are read from memory-mapped files one by one (and a
branch's rows or columns through a slice), so importing a 2 GiB bfloat16 model never holds it
twice and never widens it to float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mbt_core.model.hf_config import UnsupportedModel

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class HFWeights:
    """Name-addressed, lazily opened tensors of one checkpoint; use as a context manager."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._shard_of = _shard_map(folder)
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._open.clear()  # safe_open handles unmap when dropped

    def names(self) -> frozenset[str]:
        return frozenset(self._shard_of)

    def __contains__(self, name: object) -> bool:
        return name in self._shard_of

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in the dtype it was saved in."""
        tensor: torch.Tensor = self._handle(name).get_tensor(name)
        return tensor

    def part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (``dim=0``) or columns (``dim=1``) ``start:stop``, read without the rest."""
        view = self._handle(name).get_slice(name)
        shape = view.get_shape()
        if not 0 <= dim < len(shape) or not 0 <= start < stop <= shape[dim]:
            raise UnsupportedModel(
                f"tensor {name} of shape {tuple(shape)} has no slice {start}:{stop} along {dim}"
            )
        index = (*(slice(None) for _ in range(dim)), slice(start, stop))
        tensor: torch.Tensor = view[index]
        return tensor

    def dtype(self) -> torch.dtype:
        """The floating dtype most of the weights are stored in (what an import keeps)."""
        counts: dict[torch.dtype, int] = {}
        for name in self._shard_of:
            view = self._handle(name).get_slice(name)
            dtype = _DTYPES.get(view.get_dtype())
            if dtype is not None:
                counts[dtype] = counts.get(dtype, 0) + 1
        if not counts:
            raise UnsupportedModel(f"{self.folder} holds no floating-point weights")
        return max(counts, key=lambda d: counts[d])

    def _handle(self, name: str) -> Any:
        path = self._shard_of.get(name)
        if path is None:
            raise UnsupportedModel(f"the checkpoint in {self.folder} lacks tensor {name!r}")
        handle = self._open.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as exc:
                raise UnsupportedModel(f"cannot read {path}: {exc}") from None
            self._open[path] = handle
        return handle


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _shard_map(folder: Path) -> dict[str, Path]:
    """Which file holds each tensor: from the index when sharded, else the single file."""
    index_path = folder / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UnsupportedModel(f"cannot read {index_path}: {exc!r}") from None
        if not isinstance(weight_map, dict):
            raise UnsupportedModel(f"{index_path} has no weight_map object")
        shards = {str(shard) for shard in weight_map.values()}
        for shard in sorted(shards):
            # A shard name must stay inside the folder: the index is input, not a path to trust.
            if Path(shard).name != shard or not (folder / shard).is_file():
                raise UnsupportedModel(f"{index_path} names a missing shard {shard!r}")
        return {str(name): folder / str(shard) for name, shard in weight_map.items()}
    single = folder / SINGLE
    if not single.is_file():
        raise UnsupportedModel(
            f"{folder} has neither {SINGLE} nor {INDEX} (only safetensors checkpoints import)"
        )
    try:
        with safe_open(str(single), framework="pt") as handle:
            names = list(handle.keys())
    except (OSError, SafetensorError) as exc:
        raise UnsupportedModel(f"cannot read {single}: {exc}") from None
    return {name: single for name in names}
