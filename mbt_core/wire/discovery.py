"""The DNS-SD record a branch node advertises (TXT keys).

Only the record format lives here, shared by the node (which advertises) and the aggregator
(which browses); neither zeroconf nor sockets are touched. Everything in a TXT record is a
hint: the aggregator confirms it with ``Describe`` before it uses a node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mbt_core.wire.contract import PROTOCOL_VERSION, format_branches, parse_branches

_MAX_TXT_ENTRY = 255  # bytes per key=value string (RFC 6763 section 6.1)


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    model_id: str
    model_version: int
    manifest_sha256: str
    branches: tuple[tuple[int, int], ...]
    device: str
    protocol_version: int = PROTOCOL_VERSION

    def to_txt(self) -> dict[str, str]:
        txt = {
            "id": self.node_id,
            "model": self.model_id,
            "ver": str(self.model_version),
            "manifest": self.manifest_sha256,
            "br": format_branches(self.branches),
            "proto": str(self.protocol_version),
            "dev": self.device,
        }
        for key, value in txt.items():
            if len(key) + 1 + len(value.encode()) > _MAX_TXT_ENTRY:
                raise ValueError(f"TXT entry {key!r} is longer than {_MAX_TXT_ENTRY} bytes")
        return txt

    @classmethod
    def from_txt(cls, props: Mapping[bytes | str, bytes | str | None]) -> NodeRecord:
        """Parse (untrusted) TXT properties; raises ``ValueError`` naming what is wrong."""
        text = {
            (k.decode() if isinstance(k, bytes) else k): (
                v.decode() if isinstance(v, bytes) else (v or "")
            )
            for k, v in props.items()
        }
        missing = [k for k in ("id", "model", "ver", "manifest", "br", "proto") if k not in text]
        if missing:
            raise ValueError(f"TXT record lacks {', '.join(missing)}")
        try:
            version, proto = int(text["ver"]), int(text["proto"])
        except ValueError:
            raise ValueError("TXT ver and proto must be integers") from None
        return cls(
            node_id=text["id"],
            model_id=text["model"],
            model_version=version,
            manifest_sha256=text["manifest"],
            branches=parse_branches(text["br"]),
            device=text.get("dev", ""),
            protocol_version=proto,
        )
