"""Rosters: the operator-signed list of node ids a gateway may admit.

A node id is the SHA-256 of its TLS certificate's public key (:func:`mbt_core.trust.certs.
public_key_fingerprint`), so a node on the roster is one that holds that private key; mDNS or a
peer list only says where to look. A roster is a signed document (:mod:`mbt_core.trust.documents`)
with a version and an expiry, verified like the manifest: against PEM public keys and a
threshold, or against the keys of a trust root.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mbt_core.errors import RosterError
from mbt_core.jsonfields import check_keys, format_time, is_int, parse_time
from mbt_core.trust.documents import SignedDocument, read_signed, sign_payload
from mbt_core.trust.root import TrustRoot, trusted_keys_and_threshold

FORMAT = "mbt-roster"
FORMAT_VERSION = 1
MAX_ROSTER_BYTES = 4 * 1024 * 1024
MAX_NODES = 10_000  # ~70 bytes each: well inside the size cap
_NODE_ID = re.compile(r"[0-9a-f]{64}")
_PAYLOAD_KEYS = {"format", "format_version", "version", "created_at", "expires_at", "node_ids"}


@dataclass(frozen=True)
class Roster:
    """A verified roster: who may serve, until when, and which trusted keys vouched for it."""

    version: int
    created_at: datetime
    expires_at: datetime
    node_ids: frozenset[str]
    signed_by: tuple[str, ...]


def check_node_id(node_id: str) -> str:
    """``node_id`` when it is 64 lowercase hex digits (a key fingerprint), else ValueError."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} is not 64 lowercase hex digits")
    return node_id


def sign_roster(
    node_ids: Iterable[str],
    keys: Sequence[Ed25519PrivateKey],
    *,
    version: int = 1,
    expires_days: int = 90,
    now: datetime | None = None,
) -> SignedDocument:
    """A roster of ``node_ids`` signed by every key in ``keys``; write it with ``to_json()``."""
    ids = sorted({check_node_id(n) for n in node_ids})
    if not ids or len(ids) > MAX_NODES:
        raise ValueError(f"a roster lists 1 to {MAX_NODES} node ids, got {len(ids)}")
    if not is_int(version) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    if expires_days <= 0:
        raise ValueError(f"expires_days must be positive, got {expires_days}")
    if not keys:
        raise ValueError("a roster needs at least one signing key")
    created = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": format_time(created),
        "expires_at": format_time(created + timedelta(days=expires_days)),
        "node_ids": ids,
    }
    return sign_payload(payload, keys)


def read_roster(
    path: Path,
    trust: Sequence[Path] | TrustRoot,
    threshold: int = 1,
    *,
    now: datetime | None = None,
) -> Roster:
    """The roster at ``path`` once signed by ``threshold`` trusted keys and unexpired.

    ``trust`` is PEM public key files or a trust root (whose threshold ``threshold`` may only
    raise). Every failure is a :class:`RosterError` naming the file.
    """
    trusted, needed = trusted_keys_and_threshold(trust, threshold)
    document = read_signed(Path(path), FORMAT, MAX_ROSTER_BYTES, RosterError)
    try:
        roster = _parse(document)
    except ValueError as exc:
        raise RosterError(f"{path}: invalid roster: {exc}") from exc
    check = document.check(trusted, needed)
    if check.problems:
        raise RosterError(f"{path}: roster is not trusted: " + "; ".join(check.problems))
    now = now or datetime.now(UTC)
    if now >= roster.expires_at:
        raise RosterError(
            f"{path}: roster version {roster.version} expired at "
            f"{format_time(roster.expires_at)} (now {format_time(now)})"
        )
    return Roster(
        roster.version, roster.created_at, roster.expires_at, roster.node_ids, check.valid_key_ids
    )


def load_roster(
    path: Path,
    trust: Sequence[Path] | TrustRoot,
    threshold: int = 1,
    *,
    now: datetime | None = None,
) -> frozenset[str]:
    """The allowed node ids of a verified roster (see :func:`read_roster`)."""
    return read_roster(path, trust, threshold, now=now).node_ids


def _parse(document: SignedDocument) -> Roster:
    p = document.payload
    check_keys(p, _PAYLOAD_KEYS, "roster")
    if p["format_version"] != FORMAT_VERSION:
        raise ValueError(f"format version {p['format_version']!r}, expected {FORMAT_VERSION}")
    if not is_int(p["version"]) or p["version"] < 1:
        raise ValueError(f"version must be an integer >= 1, got {p['version']!r}")
    created = parse_time(p["created_at"], "created_at")
    expires = parse_time(p["expires_at"], "expires_at")
    if expires <= created:
        raise ValueError("expires_at must come after created_at")
    ids = p["node_ids"]
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_NODES:
        raise ValueError(f"node_ids must be a list of 1 to {MAX_NODES} node ids")
    return Roster(p["version"], created, expires, frozenset(map(check_node_id, ids)), ())
