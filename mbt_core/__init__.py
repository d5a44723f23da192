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
from mbt_core.model.aggregate import Aggregated, aggregate
from mbt_core.model.blocks import Branch
from mbt_core.model.checkpoint import (
    Checkpoint,
    default_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from mbt_core.model.config import AggregationConfig, ModelConfig
from mbt_core.model.kv import BranchCache
from mbt_core.model.lm import MBTLanguageModel, MBTLayer, ModelCache, StepInfo
from mbt_core.model.sampling import SamplingConfig, generate, select_next
from mbt_core.model.tokenizer import Tokenizer

__all__ = [
    "Aggregated",
    "AggregationConfig",
    "ArtifactError",
    "Branch",
    "BranchCache",
    "Checkpoint",
    "CheckpointError",
    "MBTLanguageModel",
    "MBTLayer",
    "MbtError",
    "ModelCache",
    "ModelConfig",
    "NoBranchAvailable",
    "SamplingConfig",
    "SignatureError",
    "StepInfo",
    "Tokenizer",
    "TokenizerError",
    "aggregate",
    "default_checkpoint_path",
    "generate",
    "load_checkpoint",
    "save_checkpoint",
    "select_next",
]
