"""Ed25519 signing keys and detached manifest signatures, counted against a trust threshold.

A key is named by its key id, the SHA-256 of its raw 32-byte public key. Each signer adds one
``signatures/<key_id>.sig`` file beside the manifest, so a deployment can require several
independent signers: the manifest counts as signed when ``threshold`` distinct trusted keys have
a valid signature over its canonical bytes. :func:`verify_one` and :func:`shortfall` are the
counting rules shared with the other signed documents (``mbt_core.envelope``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mbt_core.errors import SignatureError
from mbt_core.fileio import atomic_write_bytes, create_new_bytes, read_capped
from mbt_core.manifest import MANIFEST_FILE, Manifest, canonical_bytes, manifest_digest

ALGORITHM = "ed25519"
FORMAT = "mbt-signature"
SIGNATURES_DIR = "signatures"
MAX_SIGNATURE_BYTES = 64 * 1024  # a signature file is ~300 bytes; refuse to read a huge one
MAX_KEY_BYTES = 64 * 1024  # a PEM key is a few hundred bytes
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_KEYS = {"format", "key_id", "algorithm", "signature", "manifest_digest"}


@dataclass(frozen=True)
class GeneratedKey:
    key_id: str
    private_path: Path
    public_path: Path


@dataclass(frozen=True)
class Signature:
    """A detached signature over a manifest's canonical bytes.

    ``manifest_digest`` is informative only (it makes a stale signature easy to diagnose); what
    counts is that ``signature`` verifies against the manifest being checked.
    """

    key_id: str
    signature: bytes
    manifest_digest: str

    def to_json(self) -> bytes:
        data = {
            "format": FORMAT,
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "manifest_digest": self.manifest_digest,
        }
        return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Signature:
        data: Any = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or set(data) != _SIGNATURE_KEYS:
            raise ValueError(f"expected an object with keys {sorted(_SIGNATURE_KEYS)}")
        if data["format"] != FORMAT:
            raise ValueError(f"not an MBT signature (format {data['format']!r})")
        if data["algorithm"] != ALGORITHM:
            raise ValueError(f"unsupported algorithm {data['algorithm']!r} (only {ALGORITHM})")
        for name in ("key_id", "manifest_digest"):
            if not isinstance(data[name], str) or not _KEY_ID.fullmatch(data[name]):
                raise ValueError(f"{name} must be 64 lowercase hex digits")
        try:
            signature = base64.b64decode(data["signature"], validate=True)
        except (binascii.Error, TypeError):
            raise ValueError("signature is not valid base64") from None
        if len(signature) != 64:
            raise ValueError(f"an Ed25519 signature has 64 bytes, got {len(signature)}")
        return cls(data["key_id"], signature, data["manifest_digest"])


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


def sign_manifest(directory: Path, manifest: Manifest, key: Ed25519PrivateKey) -> Path:
    """Write (or replace) this key's signature of ``manifest`` in ``directory/signatures``."""
    kid = key_id(key.public_key())
    sig = Signature(kid, key.sign(canonical_bytes(manifest)), manifest_digest(manifest))
    path = Path(directory) / SIGNATURES_DIR / f"{kid}.sig"
    atomic_write_bytes(path, sig.to_json())
    return path


def check_signatures(
    directory: Path,
    manifest: Manifest,
    trusted: Mapping[str, Ed25519PublicKey],
    threshold: int,
) -> SignatureCheck:
    """Verify every signature file; fail on a bad one or on fewer than ``threshold`` valid."""
    check_threshold(threshold, len(trusted))
    message, digest = canonical_bytes(manifest), manifest_digest(manifest)
    valid: set[str] = set()
    untrusted: set[str] = set()
    problems: list[str] = []
    for path in sorted((Path(directory) / SIGNATURES_DIR).glob("*.sig")):
        try:
            sig = _read_signature(path)
        except ValueError as exc:
            problems.append(f"{path}: invalid signature file: {exc}")
            continue
        outcome = verify_one(trusted, sig.key_id, sig.signature, message)
        if outcome == "valid":
            valid.add(sig.key_id)
        elif outcome == "untrusted":
            untrusted.add(sig.key_id)
        else:
            problems.append(
                f"{path}: signature by trusted key {short_id(sig.key_id)} does not verify "
                f"against {MANIFEST_FILE} (signed digest {short_id(sig.manifest_digest)}, "
                f"manifest digest {short_id(digest)}): manifest changed after signing?"
            )
    missing = shortfall(len(valid), threshold, untrusted)
    if missing is not None:
        problems.append(f"{Path(directory) / MANIFEST_FILE}: {missing}")
    return SignatureCheck(tuple(sorted(valid)), tuple(problems))


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


def _read_signature(path: Path) -> Signature:
    try:
        raw = read_capped(path, MAX_SIGNATURE_BYTES)
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror})") from exc
    try:
        return Signature.from_json(raw)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 JSON") from None


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
