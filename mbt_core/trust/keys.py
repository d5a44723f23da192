"""Ed25519 signing keys, key ids, and the counting rules of a signature threshold.

A key is named by its key id, the SHA-256 of its raw 32-byte public key. :func:`verify_one`
and :func:`shortfall` are the rules every signed thing shares (manifests, trust roots,
rosters): a document counts as signed when ``threshold`` distinct trusted keys verify.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mbt_core.errors import SignatureError
from mbt_core.fileio import create_new_bytes, read_capped

ALGORITHM = "ed25519"


MAX_KEY_BYTES = 64 * 1024  # a PEM key is a few hundred bytes


KEY_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class GeneratedKey:
    key_id: str
    private_path: Path
    public_path: Path


@dataclass(frozen=True)
class SignatureCheck:
    """Distinct trusted keys whose signature verified, and one line per problem found."""

    valid_key_ids: tuple[str, ...]
    problems: tuple[str, ...]


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()


def generate_key(out_dir: Path, name: str = "mbt-signing") -> GeneratedKey:
    """Write ``NAME.private.pem`` (mode 0600) and ``NAME.public.pem``; never overwrite."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir)
    private_path, public_path = out / f"{name}.private.pem", out / f"{name}.public.pem"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SignatureError(f"{path}: already exists; refusing to overwrite a key")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create_new(private_path, private_pem, 0o600)
    try:
        _create_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return GeneratedKey(key_id(key.public_key()), private_path, public_path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = _load_pem(path, private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = _load_pem(path, private=False)
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def load_trusted_keys(paths: Sequence[Path]) -> dict[str, Ed25519PublicKey]:
    """Key id -> key; the same key given twice counts once towards a threshold."""
    return {key_id(key): key for key in (load_public_key(Path(p)) for p in paths)}


def verify_one(
    trusted: Mapping[str, Ed25519PublicKey], kid: str, signature: bytes, message: bytes
) -> Literal["valid", "untrusted", "invalid"]:
    """One signature's standing: by a trusted key and verifying, by an unknown key, or forged.

    An unknown key is no problem in itself (another verifier may trust it); a trusted key's
    signature that does not verify always is.
    """
    key = trusted.get(kid)
    if key is None:
        return "untrusted"
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return "invalid"
    return "valid"


def shortfall(n_valid: int, threshold: int, untrusted: Iterable[str] = ()) -> str | None:
    """The message for fewer than ``threshold`` valid trusted signatures, else None."""
    if n_valid >= threshold:
        return None
    others = ", ".join(sorted(map(short_id, set(untrusted))))
    return f"{n_valid} of {threshold} required trusted signatures" + (
        f" (signatures by untrusted keys {others})" if others else ""
    )


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes (as trust roots store keys)."""
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_threshold(threshold: int, n_trusted: int) -> None:
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if threshold > n_trusted:
        raise ValueError(
            f"threshold {threshold} cannot be met by {n_trusted} distinct trusted key(s)"
        )


def short_id(hex_id: str) -> str:
    """The first 16 hex digits: enough to tell keys apart in a message."""
    return hex_id[:16]


def _load_pem(path: Path, private: bool) -> object:
    try:
        data = read_capped(path, MAX_KEY_BYTES)
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read key ({exc.strerror})") from exc
    except ValueError as exc:
        raise SignatureError(f"{path}: {exc}, not a PEM key") from exc
    try:
        if private:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        kind = "private" if private else "public"
        raise SignatureError(f"{path}: not a readable unencrypted PEM {kind} key ({exc})") from exc


def _create_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` whole with ``mode``, never replacing a file (a key is never overwritten)."""
    try:
        create_new_bytes(path, data, mode)
    except FileExistsError:
        raise SignatureError(f"{path}: already exists; refusing to overwrite a key") from None
