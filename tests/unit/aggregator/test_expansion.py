"""The gateway's side of a live expansion: the weights it fuses with along beta, and which
manifests count as a compatible expansion of the one it serves."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mbt_aggregator.admission import Expectation
from mbt_aggregator.expansion import expansion_problem, trunk_problem
from mbt_aggregator.mix import FusionWeights, blend
from mbt_core.artifacts.export import EXPANSION_INFO, export_artifacts
from mbt_core.artifacts.manifest import Expansion, Manifest, manifest_digest
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.expand import expand_model
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer

BASE = [torch.tensor([0.6, 0.4]), torch.tensor([0.2, 0.3, 0.5])]
GROWN = [torch.tensor([0.45, 0.3, 0.25]), torch.tensor([0.1, 0.15, 0.25, 0.3, 0.2])]


def test_the_ends_of_the_blend_are_the_tensors_themselves() -> None:
    assert blend(BASE[0], GROWN[0], 0.0) is BASE[0]
    assert blend(BASE[0], GROWN[0], 1.0) is GROWN[0]
    half = blend(BASE[0], GROWN[0], 0.5)
    assert torch.allclose(half, torch.tensor([0.525, 0.35, 0.125]))
    assert float(half.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="beta"):
        blend(BASE[0], GROWN[0], 1.5)


def test_at_beta_zero_the_old_branches_alone_are_called_with_the_old_weights() -> None:
    weights = FusionWeights(BASE)
    base_mix = weights.current
    weights.grow(GROWN)
    assert weights.current is base_mix and weights.at(0.0) is base_mix
    assert [base_mix.width(i) for i in range(2)] == [2, 3]
    weights.set_beta(0.25)
    mix = weights.current
    assert [mix.width(i) for i in range(2)] == [3, 5]
    new_mass = float(mix.alphas[1][3:].sum())
    assert new_mass == pytest.approx(0.25 * float(GROWN[1][3:].sum()))
    # Status shows every branch, the new ones included.
    assert [t.numel() for t in weights.shown()] == [3, 5]
    weights.rollback()
    assert weights.current is base_mix and [t.numel() for t in weights.shown()] == [2, 3]


def test_a_settled_expansion_is_the_base_of_the_next() -> None:
    weights = FusionWeights(BASE)
    weights.grow(GROWN)
    weights.set_beta(1.0)
    weights.settle()
    assert weights.at(0.0).alphas[1] is GROWN[1] and not weights.growing
    with pytest.raises(ValueError, match="keeps every layer"):
        weights.grow(BASE)  # narrower than what is served


def test_earlier_manifests_are_served_only_when_listed() -> None:
    expect = Expectation("m", 2, "new", 32, {}, earlier=frozenset({(1, "old")}))
    assert expect.serves(2, "new") and expect.serves(1, "old")
    assert not expect.serves(1, "other") and not expect.serves(2, "old")


@pytest.fixture()
def releases(
    tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer, tmp_path: Path
) -> tuple[Manifest, Manifest, MBTLanguageModel]:
    grown = expand_model(tiny_model, layers=[1], add=2, seed=3)
    info = {EXPANSION_INFO: json.dumps(Expansion(tiny_model.cfg.branches).to_dict())}
    v1 = export_artifacts(Checkpoint(tiny_model, tiny_tokenizer), tmp_path / "v1")
    v2 = export_artifacts(Checkpoint(grown, tiny_tokenizer, info), tmp_path / "v2", model_version=2)
    return v1, v2, grown


def test_a_grown_export_is_a_compatible_expansion(
    releases: tuple[Manifest, Manifest, MBTLanguageModel], tiny_model: MBTLanguageModel
) -> None:
    v1, v2, grown = releases
    assert expansion_problem(v1, v2) is None
    assert trunk_problem(tiny_model, grown) is None


def test_what_is_not_a_compatible_expansion(
    releases: tuple[Manifest, Manifest, MBTLanguageModel], tiny_model: MBTLanguageModel
) -> None:
    v1, v2, grown = releases
    old_entry = v2.branch(0, 0)
    changed = replace(
        v2,
        artifacts=tuple(replace(a, sha256="0" * 64) if a is old_entry else a for a in v2.artifacts),
    )
    cases = {
        "changed (artifact hash)": changed,
        "not above": replace(v2, model_version=1),
        "no expansion entry": replace(v2, expansion=None),
        "is model other": replace(v2, model_id="other"),
        "expands branches": replace(v2, expansion=Expansion((1, 3))),
    }
    for message, manifest in cases.items():
        problem = expansion_problem(v1, manifest)
        assert problem is not None and message in problem, (message, problem)
    assert manifest_digest(changed) != manifest_digest(v2)
    with torch.no_grad():
        grown.tok_emb.weight[0, 0] += 1.0
    assert "tok_emb.weight changed" in (trunk_problem(tiny_model, grown) or "")
