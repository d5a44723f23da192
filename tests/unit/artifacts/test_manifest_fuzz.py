"""Property tests of the signed documents: manifest, roster and trust root.

Whatever the bytes (random, or a valid signed document with one JSON value mutated, or one byte
flipped), loading raises only the module's own errors (MbtError subclasses), never anything
else, and a refused load leaves no state behind. A mutation that loads must be one that does
not change what was signed.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbt_core.artifacts.load import load_verified_manifest, verify_artifacts
from mbt_core.artifacts.manifest import MANIFEST_FILE, manifest_digest
from mbt_core.artifacts.signatures import SIGNATURES_DIR
from mbt_core.errors import ArtifactError, MbtError, RosterError, TrustRootError
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import GeneratedKey, generate_key, load_private_key
from mbt_core.trust.root import create_root, resolve_trust_root
from mbt_core.trust.roster import read_roster, sign_roster
from tests.unit import hypothesis_profiles  # noqa: F401  (registers the profiles)
from tests.unit.artifact_helpers import export_signed

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


@st.composite
def mutated(draw: st.DrawFn, original: dict[str, Any]) -> bytes:
    """``original`` with one value replaced, deleted, or a key added; or one byte changed."""
    kind = draw(st.sampled_from(["replace", "delete", "add", "byte"]))
    raw = json.dumps(original).encode()
    if kind == "byte":
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    doc = copy.deepcopy(original)
    path = draw(st.sampled_from([p for p in paths(doc) if p]))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if kind == "replace":
        parent[last] = draw(JSON_VALUES)
    elif kind == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    else:
        parent.insert(last, draw(JSON_VALUES))
    return json.dumps(doc).encode()


any_bytes = st.binary(max_size=512) | st.text(max_size=200).map(str.encode)


# --- manifest --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_release(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_config: Any,
    tiny_tokenizer: Tokenizer,
) -> tuple[Path, GeneratedKey, dict[str, Any], str]:
    base = tmp_path_factory.mktemp("release")
    key = generate_key(base / "keys", "release")
    checkpoint = Checkpoint(model=MBTLanguageModel(tiny_config).eval(), tokenizer=tiny_tokenizer)
    manifest = export_signed(checkpoint, base / "r", [key], model_id="tiny")
    original = json.loads((base / "r" / MANIFEST_FILE).read_text())
    return base / "r", key, original, manifest_digest(manifest)


def _load_copy(
    release: Path, key: GeneratedKey, manifest_bytes: bytes
) -> tuple[Any, Path, list[str]]:
    """Load a copy of ``release`` whose manifest is ``manifest_bytes``; (result, state, files)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "r"
        work.mkdir()
        shutil.copytree(release / SIGNATURES_DIR, work / SIGNATURES_DIR)
        (work / MANIFEST_FILE).write_bytes(manifest_bytes)
        state = Path(tmp) / "state" / "accepted.json"
        verification = verify_artifacts(
            work, [key.public_path], state_file=state, check_files=False
        )
        try:
            result: Any = load_verified_manifest(work, [key.public_path], state_file=state)
        except MbtError as exc:
            result = exc
        assert verification.ok == (not isinstance(result, MbtError))
        left = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*"))
        if isinstance(result, MbtError):
            assert not state.exists(), "a refused manifest wrote rollback state"
        return result, state, left


@given(raw=any_bytes)
def test_random_manifest_bytes_raise_artifact_errors(
    signed_release: tuple[Path, GeneratedKey, dict[str, Any], str], raw: bytes
) -> None:
    release, key, _original, _digest = signed_release
    result, _state, _left = _load_copy(release, key, raw)
    assert isinstance(result, ArtifactError)


@given(data=st.data())
def test_mutated_manifests_load_only_when_the_signed_content_is_unchanged(
    signed_release: tuple[Path, GeneratedKey, dict[str, Any], str], data: st.DataObject
) -> None:
    release, key, original, digest = signed_release
    result, _state, _left = _load_copy(release, key, data.draw(mutated(original)))
    if not isinstance(result, MbtError):
        assert manifest_digest(result) == digest


# --- roster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roster_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[GeneratedKey, dict[str, Any]]:
    base = tmp_path_factory.mktemp("roster")
    key = generate_key(base / "keys", "ops")
    ids = ["ab" * 32, "cd" * 32]
    document = sign_roster(ids, [load_private_key(key.private_path)])
    return key, json.loads(document.to_json())


def _read_roster_bytes(key: GeneratedKey, raw: bytes) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "roster.json"
        path.write_bytes(raw)
        try:
            return read_roster(path, [key.public_path])
        except RosterError as exc:
            return exc


@given(raw=any_bytes)
def test_random_roster_bytes_raise_roster_errors(
    roster_file: tuple[GeneratedKey, dict[str, Any]], raw: bytes
) -> None:
    assert isinstance(_read_roster_bytes(roster_file[0], raw), RosterError)


@given(data=st.data())
def test_mutated_rosters_load_only_when_unchanged(
    roster_file: tuple[GeneratedKey, dict[str, Any]], data: st.DataObject
) -> None:
    key, original = roster_file
    result = _read_roster_bytes(key, data.draw(mutated(original)))
    if not isinstance(result, RosterError):
        assert sorted(result.node_ids) == original["signed"]["node_ids"]


# --- trust root ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root_file(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    root = create_root([k.public_key() for k in keys], 2, keys[:2], now=datetime.now(UTC))
    return json.loads(root.document.to_json())


@given(data=st.data())
def test_mutated_or_random_roots_raise_trust_root_errors_and_persist_nothing(
    root_file: dict[str, Any], data: st.DataObject
) -> None:
    raw = data.draw(any_bytes | mutated(root_file))
    with tempfile.TemporaryDirectory() as tmp:
        pinned, state = Path(tmp) / "root.json", Path(tmp) / "state" / "roots.json"
        pinned.write_bytes(raw)
        update = Path(tmp) / "update.json"
        update.write_bytes(raw)
        try:
            root = resolve_trust_root(pinned, [update], state)
        except TrustRootError:
            assert not state.exists()
            return
        assert root.document.payload == root_file["signed"]
        assert not state.exists()  # the same root as an update is no new root
