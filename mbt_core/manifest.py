"""The manifest of an exported model: what was exported, by which hashes, valid until when.

``manifest.json`` is untrusted input until its signatures are checked, so :meth:`Manifest.from_dict`
validates every field and refuses unknown ones. Signatures cover :func:`canonical_bytes` of the
parsed manifest: exactly the fields the program uses, in one byte form, whatever the whitespace
or key order of the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from mbt_core.config import ModelConfig
from mbt_core.errors import ArtifactError
from mbt_core.fileio import atomic_write_bytes, read_capped

FORMAT = "mbt-manifest"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest lists files; anything this big is not one
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # ISO-8601 UTC to the second: one spelling per instant
ROLES = ("trunk", "branch")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = {"name", "role", "layer", "branch", "size", "sha256"}
_MANIFEST_KEYS = {
    "format",
    "format_version",
    "model_id",
    "model_version",
    "created_at",
    "expires_at",
    "config",
    "artifacts",
}


def check_file_name(name: str) -> None:
    """Refuse any artifact name but a plain file name inside the artifact folder."""
    if (
        not name
        or name in (".", "..", MANIFEST_FILE)
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
    ):
        raise ValueError(f"artifact name {name!r} is not a plain file name inside the folder")


@dataclass(frozen=True)
class ArtifactEntry:
    """One exported file: the trunk (no layer or branch) or one branch of one layer."""

    name: str
    role: str
    layer: int | None
    branch: int | None
    size: int
    sha256: str

    def __post_init__(self) -> None:
        check_file_name(self.name)
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {ROLES}, got {self.role!r}")
        if self.role == "trunk" and (self.layer is not None or self.branch is not None):
            raise ValueError(f"{self.name}: the trunk has no layer or branch")
        if self.role == "branch":
            for field_name, value in (("layer", self.layer), ("branch", self.branch)):
                if not (_is_int(value) and value >= 0):
                    raise ValueError(f"{self.name}: {field_name} must be an integer >= 0")
        if not _is_int(self.size) or self.size < 0:
            raise ValueError(f"{self.name}: size must be an integer >= 0, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "layer": self.layer,
            "branch": self.branch,
            "size": self.size,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class Manifest:
    """Model identity, validity window, config, and one entry per trunk or branch file."""

    model_id: str
    model_version: int  # only grows: nodes refuse a version below one they accepted
    created_at: datetime
    expires_at: datetime
    config: ModelConfig
    artifacts: tuple[ArtifactEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError("model_id must be a non-empty string")
        if not _is_int(self.model_version) or self.model_version < 1:
            raise ValueError(f"model_version must be an integer >= 1, got {self.model_version!r}")
        for name, when in (("created_at", self.created_at), ("expires_at", self.expires_at)):
            if when.tzinfo is None or when.utcoffset() or when.microsecond:
                raise ValueError(f"{name} must be a UTC time to the second, got {when}")
        if self.expires_at <= self.created_at:
            raise ValueError("expires_at must come after created_at")
        names = [a.name for a in self.artifacts]
        if len(set(names)) != len(names):
            raise ValueError("artifact names must be distinct")
        trunks = [a for a in self.artifacts if a.role == "trunk"]
        if len(trunks) != 1:
            raise ValueError(f"expected exactly one trunk artifact, found {len(trunks)}")
        found = sorted((a.layer, a.branch) for a in self.artifacts if a.role == "branch")
        wanted = [(li, b) for li, k in enumerate(self.config.branches) for b in range(k)]
        if found != wanted:
            raise ValueError(
                f"branch artifacts do not match the config's branches {self.config.branches}"
            )

    def trunk(self) -> ArtifactEntry:
        return next(a for a in self.artifacts if a.role == "trunk")

    def branch(self, layer: int, branch: int) -> ArtifactEntry:
        for a in self.artifacts:
            if a.role == "branch" and (a.layer, a.branch) == (layer, branch):
                return a
        raise ArtifactError(
            f"{MANIFEST_FILE}: no artifact for layer {layer} branch {branch} "
            f"(model has branches {self.config.branches})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
            "config": self.config.to_dict(),
            "artifacts": [a.to_dict() for a in self.artifacts],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate untrusted JSON; every failure is a ``ValueError`` saying which field."""
        if not isinstance(data, dict):
            raise ValueError("manifest must be a JSON object")
        _check_keys(data, _MANIFEST_KEYS, "manifest")
        if data["format"] != FORMAT:
            raise ValueError(f"not an MBT manifest (format {data['format']!r})")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"manifest format version {data['format_version']!r}, "
                f"this program reads version {FORMAT_VERSION}"
            )
        if not isinstance(data["config"], dict) or not isinstance(data["artifacts"], list):
            raise ValueError("config must be an object and artifacts a list")
        entries = []
        for i, item in enumerate(data["artifacts"]):
            if not isinstance(item, dict):
                raise ValueError(f"artifacts[{i}] must be an object")
            _check_keys(item, _ENTRY_KEYS, f"artifacts[{i}]")
            entries.append(ArtifactEntry(**item))
        return cls(
            model_id=data["model_id"],
            model_version=data["model_version"],
            created_at=_parse_time(data["created_at"], "created_at"),
            expires_at=_parse_time(data["expires_at"], "expires_at"),
            config=ModelConfig.from_dict(data["config"]),
            artifacts=tuple(entries),
        )


def canonical_bytes(manifest: Manifest) -> bytes:
    """The one byte form that is signed and digested (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 hex of the canonical bytes: how nodes and aggregator tell models apart."""
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate ``manifest.json``; this alone proves nothing about who wrote it."""
    path = Path(directory) / MANIFEST_FILE
    try:
        raw = read_capped(path, MAX_MANIFEST_BYTES)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read manifest ({exc.strerror})") from exc
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}, not a manifest") from exc
    try:
        return Manifest.from_dict(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: invalid manifest: {exc}") from exc


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write the readable (indented) form; signatures never depend on it."""
    path = Path(directory) / MANIFEST_FILE
    text = json.dumps(manifest.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def format_time(when: datetime) -> str:
    return when.strftime(TIME_FORMAT)


def _parse_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string like 2025-01-31T12:00:00Z")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a UTC time like 2025-01-31T12:00:00Z") from None


def _check_keys(data: dict[str, Any], expected: set[str], what: str) -> None:
    missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
    if missing or unknown:
        raise ValueError(f"{what}: missing keys {missing or '-'}, unknown keys {unknown or '-'}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
