"""Rollback state: lower versions, equivocation, expiry, mixed-in files, locking, size caps."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from mbt_core.artifacts.layout import branch_file
from mbt_core.artifacts.load import load_verified_artifacts, load_verified_manifest
from mbt_core.artifacts.manifest import MANIFEST_FILE, Manifest, read_manifest
from mbt_core.artifacts.rollback import FORMAT, accepted_version, record_accepted, rollback_problem
from mbt_core.errors import ArtifactError, SignatureError
from mbt_core.fileio import create_new_bytes, locked, read_capped
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import GeneratedKey
from tests.unit.artifact_helpers import export_signed, new_key


@pytest.fixture()
def checkpoint(tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer) -> Checkpoint:
    return Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer)


@pytest.fixture()
def key(tmp_path: Path) -> GeneratedKey:
    return new_key(tmp_path, "release")


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    return tmp_path / "state" / "accepted-versions.json"


def release(
    checkpoint: Checkpoint, out: Path, key: GeneratedKey, version: int, **kwargs: object
) -> Manifest:
    return export_signed(checkpoint, out, [key], model_id="tiny", model_version=version, **kwargs)


def test_same_version_with_another_digest_is_refused(
    tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    first = release(checkpoint, tmp_path / "a", key, 2)
    load_verified_manifest(tmp_path / "a", [key.public_path], state_file=state)
    recorded = state.read_bytes()
    twin = release(checkpoint, tmp_path / "b", key, 2, expires_days=30)  # validly signed too
    with pytest.raises(SignatureError) as err:
        load_verified_manifest(tmp_path / "b", [key.public_path], state_file=state)
    assert "'tiny' version 2 has digest" in str(err.value)
    assert "refusing the equivocation" in str(err.value)
    assert state.read_bytes() == recorded
    problem = rollback_problem(state, twin)
    assert problem is not None and "equivocation" in problem
    assert rollback_problem(state, first) is None  # the accepted one itself is fine
    load_verified_manifest(tmp_path / "a", [key.public_path], state_file=state)


def test_lower_version_is_refused_and_higher_raises_the_floor(
    tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    v1, v3 = (
        release(checkpoint, tmp_path / "v1", key, 1),
        release(checkpoint, tmp_path / "v3", key, 3),
    )
    record_accepted(state, v3)
    with pytest.raises(SignatureError, match="version 1 is older than version 3"):
        record_accepted(state, v1)
    assert accepted_version(state, "tiny") == 3


def test_expired_manifest_is_never_recorded(
    tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    manifest = release(checkpoint, tmp_path / "r", key, 1, expires_days=5)
    with pytest.raises(SignatureError, match="expired at"):
        record_accepted(state, manifest, now=manifest.expires_at + timedelta(seconds=1))
    assert not state.exists()
    with pytest.raises(SignatureError, match=r"manifest\.json: expired at"):
        load_verified_artifacts(
            tmp_path / "r",
            [key.public_path],
            state_file=state,
            branches=[(0, 0)],
            now=datetime.now(UTC) + timedelta(days=6),
        )
    assert not state.exists()


def test_old_branch_file_mixed_into_a_new_release_is_refused(
    tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    release(checkpoint, v1, key, 1)
    with torch.no_grad():  # v2 retrains one branch
        for p in checkpoint.model.layers[0].branches[1].parameters():
            p.add_(0.01)
    release(checkpoint, v2, key, 2)
    stale = (v1 / branch_file(0, 1)).read_bytes()
    assert stale != (v2 / branch_file(0, 1)).read_bytes()
    (v2 / branch_file(0, 1)).write_bytes(stale)
    # The signed manifest alone still verifies; only the file check sees the mix.
    assert load_verified_manifest(v2, [key.public_path], state_file=state, record=False)
    with pytest.raises(ArtifactError, match=r"layer0-branch1\.safetensors: SHA-256 mismatch"):
        load_verified_artifacts(v2, [key.public_path], state_file=state, branches=[(0, 1)])
    assert not state.exists()  # a failed load records nothing
    with pytest.raises(ArtifactError, match="SHA-256 mismatch"):  # the gateway's trunk path too
        load_verified_artifacts(
            v2, [key.public_path], state_file=state, branches=[(0, 0), (0, 1)], trunk=True
        )
    assert not state.exists()
    loaded = load_verified_artifacts(
        v2, [key.public_path], state_file=state, branches=[(0, 0), (1, 2)], trunk=True
    )
    assert set(loaded.branches) == {(0, 0), (1, 2)} and loaded.trunk is not None
    assert accepted_version(state, "tiny") == 2


def _record_many(state: str, release_dir: str, model_ids: list[str], go: Any = None) -> None:
    """In a child process: accept one manifest under many model ids, as fast as possible."""
    if go is not None:
        go.wait(60)
    manifest = read_manifest(Path(release_dir))
    for model_id in model_ids:
        data = manifest.to_dict() | {"model_id": model_id}
        record_accepted(Path(state), Manifest.from_dict(data))


def test_two_processes_never_lose_each_others_updates(
    tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    release(checkpoint, tmp_path / "r", key, 1)
    ctx = multiprocessing.get_context("fork")  # the child reuses the loaded modules
    ids = [[f"{side}{i}" for i in range(40)] for side in "ab"]
    children = [
        ctx.Process(target=_record_many, args=(str(state), str(tmp_path / "r"), batch))
        for batch in ids
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    models = json.loads(state.read_text())["models"]
    assert sorted(models) == sorted(ids[0] + ids[1])


def test_a_writer_waits_for_the_lock_and_then_sees_the_holders_update(
    tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    release(checkpoint, tmp_path / "r", key, 1)
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    args = (str(state), str(tmp_path / "r"), ["child"], go)
    child = ctx.Process(target=_record_many, args=args)
    child.start()  # before the lock is taken: a forked child would inherit the held lock
    try:
        with locked(state):
            go.set()
            time.sleep(0.3)  # time enough for the child to read and write, were it not blocked
            assert child.is_alive()
            held = {"parent": {"version": 9, "manifest_digest": "0" * 64}}
            state.write_text(json.dumps({"format": FORMAT, "models": held}))
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert sorted(json.loads(state.read_text())["models"]) == ["child", "parent"]


def test_oversized_or_corrupt_state_fails_closed(
    tmp_path: Path, checkpoint: Checkpoint, key: GeneratedKey, state: Path
) -> None:
    manifest = release(checkpoint, tmp_path / "r", key, 1)
    state.parent.mkdir(parents=True)
    state.write_bytes(b" " * (5 * 1024 * 1024))
    with pytest.raises(SignatureError, match=r"corrupt rollback state .*larger than"):
        record_accepted(state, manifest)
    state.write_text(json.dumps({"format": FORMAT, "models": {"tiny": {"version": 1}}}))
    with pytest.raises(SignatureError, match="has no manifest digest"):
        rollback_problem(state, manifest)


def test_a_fifo_planted_as_manifest_is_an_error_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / MANIFEST_FILE)
    with pytest.raises(ArtifactError, match="not a regular file"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        read_capped(tmp_path / MANIFEST_FILE, 10)


def test_create_new_bytes_is_complete_private_and_never_replaces(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        create_new_bytes(tmp_path / "k", b"secret")
    finally:
        os.umask(old)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        create_new_bytes(tmp_path / "k", b"other")
    assert (tmp_path / "k").read_bytes() == b"secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary file left
