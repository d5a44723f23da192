"""MBT core: the Multi-Branch Transformer model, its aggregation, training and checkpoints.

Knows nothing of gRPC or mDNS; ``mbt_node`` and ``mbt_aggregator`` build on it.
"""

from mbt_core.aggregate import Aggregated, aggregate
from mbt_core.branch import Branch, BranchCache
from mbt_core.checkpoint import (
    Checkpoint,
    default_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from mbt_core.config import AggregationConfig, ModelConfig
from mbt_core.errors import (
    ArtifactError,
    CheckpointError,
    MbtError,
    NoBranchAvailable,
    SignatureError,
    TokenizerError,
)
from mbt_core.model import MBTLanguageModel, MBTLayer, ModelCache, StepInfo
from mbt_core.sampling import SamplingConfig, generate, select_next
from mbt_core.tokenizer import Tokenizer

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
