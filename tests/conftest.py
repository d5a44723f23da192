"""Shared fixtures: a tiny tokenizer and model that build in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbt_core.model.checkpoint import save_checkpoint
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer

SAMPLE_TEXT = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n"
) * 20


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([SAMPLE_TEXT], vocab_size=300)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig(
        vocab_size=tiny_tokenizer.vocab_size,
        d_model=32,
        n_heads=2,
        context_length=48,
        n_layers=2,
        branches=(2, 3),
        blocks_per_branch=2,
    )


@pytest.fixture()
def tiny_model(tiny_config: ModelConfig) -> MBTLanguageModel:
    torch.manual_seed(0)
    model = MBTLanguageModel(tiny_config)
    with torch.no_grad():  # distinct, non-uniform weights so aggregation order matters
        for layer in model.layers:
            layer.alpha_logits.normal_()
    return model.eval()


@pytest.fixture()
def tiny_checkpoint(
    tmp_path: Path, tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer
) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, tiny_model, tiny_tokenizer, {"origin": "test"})
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run where CUDA is; elsewhere they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
