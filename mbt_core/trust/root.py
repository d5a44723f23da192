"""Trust roots: which keys may sign manifests and rosters, how many must, and how that rotates.

A root is a signed document (:mod:`mbt_core.trust.documents`) with a version, a validity window, a
threshold and Ed25519 public keys. The operator pins root v1 as a file. Root N+1 is accepted
only when a threshold of root N's keys *and* a threshold of its own keys signed it, so neither
a thief of the old keys nor one of the new keys alone can take over; versions rise by exactly
one per step, so a chain v1 -> v2 -> v3 is applied in order and none is skipped.

Accepted roots are kept in a state file (under a lock, written only once every check passed),
so a restart with only v1 pinned still trusts v3, and a root once superseded cannot return.
Expiry applies to the root in force: a superseded root of a chain may have expired, the one
that results may not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mbt_core.errors import TrustRootError
from mbt_core.fileio import atomic_write_bytes, locked, parse_json, read_capped
from mbt_core.jsonfields import check_keys, format_time, is_int, parse_time
from mbt_core.paths import default_state_dir
from mbt_core.trust.documents import SignedDocument, read_signed, sign_payload
from mbt_core.trust.keys import (
    check_threshold,
    key_id,
    load_trusted_keys,
    public_key_from_raw,
    raw_public_key,
    short_id,
)

FORMAT = "mbt-trust-root"
FORMAT_VERSION = 1
STATE_FILE = "trust-roots.json"
STATE_FORMAT = "mbt-accepted-roots"
MAX_ROOT_BYTES = 1024 * 1024  # a root with the maximum 64 keys is ~10 KiB
MAX_STATE_BYTES = 64 * 1024 * 1024
MAX_KEYS = 64
_PAYLOAD_KEYS = {
    "format",
    "format_version",
    "version",
    "created_at",
    "expires_at",
    "threshold",
    "keys",
}


@dataclass(frozen=True, eq=False)
class TrustRoot:
    """A parsed root whose own keys signed it; ``keys`` maps key id -> public key."""

    version: int
    created_at: datetime
    expires_at: datetime
    threshold: int
    keys: Mapping[str, Ed25519PublicKey]
    document: SignedDocument

    @property
    def digest(self) -> str:
        return self.document.digest

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at

    def describe(self) -> str:
        return (
            f"trust root version {self.version}: {len(self.keys)} key(s), threshold "
            f"{self.threshold}, expires {format_time(self.expires_at)}, digest {self.digest}"
        )


Trust = Sequence[Path] | TrustRoot  # PEM public key files (with a threshold), or a trust root


def create_root(
    public_keys: Iterable[Ed25519PublicKey],
    threshold: int,
    signers: Sequence[Ed25519PrivateKey],
    *,
    version: int = 1,
    expires_days: int = 365,
    now: datetime | None = None,
) -> TrustRoot:
    """A root listing ``public_keys``, signed by ``signers``; refused unless it self-verifies."""
    if expires_days <= 0:
        raise ValueError(f"expires_days must be positive, got {expires_days}")
    created = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    keys = {key_id(k): k for k in public_keys}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": format_time(created),
        "expires_at": format_time(created + timedelta(days=expires_days)),
        "threshold": threshold,
        "keys": {kid: base64.b64encode(raw_public_key(k)).decode() for kid, k in keys.items()},
    }
    return parse_root(sign_payload(payload, signers), "new root")


def rotate_root(
    current: TrustRoot,
    public_keys: Iterable[Ed25519PublicKey],
    threshold: int,
    signers: Sequence[Ed25519PrivateKey],
    *,
    expires_days: int = 365,
    now: datetime | None = None,
) -> TrustRoot:
    """Root ``current.version + 1``; ``signers`` must meet both the old and the new threshold."""
    new = create_root(
        public_keys,
        threshold,
        signers,
        version=current.version + 1,
        expires_days=expires_days,
        now=now,
    )
    check_successor(current, new, "new root")
    return new


def parse_root(document: SignedDocument, source: str) -> TrustRoot:
    """Validate a root's fields and that a threshold of its own keys signed it."""
    p = document.payload
    try:
        check_keys(p, _PAYLOAD_KEYS, "trust root")
        if p["format_version"] != FORMAT_VERSION:
            raise ValueError(f"format version {p['format_version']!r}, expected {FORMAT_VERSION}")
        version, threshold = p["version"], p["threshold"]
        if not is_int(version) or version < 1:
            raise ValueError(f"version must be an integer >= 1, got {version!r}")
        created = parse_time(p["created_at"], "created_at")
        expires = parse_time(p["expires_at"], "expires_at")
        if expires <= created:
            raise ValueError("expires_at must come after created_at")
        keys = _parse_keys(p["keys"])
        if not is_int(threshold):
            raise ValueError(f"threshold must be an integer, got {threshold!r}")
        check_threshold(threshold, len(keys))
    except ValueError as exc:
        raise TrustRootError(f"{source}: invalid trust root: {exc}") from exc
    check = document.check(keys, threshold)
    if check.problems:
        raise TrustRootError(
            f"{source}: trust root version {version} is not signed by its own keys: "
            + "; ".join(check.problems)
        )
    return TrustRoot(version, created, expires, threshold, MappingProxyType(keys), document)


