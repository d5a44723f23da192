"""What a node serves once loaded: verified manifest, its branches, caches and batchers."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mbt_core.artifacts.load import load_branch, load_verified_manifest
from mbt_core.artifacts.manifest import Manifest, manifest_digest
from mbt_core.model.blocks import Branch
from mbt_core.model.kv import KVSlots
from mbt_core.trust.certs import certificate_file_fingerprint
from mbt_core.trust.keys import key_id, load_private_key
from mbt_core.wire.codec import COMPUTE_DTYPES, DTYPES
from mbt_core.wire.contract import BranchKey
from mbt_core.wire.discovery import NodeRecord
from mbt_node.batcher import BranchBatcher
from mbt_node.config import NodeConfig
from mbt_node.metrics import NodeMetrics
from mbt_node.sessions import SessionStore

log = logging.getLogger("mbt_node")


@dataclass
class NodeRuntime:
    cfg: NodeConfig
    manifest: Manifest
    manifest_sha256: str
    node_id: str
    branches: dict[BranchKey, Branch]
    store: SessionStore
    batchers: dict[BranchKey, BranchBatcher]
    executor: ThreadPoolExecutor

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.cfg, self.manifest)

    def record(self) -> NodeRecord:
        return NodeRecord(
            node_id=self.node_id,
            model_id=self.manifest.model_id,
            model_version=self.manifest.model_version,
            manifest_sha256=self.manifest_sha256,
            branches=tuple(sorted(self.branches)),
            device=self.cfg.device,
        )

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self.executor.shutdown(wait=True)


def node_identity(cfg: NodeConfig) -> str:
    """With TLS, the certificate's fingerprint (what the handshake proves); else the
    fingerprint of ``--node-key``, or a random id for a node without one (claims only)."""
    if cfg.tls.cert is not None:
        return certificate_file_fingerprint(cfg.tls.cert)
    if cfg.node_key is None:
        import uuid

        return "anon-" + uuid.uuid4().hex[:16]
    return key_id(load_private_key(cfg.node_key).public_key())


def verify_manifest(cfg: NodeConfig) -> Manifest:
    """Signatures (keys or trust root), expiry and rollback of the manifest; the served
    branches must exist."""
    trust = cfg.trust.resolve(cfg.state_file)
    manifest = load_verified_manifest(cfg.artifacts, trust, cfg.trust.threshold, cfg.state_file)
    config = manifest.config
    for layer, branch in cfg.serve:
        if layer >= config.n_layers or branch >= config.branches[layer]:
            raise ValueError(
                f"--serve {layer}:{branch}: the model has {config.n_layers} layers with "
                f"{list(config.branches)} branches"
            )
    return manifest


def compute_dtype(cfg: NodeConfig, manifest: Manifest) -> torch.dtype:
    """``--dtype``, or with ``auto`` the model's own where a node computes in it (a float16
    model runs in float32: CPU float16 matmuls are too slow to offer)."""
    name = cfg.dtype
    if name == "auto":
        name = manifest.config.dtype if manifest.config.dtype in COMPUTE_DTYPES else "float32"
    return DTYPES[name]


def load_runtime(cfg: NodeConfig, manifest: Manifest, metrics: NodeMetrics) -> NodeRuntime:
    """Load only the served branches, each hash-checked as it is read; blocking. Their
    batches are observed in ``metrics``, and so is the session store."""
    torch.set_num_threads(cfg.torch_threads)
    node_id = node_identity(cfg)
    dtype = compute_dtype(cfg, manifest)
    branches = {}
    for key in cfg.serve:
        branch = load_branch(cfg.artifacts, manifest, *key)
        branches[key] = branch.to(device=cfg.device, dtype=dtype).eval()
        log.info(
            "loaded layer %d branch %d (%s)", key[0], key[1], manifest.branch(*key).sha256[:12]
        )
    context = manifest.config.context_length
    # Each branch keeps its sessions' keys and values in one slot pool: a batch of sessions
    # reads and writes them with one op per block.
    pools = {
        k: KVSlots(manifest.config, dtype, cfg.device, b.kv_heads()) for k, b in branches.items()
    }
    store = SessionStore(cfg.limits, context, lambda k: pools[k].new_cache())
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    batchers = {
        k: BranchBatcher(k, b, store, executor, cfg.batching, metrics.branch(k))
        for k, b in branches.items()
    }
    metrics.watch(store)
    return NodeRuntime(
        cfg, manifest, manifest_digest(manifest), node_id, branches, store, batchers, executor
    )
