"""How a model's tensors split into artifact files: one file per branch, the rest in the trunk.

A branch file holds the keys of ``model.layers[l].branches[b].state_dict()`` so a node can load
it into a lone :class:`~mbt_core.model.blocks.Branch`; the trunk keeps the full model's key names.
The reference modules live on the meta device: they give expected names, shapes and dtypes
without allocating a single weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbt_core.model.blocks import Branch, Modules
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel

TRUNK_FILE = "trunk.safetensors"
TRUNK_FORMAT = "mbt-trunk"  # safetensors metadata "format" of the trunk file
BRANCH_FORMAT = "mbt-branch"
FILE_FORMAT_VERSION = 1


def branch_file(layer: int, branch: int) -> str:
    return f"layer{layer}-branch{branch}.safetensors"


def branch_prefix(layer: int, branch: int) -> str:
    """Where a branch's keys sit in the full model's state dict."""
    return f"layers.{layer}.branches.{branch}."


def split_state(
    model: MBTLanguageModel,
) -> tuple[dict[str, Tensor], dict[tuple[int, int], dict[str, Tensor]]]:
    """The trunk's tensors and each (layer, branch)'s tensors, on the CPU and contiguous."""
    branches = {
        (li, b): _cpu(branch.state_dict())
        for li, layer in enumerate(model.layers)
        for b, branch in enumerate(layer.branches)
    }
    prefixes = tuple(branch_prefix(li, b) for li, b in branches)
    trunk = {k: v for k, v in _cpu(model.state_dict()).items() if not k.startswith(prefixes)}
    return trunk, branches


def join_state(
    trunk: dict[str, Tensor], branches: dict[tuple[int, int], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The inverse of :func:`split_state`: one state dict for the whole model."""
    state = dict(trunk)
    for (li, b), tensors in branches.items():
        state.update({branch_prefix(li, b) + k: v for k, v in tensors.items()})
    return state


def trunk_reference(cfg: ModelConfig) -> MBTLanguageModel:
    """A weightless model stripped of its branches: its state dict is the trunk's."""
    with torch.device("meta"):
        model = MBTLanguageModel(cfg)
    for layer in model.layers:
        layer.branches = Modules()
    return model


def branch_reference(cfg: ModelConfig, layer: int) -> Branch:
    with torch.device("meta"):
        return Branch(cfg, layer)


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
