"""The manifest of an exported model: what was exported, by which hashes, valid until when.

``manifest.json`` is untrusted input until its signatures are checked, so :meth:`Manifest.from_dict`
validates every field and refuses unknown ones. Signatures cover :func:`canonical_bytes` of the
parsed manifest: exactly the fields the program uses, in one byte form, whatever the whitespace
or key order of the file.

A branch entry may carry a calibrated output-norm bound (``norm_bound``, written by
``mbt export``); it is omitted when absent, so manifests signed before it existed keep their
canonical bytes and signatures. So is ``expansion`` (:class:`Expansion`), present only when the
model grew layers by new branches (``mbt expand``) and the gateway should ramp them in.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mbt_core.errors import ArtifactError
from mbt_core.fileio import atomic_write_bytes, parse_json, read_capped
from mbt_core.jsonfields import (
    canonical_json,
    check_keys,
    format_time,
    is_int,
    is_number,
    parse_time,
)
from mbt_core.model.config import ModelConfig

FORMAT = "mbt-manifest"


FORMAT_VERSION = 1


MANIFEST_FILE = "manifest.json"


MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest lists files; anything this big is not one


ROLES = ("trunk", "branch")


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


_ENTRY_KEYS = {"name", "role", "layer", "branch", "size", "sha256"}


_OPTIONAL_ENTRY_KEYS = frozenset({"norm_bound"})


_NORM_KEYS = {"bound", "max", "quantile", "level"}


_EXPANSION_KEYS = {"base_branches", "start", "target", "ramp_s"}


_OPTIONAL_MANIFEST_KEYS = frozenset({"expansion"})


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
        not isinstance(name, str)
        or not name
        or name in (".", "..", MANIFEST_FILE)
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
    ):
        raise ValueError(f"artifact name {name!r} is not a plain file name inside the folder")


@dataclass(frozen=True)
class NormBound:
    """Per-position L2 norms of one branch's output on calibration text, signed at export.

    ``bound`` is what the gateway enforces (clip above it, reject far above it); ``max_norm``
    and ``quantile_norm`` (the ``level`` quantile) are the measurements it was derived from.
    """

    bound: float
    max_norm: float
    quantile_norm: float
    level: float

    def __post_init__(self) -> None:
        for name in ("bound", "max_norm", "quantile_norm", "level"):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"norm_bound {name} must be a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.level > 1:
            raise ValueError(f"norm_bound level must be in (0, 1], got {self.level}")
        if not self.quantile_norm <= self.max_norm <= self.bound:
            raise ValueError("norm_bound needs quantile <= max <= bound")

    def to_dict(self) -> dict[str, float]:
        return {
            "bound": self.bound,
            "max": self.max_norm,
            "quantile": self.quantile_norm,
            "level": self.level,
        }

    @classmethod
    def from_dict(cls, data: Any) -> NormBound:
        if not isinstance(data, dict):
            raise ValueError("norm_bound must be an object")
        check_keys(data, _NORM_KEYS, "norm_bound")
        return cls(data["bound"], data["max"], data["quantile"], data["level"])


@dataclass(frozen=True)
class Expansion:
    """This model is an older one (``base_branches`` per layer) grown by new branches, and how
    a serving gateway ramps them in: the injection rate beta goes linearly from ``start`` to
    ``target`` over ``ramp_s`` seconds once it accepts the expansion.

    Semantics for the gateway. ``alpha_N`` is the base model's weights of a layer, padded with
    zeros for the new branches, ``alpha_N1`` the expanded model's; the layer fuses with
    ``w(beta) = (1 - beta) * alpha_N + beta * alpha_N1``: beta = 0 is the base model, beta = 1
    the expanded checkpoint exactly. The expansion froze the old alpha logits, so ``alpha_N``
    is the softmax of the first ``base_branches[l]`` logits of the expanded model itself (no
    base model needed) and ``alpha_N1``'s old part is ``(1 - B) * alpha_N``, B the new
    branches' mass: at beta the new branches hold ``beta * B`` and the old ones keep their
    relative weights, scaled by ``1 - beta * B`` (``mbt_aggregator.mix.blend``). Missing
    branches drop out of ``w(beta)`` and the rest renormalize, as always. The old branches'
    artifacts are those of the base model, byte for byte, so nodes keep serving them across
    the upgrade.
    """

    base_branches: tuple[int, ...]
    start: float = 0.0
    target: float = 1.0
    ramp_s: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.base_branches, list | tuple) or not all(
            is_int(k) and k >= 1 for k in self.base_branches
        ):
            raise ValueError("expansion base_branches must list integers >= 1, one per layer")
        object.__setattr__(self, "base_branches", tuple(self.base_branches))
        for name in ("start", "target", "ramp_s"):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value)):
                raise ValueError(f"expansion {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.start <= self.target <= 1.0:
            raise ValueError(
                f"expansion needs 0 <= start <= target <= 1, got {self.start}, {self.target}"
            )
        if self.ramp_s < 0:
            raise ValueError(f"expansion ramp_s must be >= 0, got {self.ramp_s}")

    def check_config(self, config: ModelConfig) -> None:
        """Refuse an expansion that does not describe ``config``'s layers growing."""
        base, now = self.base_branches, config.branches
        if len(base) != len(now):
            raise ValueError(f"expansion lists {len(base)} layers, the model has {len(now)}")
        if any(b > k for b, k in zip(base, now, strict=True)):
            raise ValueError(f"expansion base_branches {base} exceed the branches {now}")
        if base == now:
            raise ValueError("expansion grows no layer: base_branches equal the branches")

    def grown(self, config: ModelConfig) -> list[int]:
        """The layers that gained branches."""
        return [li for li, k in enumerate(config.branches) if k > self.base_branches[li]]

    def beta_at(self, elapsed_s: float) -> float:
        """The injection rate ``elapsed_s`` seconds after the gateway accepted the expansion."""
        if self.ramp_s == 0 or elapsed_s >= self.ramp_s:
            return self.target
        return self.start + (self.target - self.start) * max(0.0, elapsed_s) / self.ramp_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_branches": list(self.base_branches),
            "start": self.start,
            "target": self.target,
            "ramp_s": self.ramp_s,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Expansion:
        """Validate untrusted JSON (its fit to a model is :meth:`check_config`'s)."""
        if not isinstance(data, dict):
            raise ValueError("expansion must be an object")
        check_keys(data, _EXPANSION_KEYS, "expansion")
        return cls(data["base_branches"], data["start"], data["target"], data["ramp_s"])


