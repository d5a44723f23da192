"""Canonical JSON and the field checks of the documents the runtime stores and signs.

One byte form (sorted keys, no spaces, UTF-8) is signed and digested everywhere: manifests,
trust roots, rosters. The checks refuse unknown or missing keys and booleans posing as numbers.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, TypeGuard

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # ISO-8601 UTC to the second: one spelling per instant


def canonical_json(data: Any) -> bytes:
    """The one byte form that is signed: sorted keys, no spaces, UTF-8."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def format_time(when: datetime) -> str:
    return when.strftime(TIME_FORMAT)


def parse_time(value: Any, name: str) -> datetime:
    """A UTC time written by :func:`format_time`; ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string like 2025-01-31T12:00:00Z")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a UTC time like 2025-01-31T12:00:00Z") from None


def check_keys(
    data: dict[str, Any], expected: set[str], what: str, optional: frozenset[str] = frozenset()
) -> None:
    """Refuse an object lacking any of ``expected`` or holding keys outside it and ``optional``."""
    missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected - optional)
    if missing or unknown:
        raise ValueError(f"{what}: missing keys {missing or '-'}, unknown keys {unknown or '-'}")


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
