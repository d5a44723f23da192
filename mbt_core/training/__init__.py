"""Training and evaluating a model: the corpus, the training loop with branch dropout and the
entropy floor, perplexity under outages, and the width diagnostics.
"""

from mbt_core.training.data import read_texts, token_stream
from mbt_core.training.diagnostics import LayerDiagnostics, diagnose
from mbt_core.training.evaluate import OutageResult, outage_table, perplexity
from mbt_core.training.train import TrainConfig, train

__all__ = [
    "LayerDiagnostics",
    "OutageResult",
    "TrainConfig",
    "diagnose",
    "outage_table",
    "perplexity",
    "read_texts",
    "token_stream",
    "train",
]