@dataclass(frozen=True)
class ArtifactEntry:
    """One exported file: the trunk (no layer or branch) or one branch of one layer."""

    name: str
    role: str
    layer: int | None
    branch: int | None
    size: int
    sha256: str
    norm_bound: NormBound | None = None  # branches only; absent in older manifests

    def __post_init__(self) -> None:
        check_file_name(self.name)
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {ROLES}, got {self.role!r}")
        if self.role == "trunk" and (self.layer is not None or self.branch is not None):
            raise ValueError(f"{self.name}: the trunk has no layer or branch")
        if self.role == "branch":
            for field_name, value in (("layer", self.layer), ("branch", self.branch)):
                if not (is_int(value) and value >= 0):
                    raise ValueError(f"{self.name}: {field_name} must be an integer >= 0")
        if not is_int(self.size) or self.size < 0:
            raise ValueError(f"{self.name}: size must be an integer >= 0, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if self.norm_bound is not None and (
            self.role != "branch" or not isinstance(self.norm_bound, NormBound)
        ):
            raise ValueError(f"{self.name}: only a branch has a norm_bound")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "role": self.role,
            "layer": self.layer,
            "branch": self.branch,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.norm_bound is not None:
            data["norm_bound"] = self.norm_bound.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, what: str) -> ArtifactEntry:
        if not isinstance(data, dict):
            raise ValueError(f"{what} must be an object")
        check_keys(data, _ENTRY_KEYS, what, optional=_OPTIONAL_ENTRY_KEYS)
        fields = {k: v for k, v in data.items() if k != "norm_bound"}
        bound = NormBound.from_dict(data["norm_bound"]) if "norm_bound" in data else None
        return cls(**fields, norm_bound=bound)


