"""THE MATH: the Multi-Branch Transformer, torch only.

Configs, the branch blocks and their KV caches, the fusion seam (``aggregate``, shared by the
in-process model and the gateway), the language model, outage masks, sampling, the tokenizer
and checkpoints. Nothing here knows gRPC, signatures or processes; a boundary test keeps it so.
"""

from mbt_core.model.aggregate import Aggregated, aggregate
from mbt_core.model.blocks import Branch
from mbt_core.model.checkpoint import (
    Checkpoint,
    default_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from mbt_core.model.config import AggregationConfig, ModelConfig
from mbt_core.model.kv import BranchCache, KVSlots
from mbt_core.model.lm import MBTLanguageModel, MBTLayer, ModelCache, StepInfo
from mbt_core.model.sampling import SamplingConfig, generate, select_next
from mbt_core.model.tokenizer import Tokenizer

__all__ = [
    "Aggregated",
    "AggregationConfig",
    "Branch",
    "BranchCache",
    "Checkpoint",
    "KVSlots",
    "MBTLanguageModel",
    "MBTLayer",
    "ModelCache",
    "ModelConfig",
    "SamplingConfig",
    "StepInfo",
    "Tokenizer",
    "aggregate",
    "default_checkpoint_path",
    "generate",
    "load_checkpoint",
    "save_checkpoint",
    "select_next",
]
