"""Helpers for the artifact and signing tests: keys in tmp folders, signed exports, tampering.

Every key is generated inside the test's tmp folder: no key material ever enters the repository.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.manifest import MANIFEST_FILE, Manifest
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.trust.keys import GeneratedKey, generate_key, load_private_key


def new_key(tmp_path: Path, name: str) -> GeneratedKey:
    return generate_key(tmp_path / "keys", name)


def export_signed(
    checkpoint: Checkpoint, out: Path, signers: Sequence[GeneratedKey], **export_kwargs: Any
) -> Manifest:
    """Export ``checkpoint`` into ``out`` and sign it with every key in ``signers``."""
    manifest = export_artifacts(checkpoint, out, **export_kwargs)
    for key in signers:
        sign_manifest(out, manifest, load_private_key(key.private_path))
    return manifest


def greedy_tokens(model: MBTLanguageModel, prompt: list[int], steps: int = 10) -> list[int]:
    """Argmax next tokens, one full forward per step (no cache: the plainest reference)."""
    idx = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(idx)[0, -1].argmax())
            out.append(token)
            idx = torch.cat([idx, torch.tensor([[token]])], dim=1)
    return out


def edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change ``manifest.json`` in place, as an attacker with write access would."""
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte (by default the last: tensor data, so the file still parses)."""
    data = bytearray(path.read_bytes())
    i = len(data) - 1 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
