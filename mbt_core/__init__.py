"""MBT core: what branch nodes and the aggregator gateway share, in layers.

- ``model``: the math (torch only): branches, KV caches, fusion, the language model, sampling.
- ``training``: corpus, training loop, evaluation under outages, width diagnostics.
- ``artifacts``: the signed model on disk (manifest, export, signatures, verified loading).
- ``trust``: keys, signed documents, trust roots, rosters, certificates, TLS settings.
- ``wire``: the only part that knows gRPC/protobuf (protocol, contract, codec, server, client).
- ``cluster``: local processes and the local cluster.
- ``cli``: the ``mbt`` command and the flags every process shares.

Lower layers never import higher ones (``model`` < ``training``/``artifacts``/``trust`` < ``wire``
< ``cluster`` < ``cli``), and the core imports neither ``mbt_node`` nor ``mbt_aggregator``.
This package's own surface is the model API below.
"""

from mbt_core.errors import (
    ArtifactError,
    CheckpointError,
    MbtError,
    NoBranchAvailable,
    SignatureError,
    TokenizerError,
)
from mbt_core.model import *  # noqa: F403  (the model API is this package's face)
from mbt_core.model import __all__ as _MODEL_API

__all__ = [
    *_MODEL_API,
    "ArtifactError",
    "CheckpointError",
    "MbtError",
    "NoBranchAvailable",
    "SignatureError",
    "TokenizerError",
]
