"""Rollback protection: the highest manifest version accepted per model id, in a JSON file.

A validly signed but older manifest (say, one with a known-bad branch) must not replace a newer
one, so loaders refuse any version below the recorded one. The file is small and rewritten
atomically, and only after a manifest passed every check; an unreadable file fails closed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mbt_core.errors import SignatureError
from mbt_core.fileio import atomic_write_bytes
from mbt_core.manifest import Manifest, manifest_digest

FORMAT = "mbt-accepted-versions"
STATE_FILE = "accepted-versions.json"


def default_state_file() -> Path:
    """``$MBT_STATE_DIR/accepted-versions.json``, else under ``~/.local/state/mbt``."""
    base = os.environ.get("MBT_STATE_DIR")
    root = Path(base) if base else Path.home() / ".local" / "state" / "mbt"
    return root / STATE_FILE


def accepted_version(state_file: Path, model_id: str) -> int | None:
    """The highest version of ``model_id`` accepted so far, or None."""
    entry = _read_state(state_file).get(model_id)
    return None if entry is None else int(entry["version"])


def rollback_problem(state_file: Path, manifest: Manifest) -> str | None:
    """Why ``manifest`` would be a rollback, or None when it is not."""
    accepted = accepted_version(state_file, manifest.model_id)
    if accepted is not None and manifest.model_version < accepted:
        return (
            f"model {manifest.model_id!r} version {manifest.model_version} is older than "
            f"version {accepted} already accepted (state file {state_file}): refusing a rollback"
        )
    return None


def record_accepted(state_file: Path, manifest: Manifest) -> None:
    """Raise the recorded version to ``manifest``'s; never lower it."""
    models = _read_state(state_file)
    current = models.get(manifest.model_id)
    if current is not None and int(current["version"]) > manifest.model_version:
        return
    models[manifest.model_id] = {
        "version": manifest.model_version,
        "manifest_digest": manifest_digest(manifest),
    }
    data = {"format": FORMAT, "models": models}
    atomic_write_bytes(state_file, (json.dumps(data, sort_keys=True, indent=2) + "\n").encode())


def _read_state(state_file: Path) -> dict[str, Any]:
    path = Path(state_file)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read rollback state ({exc.strerror})") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        models = data["models"]
        if not isinstance(models, dict):
            raise ValueError("models is not an object")
        for model_id, entry in models.items():
            version = entry["version"] if isinstance(entry, dict) else None
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError(f"model {model_id!r} has no integer version")
    except (UnicodeDecodeError, ValueError, KeyError) as exc:
        raise SignatureError(
            f"{path}: corrupt rollback state ({exc}); fix or remove it deliberately"
        ) from exc
    return models
