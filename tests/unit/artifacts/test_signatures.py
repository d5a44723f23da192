"""Keys, signatures, thresholds, expiry, rollback protection, and the key/export/sign/verify CLI."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mbt_core.artifacts.layout import branch_file
from mbt_core.artifacts.load import (
    load_model_from_artifacts,
    load_verified_manifest,
    verify_artifacts,
)
from mbt_core.artifacts.manifest import manifest_digest
from mbt_core.artifacts.signatures import SIGNATURES_DIR
from mbt_core.cli.main import main
from mbt_core.errors import SignatureError
from mbt_core.model.checkpoint import Checkpoint, load_checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import GeneratedKey, key_id, load_public_key
from tests.unit.artifact_helpers import edit_manifest, export_signed, flip_byte, new_key

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's default rollback state goes to the tmp folder, never to ~/.local/state."""
    monkeypatch.setenv("MBT_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture()
def checkpoint(tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer) -> Checkpoint:
    return Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer)


@pytest.fixture()
def alice(tmp_path: Path) -> GeneratedKey:
    return new_key(tmp_path, "alice")


@pytest.fixture()
def bob(tmp_path: Path) -> GeneratedKey:
    return new_key(tmp_path, "bob")


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    return tmp_path / "state.json"


def test_generated_private_key_is_0600_and_key_id_is_raw_public_key_hash(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not widen the private key's mode
    try:
        key = new_key(tmp_path, "k")
    finally:
        os.umask(old)
    assert key.private_path.stat().st_mode & 0o777 == 0o600
    raw = load_public_key(key.public_path).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert len(raw) == 32 and key.key_id == hashlib.sha256(raw).hexdigest()


def test_key_generation_refuses_to_overwrite(tmp_path: Path, alice: GeneratedKey) -> None:
    before = alice.private_path.read_bytes()
    with pytest.raises(SignatureError, match=r"alice\.private\.pem: already exists"):
        new_key(tmp_path, "alice")
    assert alice.private_path.read_bytes() == before


def test_two_trusted_signers_meet_a_threshold_of_two(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, bob: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    manifest = export_signed(checkpoint, out, [alice, bob])
    trusted = [alice.public_path, bob.public_path]
    result = verify_artifacts(out, trusted, threshold=2, state_file=state)
    assert result.ok and set(result.valid_key_ids) == {alice.key_id, bob.key_id}
    loaded = load_verified_manifest(out, trusted, threshold=2, state_file=state)
    assert manifest_digest(loaded) == manifest_digest(manifest)
    sig = json.loads((out / SIGNATURES_DIR / f"{alice.key_id}.sig").read_text())
    assert sig["algorithm"] == "ed25519" and sig["manifest_digest"] == manifest_digest(manifest)


def test_manifest_edited_after_signing_refused(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    export_signed(checkpoint, out, [alice])
    edit_manifest(out, lambda d: d.update(model_version=7))
    with pytest.raises(SignatureError) as err:
        load_model_from_artifacts(out, [alice.public_path], state_file=state)
    assert f"{alice.key_id[:16]} does not verify against manifest.json" in str(err.value)
    assert "manifest changed after signing" in str(err.value)
    assert not state.exists()


def test_untrusted_signer_refused(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, bob: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    export_signed(checkpoint, out, [bob])
    with pytest.raises(SignatureError) as err:
        load_model_from_artifacts(out, [alice.public_path], state_file=state)
    message = str(err.value)
    assert "manifest.json: 0 of 1 required trusted signatures" in message
    assert f"untrusted keys {bob.key_id[:16]}" in message


def test_below_threshold_refused(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, bob: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    export_signed(checkpoint, out, [alice])
    trusted = [alice.public_path, bob.public_path]
    with pytest.raises(SignatureError, match="1 of 2 required trusted signatures"):
        load_model_from_artifacts(out, trusted, threshold=2, state_file=state)
    assert not state.exists()


def test_the_same_key_twice_counts_once(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    export_signed(checkpoint, out, [alice])
    with pytest.raises(ValueError, match="cannot be met by 1 distinct trusted key"):
        verify_artifacts(out, [alice.public_path, alice.public_path], 2, state)


def test_expired_manifest_refused(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    made = datetime.now(UTC) - timedelta(days=3)
    export_signed(checkpoint, out, [alice], expires_days=2, now=made)
    with pytest.raises(SignatureError, match=r"manifest\.json: expired at \d{4}-\d\d-\d\dT"):
        load_model_from_artifacts(out, [alice.public_path], state_file=state)
    assert not state.exists()


def test_rollback_to_a_lower_version_refused(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, state: Path
) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    export_signed(checkpoint, v1, [alice], model_id="tiny", model_version=1)
    export_signed(checkpoint, v2, [alice], model_id="tiny", model_version=2)
    load_model_from_artifacts(v2, [alice.public_path], state_file=state)
    recorded = state.read_bytes()
    with pytest.raises(SignatureError) as err:
        load_model_from_artifacts(v1, [alice.public_path], state_file=state)
    assert "'tiny' version 1 is older than version 2 already accepted" in str(err.value)
    assert str(state) in str(err.value)
    assert state.read_bytes() == recorded  # refused loads never touch the state
    load_model_from_artifacts(v2, [alice.public_path], state_file=state)  # same version: fine


def test_corrupt_rollback_state_fails_closed(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    export_signed(checkpoint, out, [alice])
    state.write_text("{not json")
    with pytest.raises(SignatureError, match="corrupt rollback state"):
        load_model_from_artifacts(out, [alice.public_path], state_file=state)


def test_garbage_signature_file_is_a_problem(
    tmp_path: Path, checkpoint: Checkpoint, alice: GeneratedKey, state: Path
) -> None:
    out = tmp_path / "release"
    export_signed(checkpoint, out, [alice])
    (out / SIGNATURES_DIR / "junk.sig").write_text('{"format": "mbt-signature"}')
    result = verify_artifacts(out, [alice.public_path], state_file=state)
    assert [p.message for p in result.problems] == [
        f"{out / SIGNATURES_DIR / 'junk.sig'}: invalid signature file: expected an object with "
        "keys ['algorithm', 'format', 'key_id', 'manifest_digest', 'signature']"
    ]


def test_cli_keys_export_sign_verify(
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys, out = tmp_path / "cli-keys", tmp_path / "cli-release"
    assert main(["keys", "generate", "--out", str(keys), "--name", "ops"]) == 0
    private, public = keys / "ops.private.pem", keys / "ops.public.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    assert f"key id: {key_id(load_public_key(public))}" in capsys.readouterr().out
    assert main(["keys", "generate", "--out", str(keys), "--name", "ops"]) != 0
    assert "already exists" in capsys.readouterr().err

    assert main(["export", str(tiny_checkpoint), str(out), "--model-version", "3"]) == 0
    assert main(["sign", str(out), "--key", str(private)]) == 0
    state = ["--state-file", str(tmp_path / "s.json")]
    assert main(["verify", str(out), "--trusted-key", str(public), *state]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"OK {out}: mbt-default version 3")

    flip_byte(out / branch_file(0, 1))
    (out / branch_file(1, 0)).unlink()
    assert main(["verify", str(out), "--trusted-key", str(public), *state]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[-1] == "mbt verify: FAILED, 2 problem(s)"
    assert "layer0-branch1.safetensors: SHA-256 mismatch" in lines[0]
    assert "layer1-branch0.safetensors: missing" in lines[1]
    assert main(["sign", str(out), "--key", str(private)]) == 1  # never sign broken files


def test_cli_generate_from_artifacts_matches_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path, alice: GeneratedKey, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "release"
    export_signed(load_checkpoint(tiny_checkpoint), out, [alice])
    common = ["generate", "Shall I", "--greedy", "--max-new-tokens", "12"]
    assert main([*common, "--checkpoint", str(tiny_checkpoint)]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main([*common, "--artifacts", str(out), "--trusted-key", str(alice.public_path)]) == 0
    assert capsys.readouterr().out == from_checkpoint


def test_no_key_material_in_the_repository() -> None:
    skip = {".venv", ".git", "runs", "build", "dist"}
    for top in REPO.iterdir():
        if top.name in skip or top.name.startswith("."):
            continue
        files = top.rglob("*.pem") if top.is_dir() else [top]
        assert [f for f in files if f.suffix == ".pem"] == [], "key material in the repository"
