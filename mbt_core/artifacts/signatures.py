"""Detached manifest signatures: one ``signatures/<key_id>.sig`` file per signer.

Each signer adds a file beside the manifest, so a deployment can require several independent
signers: the manifest counts as signed when ``threshold`` distinct trusted keys have a valid
signature over its canonical bytes (the rules are :mod:`mbt_core.trust.keys`').
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mbt_core.artifacts.manifest import MANIFEST_FILE, Manifest, canonical_bytes, manifest_digest
from mbt_core.fileio import atomic_write_bytes, read_capped
from mbt_core.trust.keys import (
    ALGORITHM,
    KEY_ID,
    SignatureCheck,
    check_threshold,
    key_id,
    short_id,
    shortfall,
    verify_one,
)

FORMAT = "mbt-signature"


SIGNATURES_DIR = "signatures"


MAX_SIGNATURE_BYTES = 64 * 1024  # a signature file is ~300 bytes; refuse to read a huge one


_SIGNATURE_KEYS = {"format", "key_id", "algorithm", "signature", "manifest_digest"}


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
            if not isinstance(data[name], str) or not KEY_ID.fullmatch(data[name]):
                raise ValueError(f"{name} must be 64 lowercase hex digits")
        try:
            signature = base64.b64decode(data["signature"], validate=True)
        except (binascii.Error, TypeError):
            raise ValueError("signature is not valid base64") from None
        if len(signature) != 64:
            raise ValueError(f"an Ed25519 signature has 64 bytes, got {len(signature)}")
        return cls(data["key_id"], signature, data["manifest_digest"])


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


def _read_signature(path: Path) -> Signature:
    try:
        raw = read_capped(path, MAX_SIGNATURE_BYTES)
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror})") from exc
    try:
        return Signature.from_json(raw)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 JSON") from None
