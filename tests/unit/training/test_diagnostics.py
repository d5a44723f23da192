import math

import pytest
import torch

from mbt_core.model.lm import MBTLanguageModel
from mbt_core.training.diagnostics import diagnose, output_stats, weight_stats


def test_uniform_weights_use_every_path() -> None:
    s = weight_stats(torch.full((4,), 0.25))
    assert s["effective_num_paths"] == pytest.approx(4.0)
    assert s["path_starvation_index"] == pytest.approx(0.0, abs=1e-9)
    assert s["gini_concentration"] == pytest.approx(0.0, abs=1e-9)
    assert s["top1_share"] == pytest.approx(0.25)


def test_one_dominant_branch_is_starvation() -> None:
    s = weight_stats(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert s["effective_num_paths"] == pytest.approx(1.0)
    assert s["path_starvation_index"] == pytest.approx(1.0)
    assert s["gini_concentration"] == pytest.approx(0.75)  # (K-1)/K for one-hot
    assert s["margin_top1_top2"] == pytest.approx(1.0)


def test_identical_branches_have_no_diversity_and_opposite_ones_the_most() -> None:
    u = torch.randn(1, 50, 8)
    same = output_stats(torch.cat([u, u, u]))
    assert same["diversity_cosine_distance_mean"] == pytest.approx(0.0, abs=1e-9)
    assert same["branch_correlation_mean"] == pytest.approx(1.0)
    assert same["output_energy_cv"] == pytest.approx(0.0, abs=1e-9)
    opposite = output_stats(torch.cat([u, -u]))
    assert opposite["diversity_cosine_distance_mean"] == pytest.approx(2.0)
    scaled = output_stats(torch.cat([u, 3 * u]))
    assert scaled["output_energy_cv"] == pytest.approx((9 - 1) / (9 + 1))


def test_diagnose_reports_every_layer(tiny_model: MBTLanguageModel) -> None:
    report = diagnose(tiny_model, torch.randint(0, tiny_model.cfg.vocab_size, (2, 16)))
    assert [r.branches for r in report] == list(tiny_model.cfg.branches)
    for r, layer in zip(report, tiny_model.layers, strict=True):
        h = -(layer.weights() * layer.weights().log()).sum().item()
        assert r.effective_num_paths == pytest.approx(math.exp(h), rel=1e-5)
        assert 0.0 < r.diversity_cosine_distance_mean < 2.0
