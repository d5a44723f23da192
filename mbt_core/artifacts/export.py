"""Export a checkpoint as per-branch artifact files plus a trunk and a manifest to sign.

Each node downloads and verifies only the files it serves, so every branch gets its own file
and its own hash in the manifest. The manifest is written last: a folder with a manifest never
points at files that are not there yet. Calibrated output-norm bounds
(:mod:`mbt_core.artifacts.calibration`), when given, go into each branch's manifest entry, so
they are signed with everything else. A checkpoint grown by ``mbt expand`` carries its
:class:`~mbt_core.artifacts.manifest.Expansion` in ``info["expansion"]`` (JSON), which becomes
the manifest's ``expansion``; its old branches' files are the base model's, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from torch import Tensor

from mbt_core.artifacts.layout import (
    BRANCH_FORMAT,
    FILE_FORMAT_VERSION,
    TRUNK_FILE,
    TRUNK_FORMAT,
    branch_file,
    split_state,
)
from mbt_core.artifacts.manifest import (
    MANIFEST_FILE,
    ArtifactEntry,
    Expansion,
    Manifest,
    NormBound,
    write_manifest,
)
from mbt_core.errors import ArtifactError
from mbt_core.fileio import atomic_write_bytes
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.tensorfile import write_tensors
from mbt_core.model.tokenizer import vocabulary_problem

DEFAULT_MODEL_ID = "mbt-default"
EXPANSION_INFO = "expansion"  # the checkpoint info key mbt expand writes


def expansion_of(checkpoint: Checkpoint) -> Expansion | None:
    """The expansion a grown checkpoint's info records (None for any other model)."""
    raw = checkpoint.info.get(EXPANSION_INFO)
    if raw is None:
        return None
    try:
        expansion = Expansion.from_dict(json.loads(raw))
        expansion.check_config(checkpoint.model.cfg)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"checkpoint info {EXPANSION_INFO!r} is invalid: {exc}") from exc
    return expansion


def export_artifacts(
    checkpoint: Checkpoint,
    out_dir: Path,
    *,
    model_id: str = DEFAULT_MODEL_ID,
    model_version: int = 1,
    expires_days: int = 365,
    now: datetime | None = None,
    norm_bounds: Mapping[tuple[int, int], NormBound] | None = None,
) -> Manifest:
    """Write the artifact files and ``manifest.json`` into ``out_dir`` (new or empty).

    ``norm_bounds`` (from :func:`mbt_core.artifacts.calibration.branch_norm_bounds`) must then cover
    every branch.
    """
    if expires_days <= 0:
        raise ValueError(f"expires_days must be positive, got {expires_days}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: exists and is not an empty folder; export into a new one")
    created = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    problem = vocabulary_problem(tokenizer, model.cfg.vocab_size, model.cfg.kind == "sliced")
    if problem:
        raise ArtifactError(problem)
    trunk, branches = split_state(model)
    if norm_bounds is not None and set(norm_bounds) != set(branches):
        raise ValueError("norm_bounds must give exactly one bound per (layer, branch)")
    trunk_meta = {
        "format": TRUNK_FORMAT,
        "format_version": str(FILE_FORMAT_VERSION),
        "tokenizer": tokenizer.to_json(),
        "info": json.dumps(checkpoint.info, sort_keys=True),
    }
    files = [_serialize(TRUNK_FILE, trunk, trunk_meta, "trunk", None, None)]
    for (li, b), tensors in branches.items():
        meta = {
            "format": BRANCH_FORMAT,
            "format_version": str(FILE_FORMAT_VERSION),
            "layer": str(li),
            "branch": str(b),
        }
        entry, data = _serialize(branch_file(li, b), tensors, meta, "branch", li, b)
        if norm_bounds is not None:
            entry = replace(entry, norm_bound=norm_bounds[(li, b)])
        files.append((entry, data))
    # Built before anything is written, so invalid arguments leave no half-filled folder.
    manifest = Manifest(
        model_id=model_id,
        model_version=model_version,
        created_at=created,
        expires_at=created + timedelta(days=expires_days),
        config=model.cfg,
        artifacts=tuple(entry for entry, _ in files),
        expansion=expansion_of(checkpoint),
    )
    for entry, data in files:
        atomic_write_bytes(out / entry.name, data)
    write_manifest(out, manifest)
    return manifest


def _serialize(
    name: str,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    role: str,
    layer: int | None,
    branch: int | None,
) -> tuple[ArtifactEntry, bytes]:
    # The standard safetensors writer orders the metadata as a hash map does: randomly, so
    # two exports of the same branch would differ in bytes and hash. This one is stable.
    buffer = io.BytesIO()
    write_tensors(buffer, {k: v.detach().cpu() for k, v in tensors.items()}, metadata)
    data = buffer.getvalue()
    entry = ArtifactEntry(
        name=name,
        role=role,
        layer=layer,
        branch=branch,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return entry, data


def publish(release: Path, folder: Path) -> None:
    """Copy the export ``release`` over the served ``folder``: its files first, its manifest
    last, so a process that reads the folder meanwhile never finds a manifest whose files are
    not all there (an old branch file it still lists stays until replaced)."""
    files = sorted(
        (p for p in Path(release).rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST_FILE
    )
    for path in files:
        target = Path(folder) / path.relative_to(release)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, path.read_bytes())
