"""Admission: a candidate node is used only if ``Describe`` proves it serves the signed model.

A TXT record or a peer list only says where to look. The node must report the manifest's
model id, version and digest, and for every branch it serves the artifact hash the manifest
lists; with an allow-list, its id must be on it. Rejections carry a short reason for metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbt_aggregator.client import NodeCallError, NodeClient
from mbt_aggregator.registry import Node
from mbt_core.discovery import PROTOCOL_VERSION
from mbt_core.errors import MbtError
from mbt_core.manifest import Manifest, manifest_digest
from mbt_core.protocol.mbt.v1 import branch_pb2 as pb


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

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, allowed_ids: frozenset[str] | None = None
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
        )


async def admit(address: str, expect: Expectation, timeout_s: float) -> Node:
    """Describe the node at ``address`` and return it as a :class:`Node`, or raise Rejected."""
    client = NodeClient(address)
    try:
        try:
            info = await client.describe(timeout_s)
        except NodeCallError as exc:
            raise Rejected(address, "unreachable", exc.details) from exc
        _check(address, info, expect)
    except BaseException:
        await client.close()
        raise
    branches = frozenset((b.layer, b.branch) for b in info.branches)
    return Node(node_id=info.node_id, address=address, client=client, branches=branches)


def _check(address: str, info: pb.DescribeResponse, expect: Expectation) -> None:
    def reject(reason: str, details: str) -> None:
        raise Rejected(address, reason, details)

    if info.protocol_version != PROTOCOL_VERSION:
        reject("protocol", f"speaks version {info.protocol_version}")
    if info.model_id != expect.model_id or info.model_version != expect.model_version:
        reject(
            "model",
            f"serves {info.model_id} v{info.model_version}, "
            f"expected {expect.model_id} v{expect.model_version}",
        )
    if info.manifest_sha256 != expect.manifest_sha256:
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
    if expect.allowed_ids is not None and info.node_id not in expect.allowed_ids:
        reject("not_allowed", f"node id {info.node_id[:16]} is not on the allow-list")
