"""Where tensors run: one spelling check and one availability check for every process."""

from __future__ import annotations

import re

import torch

from mbt_core.errors import MbtError

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(name: str) -> str:
    """Refuse anything but ``cpu`` and ``cuda[:N]`` (a config check: nothing is touched)."""
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"device must be cpu or cuda[:N], got {name!r}")
    return name


def open_device(name: str) -> torch.device:
    """The device, once it is known to exist here: one clear error instead of a CUDA trace."""
    device = torch.device(check_device(name))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MbtError(f"--device {name}: this torch build or machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MbtError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices here")
    return device
