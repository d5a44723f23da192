"""Trust roots: pinning, threshold rotation, version chains, expiry, persisted state, CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.load import load_verified_manifest, verify_artifacts
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cli.main import main
from mbt_core.errors import SignatureError, TrustRootError
from mbt_core.fileio import atomic_write_bytes
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.documents import sign_payload
from mbt_core.trust.keys import generate_key, key_id
from mbt_core.trust.root import TrustRoot, create_root, read_root, resolve_trust_root, rotate_root

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default state goes to the tmp folder, never to ~/.local/state."""
    monkeypatch.setenv("MBT_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture()
def keys() -> dict[str, Ed25519PrivateKey]:
    return {name: Ed25519PrivateKey.generate() for name in "abcdex"}


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    return tmp_path / "state" / "trust-roots.json"


def root(
    keys: dict[str, Ed25519PrivateKey],
    members: str,
    threshold: int,
    signers: str,
    *,
    version: int = 1,
    days: int = 30,
    now: datetime = NOW,
) -> TrustRoot:
    return create_root(
        [keys[m].public_key() for m in members],
        threshold,
        [keys[s] for s in signers],
        version=version,
        expires_days=days,
        now=now,
    )


def resign(document_root: TrustRoot, keys: dict[str, Ed25519PrivateKey], signers: str) -> bytes:
    """The same root payload signed by another set of keys (what an attacker could produce)."""
    return sign_payload(document_root.document.payload, [keys[s] for s in signers]).to_json()


def save(path: Path, data: TrustRoot | bytes) -> Path:
    atomic_write_bytes(path, data if isinstance(data, bytes) else data.document.to_json())
    return path


@pytest.fixture()
def v1(keys: dict[str, Ed25519PrivateKey], tmp_path: Path) -> Path:
    return save(tmp_path / "root-v1.json", root(keys, "abc", 2, "ab"))


def test_pinned_root_gives_its_keys_and_threshold(
    v1: Path, keys: dict[str, Ed25519PrivateKey], state: Path
) -> None:
    current = resolve_trust_root(v1, state_file=state)
    assert current.version == 1 and current.threshold == 2
    assert set(current.keys) == {key_id(keys[k].public_key()) for k in "abc"}
    assert not state.exists()  # nothing new accepted: nothing to persist


def test_root_below_its_own_threshold_is_refused(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    with pytest.raises(TrustRootError, match="not signed by its own keys: 1 of 2 required"):
        root(keys, "abc", 2, "a")
    good = root(keys, "abc", 2, "ab")
    path = save(tmp_path / "weak.json", resign(good, keys, "ax"))
    with pytest.raises(TrustRootError, match="1 of 2 required trusted signatures"):
        read_root(path)


def test_tampered_root_is_refused(v1: Path) -> None:
    data = json.loads(v1.read_text())
    data["signed"]["threshold"] = 1
    v1.write_text(json.dumps(data))
    with pytest.raises(TrustRootError, match="does not verify: document changed after signing"):
        read_root(v1)


def test_valid_rotation_is_accepted_and_persisted(
    v1: Path, keys: dict[str, Ed25519PrivateKey], tmp_path: Path, state: Path
) -> None:
    v2 = rotate_root(
        read_root(v1),
        [keys["d"].public_key(), keys["e"].public_key()],
        2,
        [keys[k] for k in "abde"],
        expires_days=60,
        now=NOW,
    )
    path = save(tmp_path / "root-v2.json", v2)
    current = resolve_trust_root(v1, [path], state)
    assert current.version == 2 and current.digest == v2.digest
    assert set(current.keys) == {key_id(keys[k].public_key()) for k in "de"}
    # A restart with only v1 pinned still trusts v2, and giving v2 again is harmless.
    assert resolve_trust_root(v1, (), state).digest == v2.digest
    assert resolve_trust_root(v1, [path], state).digest == v2.digest


@pytest.mark.parametrize(
    ("signers", "expected"),
    [
        ("ade", "not signed by the keys of version 1: 1 of 2 required"),  # old side short
        ("abd", "not signed by its own keys: 1 of 2 required"),  # new side short
        (
            "xde",
            "not signed by the keys of version 1: 0 of 2 required trusted signatures "
            "(signatures by untrusted keys",
        ),
    ],
)
def test_rotation_without_both_thresholds_is_refused(
    v1: Path,
    keys: dict[str, Ed25519PrivateKey],
    tmp_path: Path,
    state: Path,
    signers: str,
    expected: str,
) -> None:
    good = root(keys, "de", 2, "de", version=2)
    path = save(tmp_path / "root-v2.json", resign(good, keys, signers))
    with pytest.raises(TrustRootError, match=re.escape(expected)):
        resolve_trust_root(v1, [path], state)
    assert not state.exists()
    with pytest.raises(TrustRootError):  # the library refuses to write such a root at all
        rotate_root(
            read_root(v1),
            [keys["d"].public_key(), keys["e"].public_key()],
            2,
            [keys[s] for s in signers],
        )


def test_chain_applies_in_order_and_no_version_is_skipped(
    v1: Path, keys: dict[str, Ed25519PrivateKey], tmp_path: Path, state: Path
) -> None:
    r2 = root(keys, "cd", 1, "abcd", version=2)
    r3 = root(keys, "e", 1, "ce", version=3)
    p2, p3 = save(tmp_path / "v2.json", r2), save(tmp_path / "v3.json", r3)
    with pytest.raises(TrustRootError, match="version 3 does not follow version 1"):
        resolve_trust_root(v1, [p3], state)
    with pytest.raises(TrustRootError, match="version 3 does not follow version 1"):
        resolve_trust_root(v1, [p3, p2], state)
    assert not state.exists()
    assert resolve_trust_root(v1, [p2, p3], state).digest == r3.digest
    assert [r["signed"]["version"] for r in json.loads(state.read_text())["roots"]] == [2, 3]


def test_nothing_is_persisted_unless_every_step_passes(
    v1: Path, keys: dict[str, Ed25519PrivateKey], tmp_path: Path, state: Path
) -> None:
    p2 = save(tmp_path / "v2.json", root(keys, "cd", 1, "abcd", version=2))
    bad3 = root(keys, "e", 1, "e", version=3)  # not signed by v2's key
    p3 = save(tmp_path / "v3.json", bad3)
    with pytest.raises(TrustRootError, match="version 3 is not signed by the keys of version 2"):
        resolve_trust_root(v1, [p2, p3], state)
    assert not state.exists()  # not even the valid v2


def test_expired_root_in_force_is_refused_but_a_superseded_one_may_have_expired(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path, state: Path
) -> None:
    past = NOW - timedelta(days=10)
    old = save(tmp_path / "v1.json", root(keys, "ab", 1, "a", days=5, now=past))
    with pytest.raises(TrustRootError, match="version 1 expired at"):
        resolve_trust_root(old, (), state)
    expired_v2 = save(tmp_path / "v2x.json", root(keys, "c", 1, "ac", version=2, days=5, now=past))
    with pytest.raises(TrustRootError, match="version 2 expired at"):
        resolve_trust_root(old, [expired_v2], state)
    assert not state.exists()
    fresh_v2 = save(tmp_path / "v2.json", root(keys, "c", 1, "ac", version=2))
    assert resolve_trust_root(old, [fresh_v2], state).version == 2


def test_a_different_root_with_an_accepted_version_is_refused(
    v1: Path, keys: dict[str, Ed25519PrivateKey], tmp_path: Path, state: Path
) -> None:
    p2 = save(tmp_path / "v2.json", root(keys, "cd", 1, "abcd", version=2))
    resolve_trust_root(v1, [p2], state)
    other = save(tmp_path / "v2-other.json", root(keys, "x", 1, "abx", version=2))
    before = state.read_bytes()
    with pytest.raises(TrustRootError, match=r"version 2 .* differs from the accepted version 2"):
        resolve_trust_root(v1, [other], state)
    assert state.read_bytes() == before


def test_corrupt_or_foreign_state_fails_closed(
    v1: Path, keys: dict[str, Ed25519PrivateKey], tmp_path: Path, state: Path
) -> None:
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    with pytest.raises(TrustRootError, match="corrupt accepted-roots state"):
        resolve_trust_root(v1, (), state)
    # State from another cluster's chain does not follow this pinned root.
    foreign_v1 = save(tmp_path / "f1.json", root(keys, "x", 1, "x"))
    foreign_v2 = save(tmp_path / "f2.json", root(keys, "e", 1, "xe", version=2))
    state.unlink()
    resolve_trust_root(foreign_v1, [foreign_v2], state)
    with pytest.raises(TrustRootError, match="not signed by the keys of version 1"):
        resolve_trust_root(v1, (), state)


def _export_signed(checkpoint: Checkpoint, out: Path, signers: Sequence[Ed25519PrivateKey]) -> None:
    manifest = export_artifacts(checkpoint, out, model_id="tiny")
    for key in signers:
        sign_manifest(out, manifest, key)


def test_manifest_verified_against_the_root_in_force(
    tiny_model: MBTLanguageModel,
    tiny_tokenizer: Tokenizer,
    v1: Path,
    keys: dict[str, Ed25519PrivateKey],
    tmp_path: Path,
) -> None:
    checkpoint = Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer)
    state = tmp_path / "accepted.json"
    r1 = resolve_trust_root(v1, persist=False)
    p2 = save(tmp_path / "v2.json", root(keys, "de", 1, "abde", version=2))
    r2 = resolve_trust_root(v1, [p2], persist=False)
    by_ab, by_a, by_d = tmp_path / "ab", tmp_path / "a", tmp_path / "d"
    _export_signed(checkpoint, by_ab, [keys["a"], keys["b"]])
    _export_signed(checkpoint, by_a, [keys["a"]])
    _export_signed(checkpoint, by_d, [keys["d"]])
    assert load_verified_manifest(by_ab, r1, state_file=state, record=False).model_id == "tiny"
    with pytest.raises(SignatureError, match="1 of 2 required trusted signatures"):
        load_verified_manifest(by_a, r1, state_file=state)
    with pytest.raises(SignatureError, match="0 of 1 required"):  # a and b were rotated out
        load_verified_manifest(by_ab, r2, state_file=state)
    assert load_verified_manifest(by_d, r2, state_file=state, record=False).model_id == "tiny"
    with pytest.raises(SignatureError, match="1 of 2 required"):  # the caller may raise it
        load_verified_manifest(by_d, r2, threshold=2, state_file=state)
    later = NOW + timedelta(days=45)
    result = verify_artifacts(by_d, r2, state_file=state, now=later)
    assert any(
        "trust root version 2" in p.message and "expired" in p.message for p in result.problems
    )
    assert not state.exists()


def test_cli_trust_init_rotate_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = {n: generate_key(tmp_path / "keys", n) for n in ("a", "b", "c")}
    pub = {n: str(g.public_path) for n, g in k.items()}
    priv = {n: str(g.private_path) for n, g in k.items()}
    v1, v2, v3 = (str(tmp_path / f"root-v{i}.json") for i in (1, 2, 3))
    assert (
        main(
            [
                "trust",
                "init",
                "--key",
                pub["a"],
                "--key",
                pub["b"],
                "--threshold",
                "2",
                "--expires",
                "30",
                "--out",
                v1,
                "--sign-with",
                priv["a"],
                "--sign-with",
                priv["b"],
            ]
        )
        == 0
    )
    assert "trust root version 1: 2 key(s), threshold 2" in capsys.readouterr().out
    rotate = ["trust", "rotate", "--current", v1, "--new-key", pub["c"], "--threshold", "1"]
    assert main([*rotate, "--out", v2, "--sign-with", priv["a"], "--sign-with", priv["c"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not signed by the keys of version 1: 1 of 2" in err[0]
    assert not Path(v2).exists()
    assert (
        main(
            [
                *rotate,
                "--out",
                v2,
                "--sign-with",
                priv["a"],
                "--sign-with",
                priv["b"],
                "--sign-with",
                priv["c"],
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["trust", "verify", "--root", v1, "--update", v2]) == 0
    assert capsys.readouterr().out.startswith("OK trust root version 2: 1 key(s), threshold 1")
    assert main(["trust", "verify", "--root", v1]) == 0  # verify never persists
    assert capsys.readouterr().out.startswith("OK trust root version 1")
    rotate3 = ["trust", "rotate", "--current", v2, "--new-key", pub["a"], "--out", v3]
    assert main([*rotate3, "--sign-with", priv["c"], "--sign-with", priv["a"]]) == 0
    capsys.readouterr()
    assert main(["trust", "verify", "--root", v1, "--update", v3]) == 2
    assert "does not follow version 1" in capsys.readouterr().err
