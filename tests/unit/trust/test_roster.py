"""Signed rosters of node ids: signed, unsigned, tampered, untrusted, expired, via a root, CLI."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mbt_core.cli.main import main
from mbt_core.errors import RosterError
from mbt_core.fileio import atomic_write_bytes
from mbt_core.trust.certs import init_ca, issue_cert
from mbt_core.trust.keys import GeneratedKey, generate_key, load_private_key
from mbt_core.trust.root import create_root
from mbt_core.trust.roster import load_roster, read_roster, sign_roster

IDS = [hashlib.sha256(f"node{i}".encode()).hexdigest() for i in range(3)]


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBT_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture()
def ops(tmp_path: Path) -> GeneratedKey:
    return generate_key(tmp_path / "keys", "ops")


@pytest.fixture()
def other(tmp_path: Path) -> GeneratedKey:
    return generate_key(tmp_path / "keys", "other")


def write_roster(path: Path, signers: list[GeneratedKey], **kwargs: object) -> Path:
    keys = [load_private_key(k.private_path) for k in signers]
    atomic_write_bytes(path, sign_roster(IDS, keys, **kwargs).to_json())  # type: ignore[arg-type]
    return path


def test_signed_roster_gives_its_node_ids(tmp_path: Path, ops: GeneratedKey) -> None:
    path = write_roster(tmp_path / "roster.json", [ops], version=4)
    assert load_roster(path, [ops.public_path]) == frozenset(IDS)
    roster = read_roster(path, [ops.public_path])
    assert roster.version == 4 and roster.signed_by == (ops.key_id,)


def test_unsigned_roster_refused(tmp_path: Path, ops: GeneratedKey) -> None:
    path = write_roster(tmp_path / "roster.json", [ops])
    data = json.loads(path.read_text())
    data["signatures"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(RosterError, match="roster is not trusted: 0 of 1 required"):
        load_roster(path, [ops.public_path])


def test_tampered_roster_refused(tmp_path: Path, ops: GeneratedKey) -> None:
    path = write_roster(tmp_path / "roster.json", [ops])
    data = json.loads(path.read_text())
    data["signed"]["node_ids"].append("f" * 64)  # an intruder adds itself
    path.write_text(json.dumps(data))
    with pytest.raises(RosterError, match="does not verify: document changed after signing"):
        load_roster(path, [ops.public_path])


def test_roster_by_an_untrusted_key_refused(
    tmp_path: Path, ops: GeneratedKey, other: GeneratedKey
) -> None:
    path = write_roster(tmp_path / "roster.json", [other])
    with pytest.raises(RosterError, match=f"untrusted keys {other.key_id[:16]}"):
        load_roster(path, [ops.public_path])


def test_expired_roster_refused(tmp_path: Path, ops: GeneratedKey) -> None:
    made = datetime.now(UTC) - timedelta(days=10)
    path = write_roster(tmp_path / "roster.json", [ops], expires_days=3, now=made)
    with pytest.raises(RosterError, match="roster version 1 expired at"):
        load_roster(path, [ops.public_path])
    assert load_roster(path, [ops.public_path], now=made + timedelta(days=1)) == frozenset(IDS)


def test_roster_checked_against_a_trust_root(
    tmp_path: Path, ops: GeneratedKey, other: GeneratedKey
) -> None:
    signers = [load_private_key(k.private_path) for k in (ops, other)]
    root = create_root([k.public_key() for k in signers], 2, signers)
    one = write_roster(tmp_path / "one.json", [ops])
    both = write_roster(tmp_path / "both.json", [ops, other])
    with pytest.raises(RosterError, match="1 of 2 required"):
        load_roster(one, root)
    assert load_roster(both, root) == frozenset(IDS)
    # A trust root is a signed document too, but never a roster.
    atomic_write_bytes(tmp_path / "root.json", root.document.to_json())
    with pytest.raises(RosterError, match="expected a signed 'mbt-roster' document"):
        load_roster(tmp_path / "root.json", root)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "invalid mbt-roster document"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"format": "mbt-signed", "signed": {"format": "mbt-roster"}, "signatures": 5}',
         "signatures must be a list"),
    ],
)  # fmt: skip
def test_malformed_roster_files_are_roster_errors(
    tmp_path: Path, ops: GeneratedKey, raw: bytes, expected: str
) -> None:
    path = tmp_path / "roster.json"
    path.write_bytes(raw)
    with pytest.raises(RosterError, match=expected):
        load_roster(path, [ops.public_path])


def test_bad_node_ids_are_refused(tmp_path: Path, ops: GeneratedKey) -> None:
    key = load_private_key(ops.private_path)
    with pytest.raises(ValueError, match="is not 64 lowercase hex digits"):
        sign_roster(["node-1"], [key])
    path = tmp_path / "roster.json"
    atomic_write_bytes(path, sign_roster(IDS, [key]).to_json())
    data = json.loads(path.read_text())
    data["signed"]["node_ids"] = ["A" * 64]  # not a fingerprint (checked before signatures)
    path.write_text(json.dumps(data))
    with pytest.raises(RosterError, match="invalid roster: node id 'AAAA"):
        load_roster(path, [ops.public_path])


def test_cli_roster_sign_and_verify(
    tmp_path: Path, ops: GeneratedKey, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    init_ca(ca)
    node = issue_cert(ca, "node0", tmp_path / "certs")
    out = tmp_path / "roster.json"
    args = ["roster", "sign", "--cert", str(node.cert_path), "--node-id", IDS[0]]
    assert main([*args, "--key", str(ops.private_path), "--out", str(out)]) == 0
    assert "2 node id(s)" in capsys.readouterr().out
    verify = ["roster", "verify", str(out), "--trusted-key", str(ops.public_path)]
    assert main(verify) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"OK {out}: roster version 1, 2 node id(s)")
    assert sorted(lines[1:]) == sorted([node.fingerprint, IDS[0]])
    assert main([*verify, "--threshold", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbt roster: error:")