@dataclass(frozen=True)
class Manifest:
    """Model identity, validity window, config, and one entry per trunk or branch file."""

    model_id: str
    model_version: int  # only grows: nodes refuse a version below one they accepted
    created_at: datetime
    expires_at: datetime
    config: ModelConfig
    artifacts: tuple[ArtifactEntry, ...]
    expansion: Expansion | None = None  # absent unless layers grew (mbt expand)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError("model_id must be a non-empty string")
        if not is_int(self.model_version) or self.model_version < 1:
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
        if len(found) != sum(self.config.branches):  # before listing a claimed 10**12 branches
            raise ValueError(
                f"branch artifacts do not match the config's branches {self.config.branches}"
            )
        wanted = [(li, b) for li, k in enumerate(self.config.branches) for b in range(k)]
        if found != wanted:
            raise ValueError(
                f"branch artifacts do not match the config's branches {self.config.branches}"
            )
        if self.expansion is not None:
            if not isinstance(self.expansion, Expansion):
                raise ValueError("expansion must be an Expansion")
            self.expansion.check_config(self.config)

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

    def norm_bounds(self) -> dict[tuple[int, int], NormBound]:
        """(layer, branch) -> calibrated bound, for the branches the manifest gives one."""
        return {
            (a.layer, a.branch): a.norm_bound
            for a in self.artifacts
            if a.layer is not None and a.branch is not None and a.norm_bound is not None
        }

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
            "config": self.config.to_dict(),
            "artifacts": [a.to_dict() for a in self.artifacts],
        }
        if self.expansion is not None:
            data["expansion"] = self.expansion.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate untrusted JSON; every failure is a ``ValueError`` saying which field."""
        if not isinstance(data, dict):
            raise ValueError("manifest must be a JSON object")
        check_keys(data, _MANIFEST_KEYS, "manifest", optional=_OPTIONAL_MANIFEST_KEYS)
        if data["format"] != FORMAT:
            raise ValueError(f"not an MBT manifest (format {data['format']!r})")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"manifest format version {data['format_version']!r}, "
                f"this program reads version {FORMAT_VERSION}"
            )
        if not isinstance(data["config"], dict) or not isinstance(data["artifacts"], list):
            raise ValueError("config must be an object and artifacts a list")
        entries = [
            ArtifactEntry.from_dict(item, f"artifacts[{i}]")
            for i, item in enumerate(data["artifacts"])
        ]
        return cls(
            model_id=data["model_id"],
            model_version=data["model_version"],
            created_at=parse_time(data["created_at"], "created_at"),
            expires_at=parse_time(data["expires_at"], "expires_at"),
            config=ModelConfig.from_dict(data["config"]),
            artifacts=tuple(entries),
            expansion=Expansion.from_dict(data["expansion"]) if "expansion" in data else None,
        )


def canonical_bytes(manifest: Manifest) -> bytes:
    """The one byte form that is signed and digested (sorted keys, no spaces, UTF-8)."""
    return canonical_json(manifest.to_dict())


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
        return Manifest.from_dict(parse_json(raw))
    except (ValueError, TypeError, OverflowError) as exc:  # ModelConfig may int() an inf
        raise ArtifactError(f"{path}: invalid manifest: {exc}") from exc


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write the readable (indented) form; signatures never depend on it."""
    path = Path(directory) / MANIFEST_FILE
    text = json.dumps(manifest.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
