"""The shared vocabulary of the wire: one spelling for what node, gateway, client and
admission all mean the same way.

The protocol version, the DNS-SD service type and the metadata keys; a branch's key; a
session's step as a call carries it; and :class:`NodeInfo`, what a node's ``Describe`` says,
so that admission reads a dataclass and never a protobuf message. Plain Python: the protobuf
forms are made and read in :mod:`mbt_core.wire.codec` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

SERVICE_TYPE = "_mbt._tcp.local."
PROTOCOL_VERSION = 2  # 2: sessions are bound to their opener (step secrets)
# Trailing metadata of a node's FAILED_PRECONDITION: how many positions its cache holds.
CACHE_LENGTH_METADATA = "mbt-cache-length"

BranchKey = tuple[int, int]  # (layer, branch)


class SessionStep(NamedTuple):  # a tuple: built for every step of every call
    """One session's part of a ``Forward``: positions ``start..start+length`` of its cache,
    with the secret that binds the session to whoever opened it (protocol version 2)."""

    session_id: str
    start: int
    length: int
    secret: bytes


@dataclass(frozen=True)
class NodeLimits:
    """What a node accepts (zero: no limit reported)."""

    max_sessions: int = 0
    max_cached_tokens: int = 0
    max_message_bytes: int = 0
    max_steps_per_call: int = 0
    max_tokens_per_call: int = 0
    max_sessions_per_caller: int = 0
    max_cached_tokens_per_caller: int = 0


@dataclass(frozen=True)
class ServedBranch:
    layer: int
    branch: int
    artifact_sha256: str

    @property
    def key(self) -> BranchKey:
        return (self.layer, self.branch)


@dataclass(frozen=True)
class NodeInfo:
    """What a node says of itself in ``Describe``: a claim, checked by admission."""

    node_id: str
    model_id: str
    model_version: int
    manifest_sha256: str
    branches: tuple[ServedBranch, ...]
    device: str
    dtype: int  # the wire code of the dtype it computes in (see the codec)
    protocol_version: int
    limits: NodeLimits
    d_model: int
    context_length: int
    open_sessions: int = 0
    cached_tokens: int = 0


def format_branches(branches: tuple[BranchKey, ...]) -> str:
    return ",".join(f"{layer}:{branch}" for layer, branch in branches)


def parse_branches(text: str) -> tuple[BranchKey, ...]:
    """``"0:1,2:3"`` -> ((0, 1), (2, 3)); a clear ``ValueError`` otherwise."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            layer, branch = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"bad branch {item!r}: expected LAYER:BRANCH, e.g. 0:2") from None
        if layer < 0 or branch < 0:
            raise ValueError(f"bad branch {item!r}: layer and branch are non-negative")
        pairs.append((layer, branch))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"branch list {text!r} names a branch twice")
    return tuple(pairs)
