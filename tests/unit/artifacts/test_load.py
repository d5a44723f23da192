"""Export to per-branch artifacts and verified loading: round trip, tampering, path escapes."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.layout import TRUNK_FILE, branch_file
from mbt_core.artifacts.load import (
    load_branch,
    load_model_from_artifacts,
    load_trunk,
    load_verified_manifest,
    verify_artifacts,
)
from mbt_core.artifacts.manifest import canonical_bytes, manifest_digest, read_manifest
from mbt_core.errors import ArtifactError
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import GeneratedKey
from tests.unit.artifact_helpers import (
    edit_manifest,
    export_signed,
    flip_byte,
    greedy_tokens,
    new_key,
)


@pytest.fixture()
def checkpoint(tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer) -> Checkpoint:
    return Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer, info={"origin": "test"})


@pytest.fixture()
def key(tmp_path: Path) -> GeneratedKey:
    return new_key(tmp_path, "release")


@pytest.fixture()
def release(tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey) -> Path:
    out = tmp_path / "release"
    export_signed(checkpoint, out, [key], model_id="tiny")
    return out


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    return tmp_path / "state" / "accepted-versions.json"


def load(release: Path, key: GeneratedKey, state: Path) -> Checkpoint:
    return load_model_from_artifacts(release, [key.public_path], state_file=state)


def test_round_trip_is_bit_exact_and_decodes_the_same_tokens(
    release: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    assert verify_artifacts(release, [key.public_path], state_file=state).ok
    loaded = load(release, key, state)
    original = checkpoint.model.state_dict()
    restored = loaded.model.state_dict()
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor), name
    prompt = checkpoint.tokenizer.encode("Shall I compare")
    assert greedy_tokens(loaded.model, prompt) == greedy_tokens(checkpoint.model, prompt)
    assert loaded.tokenizer.to_json() == checkpoint.tokenizer.to_json()
    assert loaded.info == {"origin": "test"}
    assert not loaded.model.training
    assert json.loads(state.read_text())["models"]["tiny"]["version"] == 1


def test_each_branch_file_holds_exactly_that_branch(
    release: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    model = checkpoint.model
    manifest = load_verified_manifest(release, [key.public_path], state_file=state)
    for li, k in enumerate(model.cfg.branches):
        for b in range(k):
            reference = model.layers[li].branches[b].state_dict()
            assert load_file(release / branch_file(li, b)).keys() == reference.keys()
            branch = load_branch(release, manifest, li, b)
            for name, tensor in branch.state_dict().items():
                assert torch.equal(tensor, reference[name]), (li, b, name)
    trunk = load_trunk(release, manifest)
    expected = {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"}
    expected |= {f"layers.{li}.alpha_logits" for li in range(model.cfg.n_layers)}
    assert set(trunk.tensors) == set(load_file(release / TRUNK_FILE)) == expected
    assert trunk.tokenizer.vocab_size == model.cfg.vocab_size


def test_manifest_lists_every_file_with_size_and_hash(
    release: Path, checkpoint: Checkpoint
) -> None:
    manifest = read_manifest(release)
    assert manifest.model_id == "tiny" and manifest.model_version == 1
    assert (manifest.expires_at - manifest.created_at).days == 365
    assert manifest.config == checkpoint.model.cfg
    assert len(manifest.artifacts) == 1 + sum(checkpoint.model.cfg.branches)
    for entry in manifest.artifacts:
        data = (release / entry.name).read_bytes()
        assert entry.size == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.trunk().layer is None and manifest.trunk().branch is None


def test_canonical_bytes_are_sorted_compact_utf8(release: Path) -> None:
    manifest = read_manifest(release)
    raw = canonical_bytes(manifest)
    data = json.loads(raw)
    assert raw == json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert manifest_digest(manifest) == hashlib.sha256(raw).hexdigest()
    edit_manifest(release, lambda d: None)  # rewritten with other whitespace
    assert manifest_digest(read_manifest(release)) == manifest_digest(manifest)


def test_flipped_byte_in_branch_refused_naming_file_and_hashes(
    release: Path, key: GeneratedKey, state: Path
) -> None:
    target = release / branch_file(1, 2)
    expected = read_manifest(release).branch(1, 2).sha256
    flip_byte(target)
    actual = hashlib.sha256(target.read_bytes()).hexdigest()
    with pytest.raises(ArtifactError) as err:
        load(release, key, state)
    message = str(err.value)
    assert "layer1-branch2.safetensors" in message and "SHA-256 mismatch" in message
    assert expected in message and actual in message
    assert not state.exists()  # nothing recorded: the load did not happen


def test_truncated_trunk_refused_by_size(release: Path, key: GeneratedKey, state: Path) -> None:
    trunk = release / TRUNK_FILE
    trunk.write_bytes(trunk.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"trunk\.safetensors: size \d+ bytes, manifest says"):
        load(release, key, state)
    assert not state.exists()


def test_missing_artifact_refused(release: Path, key: GeneratedKey, state: Path) -> None:
    (release / branch_file(0, 1)).unlink()
    with pytest.raises(ArtifactError, match=r"layer0-branch1\.safetensors: missing"):
        load(release, key, state)
    assert not state.exists()


def test_artifact_name_leaving_the_folder_refused(
    release: Path, key: GeneratedKey, state: Path
) -> None:
    shutil.copy(release / branch_file(0, 0), release.parent / "outside.safetensors")
    edit_manifest(release, lambda d: d["artifacts"][1].update(name="../outside.safetensors"))
    with pytest.raises(ArtifactError) as err:
        load(release, key, state)
    assert "'../outside.safetensors' is not a plain file name" in str(err.value)
    assert "manifest.json" in str(err.value)


def test_symlink_resolving_outside_refused(release: Path, key: GeneratedKey, state: Path) -> None:
    target = release / branch_file(0, 0)
    outside = release.parent / "outside.safetensors"
    shutil.move(target, outside)  # same bytes, same hash: only the location is wrong
    target.symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"layer0-branch0\.safetensors: resolves outside"):
        load(release, key, state)
    assert not state.exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.update(extra=1), "unknown keys ['extra']"),
        (lambda d: d.update(model_version=True), "model_version must be an integer"),
        (lambda d: d.update(created_at="2025-01-01T00:00:00+02:00"), "is not a UTC time"),
        (lambda d: d["artifacts"].pop(), "do not match the config's branches"),
        (lambda d: d["artifacts"][0].update(sha256="AB" * 32), "64 lowercase hex"),
        (lambda d: d["artifacts"][2].update(layer=-1), "layer must be an integer >= 0"),
        (lambda d: d["config"].update(n_layers=3), "branches lists 2 layers"),
    ],
)
def test_malformed_manifest_refused(
    release: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    edit_manifest(release, edit)
    with pytest.raises(ArtifactError) as err:
        read_manifest(release)
    assert "manifest.json: invalid manifest" in str(err.value)
    assert expected in str(err.value)


def test_export_refuses_a_non_empty_folder(release: Path, checkpoint: Checkpoint) -> None:
    before = sorted(p.name for p in release.iterdir())
    with pytest.raises(ArtifactError, match="not an empty folder"):
        export_artifacts(checkpoint, release)
    assert sorted(p.name for p in release.iterdir()) == before


def test_export_validates_before_writing(tmp_path: Path, checkpoint: Checkpoint) -> None:
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="model_version"):
        export_artifacts(checkpoint, out, model_version=0)
    assert not out.exists()
