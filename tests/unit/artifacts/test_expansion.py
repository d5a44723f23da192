"""The manifest's ``expansion``: validated as untrusted JSON, absent (old bytes) unless a model
grew, signed with the rest, and the beta ramp's weights as the gateway is to fuse them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mbt_aggregator.mix import blend
from mbt_core.artifacts.export import EXPANSION_INFO, export_artifacts
from mbt_core.artifacts.load import load_model_from_artifacts
from mbt_core.artifacts.manifest import (
    Expansion,
    Manifest,
    canonical_bytes,
    manifest_digest,
    read_manifest,
)
from mbt_core.errors import ArtifactError, SignatureError
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.expand import expand_model
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from tests.unit.artifact_helpers import edit_manifest, export_signed, new_key

GOOD = {"base_branches": [2, 3], "start": 0.0, "target": 1.0, "ramp_s": 120.0}


def test_expansion_round_trips() -> None:
    e = Expansion.from_dict(GOOD)
    assert e == Expansion((2, 3), 0.0, 1.0, 120.0) and e.to_dict() == GOOD
    assert Expansion.from_dict({**GOOD, "start": 0, "ramp_s": 0}).ramp_s == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"start": 0.6, "target": 0.5}, "start <= target"),
        ({"target": 1.5}, "start <= target <= 1"),
        ({"start": -0.1}, "0 <= start"),
        ({"start": math.nan}, "finite"),
        ({"ramp_s": math.inf}, "finite"),
        ({"ramp_s": -1}, "ramp_s must be >= 0"),
        ({"target": True}, "finite number"),
        ({"target": "1"}, "finite number"),
        ({"base_branches": [2, 0]}, "integers >= 1"),
        ({"base_branches": [2, True]}, "integers >= 1"),
        ({"base_branches": 2}, "integers >= 1"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_bad_expansions_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Expansion.from_dict({**GOOD, **change})
    with pytest.raises(ValueError, match="missing keys"):
        Expansion.from_dict({k: v for k, v in GOOD.items() if k != "ramp_s"})
    with pytest.raises(ValueError, match="must be an object"):
        Expansion.from_dict([GOOD])


def test_the_ramp_and_the_weights_it_fuses_with() -> None:
    e = Expansion((2,), 0.2, 0.8, 10.0)
    assert [e.beta_at(t) for t in (-1.0, 0.0, 5.0, 10.0, 99.0)] == pytest.approx(
        [0.2, 0.2, 0.5, 0.8, 0.8]
    )
    assert Expansion((2,), 0.3, 0.9, 0.0).beta_at(0.0) == 0.9
    logits = torch.tensor([0.4, -0.2, 0.1, 0.3])  # 2 old (frozen) + 2 new
    alpha_n = torch.softmax(logits[:2], 0)
    alpha_n1 = torch.softmax(logits, 0)
    new_mass = float(alpha_n1[2:].sum())
    # The gateway's blend (mbt_aggregator.mix) needs nothing but the expanded model's logits.
    assert blend(alpha_n, alpha_n1, 0.0) is alpha_n  # the base model exactly
    assert blend(alpha_n, alpha_n1, 1.0) is alpha_n1  # the expanded model exactly
    w = blend(alpha_n, alpha_n1, 0.25)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[2:].sum()) == pytest.approx(0.25 * new_mass)  # injected: beta * B
    assert torch.allclose(w[:2] / w[:2].sum(), alpha_n)  # old branches keep their ratios
    assert torch.allclose(alpha_n1[:2], (1 - new_mass) * alpha_n)


@pytest.fixture()
def base(tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer) -> Checkpoint:
    return Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer, info={"origin": "test"})


def grown_checkpoint(base: Checkpoint, expansion: Expansion | None = None) -> Checkpoint:
    model = expand_model(base.model, [1], 2)
    e = expansion or Expansion(base.model.cfg.branches, 0.0, 1.0, 60.0)
    info = {**base.info, EXPANSION_INFO: json.dumps(e.to_dict())}
    return Checkpoint(model=model, tokenizer=base.tokenizer, info=info)


def test_manifests_without_expansion_keep_their_bytes(base: Checkpoint, tmp_path: Path) -> None:
    manifest = export_artifacts(base, tmp_path / "base")
    assert manifest.expansion is None and "expansion" not in manifest.to_dict()
    on_disk = json.loads((tmp_path / "base" / "manifest.json").read_text())
    assert "expansion" not in on_disk
    assert canonical_bytes(Manifest.from_dict(on_disk)) == canonical_bytes(manifest)


def test_an_expanded_export_signs_the_expansion(base: Checkpoint, tmp_path: Path) -> None:
    key = new_key(tmp_path, "release")
    grown = grown_checkpoint(base)
    manifest = export_signed(grown, tmp_path / "grown", [key], model_id="tiny")
    assert manifest.expansion == Expansion((2, 3), 0.0, 1.0, 60.0)
    assert read_manifest(tmp_path / "grown") == manifest
    assert json.loads(canonical_bytes(manifest))["expansion"]["ramp_s"] == 60.0
    state = tmp_path / "state.json"
    loaded = load_model_from_artifacts(tmp_path / "grown", [key.public_path], 1, state)
    assert loaded.model.cfg.branches == (2, 5) and loaded.model.cfg.split == (2, 3)
    digest = manifest_digest(manifest)
    edit_manifest(tmp_path / "grown", lambda d: d["expansion"].update(ramp_s=1.0))
    assert manifest_digest(read_manifest(tmp_path / "grown")) != digest
    with pytest.raises(SignatureError):
        load_model_from_artifacts(tmp_path / "grown", [key.public_path], 1, state)


@pytest.mark.parametrize(
    ("base_branches", "message"),
    [((2,), "lists 1 layers"), ((2, 6), "exceed the branches"), ((2, 5), "grows no layer")],
)
def test_an_expansion_must_fit_its_model(
    base: Checkpoint, tmp_path: Path, base_branches: tuple[int, ...], message: str
) -> None:
    bad = grown_checkpoint(base, Expansion(base_branches))
    with pytest.raises(ArtifactError, match=message):
        export_artifacts(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    good = export_artifacts(grown_checkpoint(base), tmp_path / "good").to_dict()
    good["expansion"]["base_branches"] = list(base_branches)
    with pytest.raises(ValueError, match=message):
        Manifest.from_dict(good)


def test_unknown_manifest_keys_are_still_refused(base: Checkpoint, tmp_path: Path) -> None:
    data = export_artifacts(grown_checkpoint(base), tmp_path / "m").to_dict()
    assert Manifest.from_dict(data).expansion is not None
    with pytest.raises(ValueError, match="unknown keys"):
        Manifest.from_dict({**data, "expansions": data["expansion"]})
