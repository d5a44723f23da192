"""Self-contained signed JSON documents: a payload plus signatures over its canonical bytes.

Trust roots and rosters travel as one file each, so unlike the manifest (detached signature
files beside it) their signatures sit inside the document::

    {"format": "mbt-signed", "signed": {...payload...},
     "signatures": [{"key_id": "...", "algorithm": "ed25519", "signature": "base64"}]}

What is signed is the payload's canonical JSON (sorted keys, no spaces, UTF-8). The payload's
own ``format`` names the kind of document, so a signature over a roster never passes as one
over a trust root. Counting against a threshold follows the manifest's rules
(:func:`mbt_core.trust.keys.verify_one`, :func:`mbt_core.trust.keys.shortfall`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mbt_core.errors import SignatureError
from mbt_core.fileio import parse_json, read_capped
from mbt_core.jsonfields import canonical_json, check_keys
from mbt_core.trust.keys import (
    ALGORITHM,
    SignatureCheck,
    check_threshold,
    key_id,
    short_id,
    shortfall,
    verify_one,
)

FORMAT = "mbt-signed"
MAX_SIGNATURES = 64  # far above any real threshold; bounds the work a hostile file can cause
_SIGNATURE_KEYS = {"key_id", "algorithm", "signature"}
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, eq=False)
class SignedDocument:
    """A parsed (not yet trusted) payload and the signatures it carries, by key id."""

    payload: dict[str, Any]
    signatures: tuple[tuple[str, bytes], ...]

    @property
    def message(self) -> bytes:
        return canonical_json(self.payload)

    @property
    def digest(self) -> str:
        """SHA-256 hex of the signed bytes: names one document whatever its file's layout."""
        return hashlib.sha256(self.message).hexdigest()

    def check(self, trusted: Mapping[str, Ed25519PublicKey], threshold: int) -> SignatureCheck:
        """Distinct trusted keys that signed; a problem per forged signature or shortfall."""
        check_threshold(threshold, len(trusted))
        message = self.message
        valid, untrusted, problems = set(), set(), []
        for kid, signature in self.signatures:
            outcome = verify_one(trusted, kid, signature, message)
            if outcome == "valid":
                valid.add(kid)
            elif outcome == "untrusted":
                untrusted.add(kid)
            else:
                problems.append(
                    f"signature by trusted key {short_id(kid)} does not verify: "
                    "document changed after signing?"
                )
        missing = shortfall(len(valid), threshold, untrusted)
        if missing is not None:
            problems.append(missing)
        return SignatureCheck(tuple(sorted(valid)), tuple(problems))

    def to_json(self) -> bytes:
        """The readable (indented) file form; the signatures never depend on it."""
        text = json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False)
        return (text + "\n").encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "signed": self.payload,
            "signatures": [
                {
                    "key_id": kid,
                    "algorithm": ALGORITHM,
                    "signature": base64.b64encode(sig).decode("ascii"),
                }
                for kid, sig in self.signatures
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, kind: str) -> SignedDocument:
        """Validate the envelope's shape; ``ValueError`` says what is wrong. Trusts nothing."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        check_keys(data, {"format", "signed", "signatures"}, "document")
        if data["format"] != FORMAT:
            raise ValueError(f"not a signed MBT document (format {data['format']!r})")
        payload, items = data["signed"], data["signatures"]
        if not isinstance(payload, dict) or payload.get("format") != kind:
            found = payload.get("format") if isinstance(payload, dict) else None
            raise ValueError(f"expected a signed {kind!r} document, found {found!r}")
        if not isinstance(items, list) or len(items) > MAX_SIGNATURES:
            raise ValueError(f"signatures must be a list of at most {MAX_SIGNATURES}")
        signatures = tuple(_parse_signature(item, i) for i, item in enumerate(items))
        kids = [kid for kid, _ in signatures]
        if len(set(kids)) != len(kids):
            raise ValueError("a key signs more than once")
        return cls(payload, signatures)


def sign_payload(payload: Mapping[str, Any], keys: Sequence[Ed25519PrivateKey]) -> SignedDocument:
    """``payload`` signed by every key in ``keys`` (the same key twice signs once)."""
    body = json.loads(canonical_json(payload))  # a plain JSON copy: what is signed is kept
    message = canonical_json(body)
    signatures = {key_id(k.public_key()): k.sign(message) for k in keys}
    return SignedDocument(body, tuple(sorted(signatures.items())))


def read_signed(path: Path, kind: str, limit: int, error: type[SignatureError]) -> SignedDocument:
    """Read and parse a signed ``kind`` document; any failure is ``error`` naming ``path``."""
    try:
        raw = read_capped(path, limit)
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise error(f"{path}: {exc}, not a signed {kind} document") from exc
    try:
        return SignedDocument.from_dict(parse_json(raw), kind)
    except ValueError as exc:
        raise error(f"{path}: invalid {kind} document: {exc}") from exc


def _parse_signature(item: Any, i: int) -> tuple[str, bytes]:
    if not isinstance(item, dict):
        raise ValueError(f"signatures[{i}] must be an object")
    check_keys(item, _SIGNATURE_KEYS, f"signatures[{i}]")
    kid, algorithm, encoded = item["key_id"], item["algorithm"], item["signature"]
    if algorithm != ALGORITHM:
        raise ValueError(f"signatures[{i}]: unsupported algorithm {algorithm!r}")
    if not isinstance(kid, str) or len(kid) != 64 or not set(kid) <= _HEX:
        raise ValueError(f"signatures[{i}]: key_id must be 64 lowercase hex digits")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError(f"signatures[{i}]: signature is not valid base64") from None
    if len(signature) != 64:
        raise ValueError(f"signatures[{i}]: an Ed25519 signature has 64 bytes")
    return kid, signature