def read_root(path: Path) -> TrustRoot:
    """A root file, self-verified (expiry is judged where the root is put in force)."""
    return parse_root(read_signed(Path(path), FORMAT, MAX_ROOT_BYTES, TrustRootError), str(path))


def check_successor(current: TrustRoot, new: TrustRoot, source: str) -> None:
    """Raise unless ``new`` is the next version and a threshold of ``current`` signed it."""
    if new.version != current.version + 1:
        raise TrustRootError(
            f"{source}: trust root version {new.version} does not follow version "
            f"{current.version}; roots must be applied one version at a time, in order"
        )
    check = new.document.check(current.keys, current.threshold)
    if check.problems:
        raise TrustRootError(
            f"{source}: trust root version {new.version} is not signed by the keys of version "
            f"{current.version}: " + "; ".join(check.problems)
        )


def resolve_trust_root(
    pinned: Path,
    updates: Sequence[Path] = (),
    state_file: Path | None = None,
    *,
    now: datetime | None = None,
    persist: bool = True,
) -> TrustRoot:
    """The root in force: pinned root, then the accepted chain in state, then ``updates``.

    Each step must pass :func:`check_successor`; a root already accepted may be given again
    (same digest), a different one with an accepted version is refused. The result must not
    have expired. With ``persist``, newly accepted roots are appended to the state file, and
    only after every check passed. Raises :class:`TrustRootError`.
    """
    state = Path(state_file) if state_file is not None else default_state_dir() / STATE_FILE
    current = read_root(pinned)
    seen = {current.version: current.digest}
    with locked(state) if persist else nullcontext():
        accepted = _read_state(state)
        for i, doc in enumerate(accepted):
            current = _advance(current, parse_root(doc, f"{state} root #{i}"), seen, str(state))
        known = len(accepted)
        chain = list(accepted)
        for path in updates:
            new = _advance(current, read_root(path), seen, str(path))
            if new is not current:
                chain.append(new.document)
            current = new
        if current.expired(now):
            raise TrustRootError(
                f"trust root version {current.version} expired at "
                f"{format_time(current.expires_at)}; a newer root is needed"
            )
        if persist and len(chain) > known:
            _write_state(state, chain)
    return current


def trusted_keys_and_threshold(
    trust: Sequence[Path] | TrustRoot, threshold: int = 1
) -> tuple[dict[str, Ed25519PublicKey], int]:
    """What a signature is counted against: a root's keys, its threshold a floor that
    ``threshold`` may raise; or PEM key files and ``threshold``."""
    if isinstance(trust, TrustRoot):
        return dict(trust.keys), max(threshold, trust.threshold)
    keys = load_trusted_keys(list(trust))
    check_threshold(threshold, len(keys))
    return keys, threshold


def _advance(current: TrustRoot, new: TrustRoot, seen: dict[int, str], source: str) -> TrustRoot:
    """``new`` when it is the successor; ``current`` when ``new`` is an older, known root."""
    if new.version <= current.version:
        known = seen.get(new.version)
        if known is not None and known != new.digest:
            raise TrustRootError(
                f"{source}: trust root version {new.version} (digest {short_id(new.digest)}) "
                f"differs from the accepted version {new.version} (digest {short_id(known)})"
            )
        return current  # already applied (or older than the pinned root): grants nothing
    check_successor(current, new, source)
    seen[new.version] = new.digest
    return new


def _parse_keys(data: object) -> dict[str, Ed25519PublicKey]:
    if not isinstance(data, dict) or not data or len(data) > MAX_KEYS:
        raise ValueError(f"keys must map 1 to {MAX_KEYS} key ids to base64 public keys")
    keys = {}
    for kid, encoded in data.items():
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ValueError(f"key {short_id(str(kid))}: not valid base64") from None
        if len(raw) != 32 or hashlib.sha256(raw).hexdigest() != kid:
            raise ValueError(f"key {short_id(str(kid))}: not the 32-byte key the id names")
        keys[kid] = public_key_from_raw(raw)
    return keys


def _read_state(path: Path) -> list[SignedDocument]:
    try:
        data = parse_json(read_capped(path, MAX_STATE_BYTES))
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"format is not {STATE_FORMAT!r}")
        roots = data.get("roots")
        if not isinstance(roots, list):
            raise ValueError("roots is not a list")
        return [SignedDocument.from_dict(item, FORMAT) for item in roots]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TrustRootError(f"{path}: cannot read accepted roots ({exc.strerror})") from exc
    except ValueError as exc:
        raise TrustRootError(
            f"{path}: corrupt accepted-roots state ({exc}); fix or remove it deliberately"
        ) from exc


def _write_state(path: Path, chain: list[SignedDocument]) -> None:
    data = {"format": STATE_FORMAT, "roots": [doc.to_dict() for doc in chain]}
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
