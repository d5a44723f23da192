"""Rollback protection: the highest manifest version (and its digest) accepted per model id.

A validly signed but older manifest (say, one with a known-bad branch) must not replace a newer
one, so loaders refuse any version below the recorded one. Two different manifests signed with
the same version are equivocation (one of them is not what the release process published), so
the same version is accepted again only with the same digest. The state file is small, capped
when read, rewritten atomically, and changed only inside an exclusive lock and only after every
check passed (re-run under the lock, since another process may have moved the floor); an
unreadable file fails closed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mbt_core.artifacts.manifest import Manifest, manifest_digest
from mbt_core.errors import SignatureError
from mbt_core.fileio import atomic_write_bytes, locked, parse_json, read_capped
from mbt_core.jsonfields import format_time, is_int
from mbt_core.paths import default_state_dir

FORMAT = "mbt-accepted-versions"
STATE_FILE = "accepted-versions.json"
MAX_STATE_BYTES = 4 * 1024 * 1024  # ~100 bytes per model id


def default_state_file() -> Path:
    """``accepted-versions.json`` in :func:`default_state_dir`."""
    return default_state_dir() / STATE_FILE


def accepted_version(state_file: Path, model_id: str) -> int | None:
    """The highest version of ``model_id`` accepted so far, or None."""
    entry = _read_state(state_file).get(model_id)
    return None if entry is None else int(entry["version"])


def timestamp_version(now: datetime | None = None) -> int:
    """A version that grows with time and reads as one: ``YYYYMMDDHHMMSSmmm`` in UTC."""
    t = (now or datetime.now(UTC)).astimezone(UTC)
    return int(t.strftime("%Y%m%d%H%M%S")) * 1000 + t.microsecond // 1000


def next_version(state_file: Path, model_id: str, now: datetime | None = None) -> int:
    """The default version of a new export: its timestamp, or one above what this machine has
    accepted for ``model_id`` if that is higher (a clock set back, a hand-picked version), so
    that exporting again never collides with an accepted version."""
    accepted = accepted_version(state_file, model_id)
    return max(timestamp_version(now), 0 if accepted is None else accepted + 1)


def rollback_problem(state_file: Path, manifest: Manifest) -> str | None:
    """Why ``manifest`` would be a rollback or an equivocation, or None when it is neither."""
    return _problem(_read_state(state_file), state_file, manifest)


def record_accepted(state_file: Path, manifest: Manifest, *, now: datetime | None = None) -> None:
    """Raise the recorded floor to ``manifest``, re-checking under the lock first.

    Raises :class:`SignatureError` (and writes nothing) when ``manifest`` expired, is older
    than the accepted version, or has the accepted version with a different digest.
    """
    now = now or datetime.now(UTC)
    if now >= manifest.expires_at:
        raise SignatureError(
            f"model {manifest.model_id!r} version {manifest.model_version} expired at "
            f"{format_time(manifest.expires_at)}; not recording it as accepted"
        )
    with locked(state_file):
        models = _read_state(state_file)
        problem = _problem(models, state_file, manifest)
        if problem is not None:
            raise SignatureError(problem)
        entry = {"version": manifest.model_version, "manifest_digest": manifest_digest(manifest)}
        if models.get(manifest.model_id) == entry:
            return  # already the floor: nothing to write
        models[manifest.model_id] = entry
        data = {"format": FORMAT, "models": models}
        text = json.dumps(data, sort_keys=True, indent=2) + "\n"
        atomic_write_bytes(state_file, text.encode("utf-8"))


def _problem(models: dict[str, Any], state_file: Path, manifest: Manifest) -> str | None:
    entry = models.get(manifest.model_id)
    if entry is None:
        return None
    accepted, digest = int(entry["version"]), entry["manifest_digest"]
    name, version = manifest.model_id, manifest.model_version
    fix = (
        f"export it again with a higher version (`mbt export --model-version {accepted + 1}`, "
        "or no --model-version: the default is always above what this machine accepted)"
    )
    if version < accepted:
        return (
            f"model {name!r} version {version} is older than version {accepted} already "
            f"accepted (state file {state_file}): refusing a rollback; if this export is meant "
            f"to replace it, {fix}"
        )
    if version == accepted and manifest_digest(manifest) != digest:
        return (
            f"model {name!r} version {version} has digest {manifest_digest(manifest)}, but "
            f"version {version} was accepted with digest {digest} (state file {state_file}): "
            f"two different manifests signed with one version, refusing the equivocation; {fix}"
        )
    return None


def _read_state(state_file: Path) -> dict[str, Any]:
    path = Path(state_file)
    try:
        data = parse_json(read_capped(path, MAX_STATE_BYTES))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        models = data.get("models")
        if not isinstance(models, dict):
            raise ValueError("models is not an object")
        for model_id, entry in models.items():
            if not isinstance(entry, dict) or not is_int(entry.get("version")):
                raise ValueError(f"model {model_id!r} has no integer version")
            if not isinstance(entry.get("manifest_digest"), str):
                raise ValueError(f"model {model_id!r} has no manifest digest")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read rollback state ({exc.strerror})") from exc
    except ValueError as exc:
        raise SignatureError(
            f"{path}: corrupt rollback state ({exc}); fix or remove it deliberately"
        ) from exc
    return models
