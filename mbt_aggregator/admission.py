"""Admission: a candidate node is used only once it proved who it is and what it serves.

A TXT record or a peer list only says where to look. Identity first: with TLS, the id is the
one the node's certificate proves (:mod:`mbt_aggregator.identity`), which must equal the id
its mDNS record claimed (a static peer claims none), and the channel pins that id; without
TLS only the claim and ``Describe``'s answer can be compared. Then membership: with a signed
roster or an allow-list, the id must be on it. Then the model: the node must report the
manifest's model id, version and digest (or those of an earlier manifest that the current one
expands compatibly, :mod:`mbt_aggregator.expansion`), and for every branch it serves the
artifact hash the manifest lists. Rejections carry a short reason for metrics (identity,
roster, tls, ...).

An admitted node carries what its ``Describe`` said about calls (limits per Forward, its
per-caller session quota) and the dtype its layer inputs will travel in: the gateway's
``--wire-dtype``, or by default the dtype the node computes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mbt_aggregator.client import NodeClient
from mbt_aggregator.fit import CallLimits
from mbt_aggregator.identity import ClusterTls, IdentityError, presented_node_id
from mbt_aggregator.registry import Node
from mbt_core.artifacts.manifest import Manifest, manifest_digest
from mbt_core.errors import CodecError, MbtError, NodeCallError
from mbt_core.wire.codec import torch_dtype
from mbt_core.wire.contract import PROTOCOL_VERSION, NodeInfo


class Rejected(MbtError):
    def __init__(self, address: str, reason: str, details: str) -> None:
        super().__init__(f"node {address} rejected ({reason}): {details}")
        self.reason = reason


@dataclass(frozen=True)
class Expectation:
    model_id: str
    model_version: int
    manifest_sha256: str
    d_model: int
    branch_hashes: dict[tuple[int, int], str]
    allowed_ids: frozenset[str] | None = None
    roster_ids: frozenset[str] | None = None  # from a verified, operator-signed roster
    # Earlier manifests this gateway served, that the current one expands compatibly: a node
    # still on one of them is admitted for its branches, whose hashes the current one keeps.
    earlier: frozenset[tuple[int, str]] = frozenset()  # (model version, manifest digest)

    def serves(self, model_version: int, manifest_sha256: str) -> bool:
        """Whether a node reporting this manifest serves the expected model."""
        current = (self.model_version, self.manifest_sha256)
        return (model_version, manifest_sha256) == current or (
            (model_version, manifest_sha256) in self.earlier
        )

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        allowed_ids: frozenset[str] | None = None,
        roster_ids: frozenset[str] | None = None,
        earlier: frozenset[tuple[int, str]] = frozenset(),
    ) -> Expectation:
        hashes = {
            (e.layer, e.branch): e.sha256
            for e in manifest.artifacts
            if e.layer is not None and e.branch is not None
        }
        return cls(
            manifest.model_id,
            manifest.model_version,
            manifest_digest(manifest),
            manifest.config.d_model,
            hashes,
            allowed_ids,
            roster_ids,
            earlier,
        )


async def admit(
    address: str,
    expect: Expectation,
    timeout_s: float,
    tls: ClusterTls | None = None,
    claimed_id: str | None = None,
    wire_dtype: torch.dtype | None = None,
) -> Node:
    """The node at ``address`` as a :class:`Node`, or :class:`Rejected`.

    ``claimed_id`` is the id an mDNS record announced for this address (None: a static peer);
    ``wire_dtype`` the dtype to send it (None: the one it computes in).
    """
    node_id = claimed_id
    if tls is not None:
        try:
            node_id = await presented_node_id(address, tls, timeout_s)
        except IdentityError as exc:
            raise Rejected(address, exc.reason, exc.details) from exc
        _check_claim(address, (node_id, "its certificate proves"), (claimed_id, "its mDNS record"))
        _check_membership(address, node_id, expect)
    client = NodeClient(address, tls=tls.material if tls else None, node_id=node_id)
    try:
        try:
            info = await client.describe(timeout_s)
        except NodeCallError as exc:
            raise Rejected(address, "unreachable", exc.details) from exc
        source = "its certificate" if tls is not None else "its mDNS record"
        _check_claim(address, (info.node_id, "Describe reports"), (node_id, source))
        _check_membership(address, info.node_id, expect)
        _check(address, info, expect)
        try:
            computes_in = torch_dtype(info.dtype)
        except CodecError as exc:
            raise Rejected(address, "protocol", f"computes in {exc}") from exc
    except BaseException:
        await client.close()
        raise
    branches = frozenset((b.layer, b.branch) for b in info.branches)
    lim = info.limits
    # The worst case of one session: every served branch caches a whole context window.
    per_session = max(1, info.context_length * len(branches))
    quota = min(
        lim.max_sessions_per_caller or 1 << 30,
        (lim.max_cached_tokens_per_caller or 1 << 62) // per_session,
    )
    return Node(
        node_id=info.node_id,
        address=address,
        client=client,
        branches=branches,
        limits=CallLimits.reported(
            lim.max_steps_per_call, lim.max_tokens_per_call, lim.max_message_bytes
        ),
        wire_dtype=wire_dtype or computes_in,
        session_quota=max(1, quota),
    )


def _check_claim(address: str, actual: tuple[str, str], expected: tuple[str | None, str]) -> None:
    """``(id, where it comes from)`` twice: the ids must agree when one was expected."""
    (got, how), (want, source) = actual, expected
    if want is not None and got != want:
        shown = want[:16] or "no id"
        raise Rejected(address, "identity", f"{how} node {got[:16]}, but {source} says {shown}")


def _check_membership(address: str, node_id: str, expect: Expectation) -> None:
    if expect.roster_ids is not None and node_id not in expect.roster_ids:
        raise Rejected(address, "roster", f"node id {node_id[:16]} is not in the signed roster")
    if expect.allowed_ids is not None and node_id not in expect.allowed_ids:
        raise Rejected(address, "not_allowed", f"node id {node_id[:16]} is not on the allow-list")


def _check(address: str, info: NodeInfo, expect: Expectation) -> None:
    def reject(reason: str, details: str) -> None:
        raise Rejected(address, reason, details)

    if info.protocol_version != PROTOCOL_VERSION:
        reject("protocol", f"speaks version {info.protocol_version}")
    known = {expect.model_version} | {version for version, _ in expect.earlier}
    if info.model_id != expect.model_id or info.model_version not in known:
        reject(
            "model",
            f"serves {info.model_id} v{info.model_version}, "
            f"expected {expect.model_id} v{expect.model_version}",
        )
    if not expect.serves(info.model_version, info.manifest_sha256):
        reject(
            "manifest",
            f"manifest {info.manifest_sha256[:16]}, expected {expect.manifest_sha256[:16]}",
        )
    if info.d_model != expect.d_model:
        reject("shape", f"d_model {info.d_model}, expected {expect.d_model}")
    if not info.branches:
        reject("artifact", "serves no branch")
    for b in info.branches:
        want = expect.branch_hashes.get((b.layer, b.branch))
        if want is None or b.artifact_sha256 != want:
            reject(
                "artifact",
                f"layer {b.layer} branch {b.branch} has hash "
                f"{b.artifact_sha256[:16]}, the manifest says {(want or '-')[:16]}",
            )
