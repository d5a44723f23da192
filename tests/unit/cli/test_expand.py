"""``mbt expand``: grows an imported (bfloat16, sliced) model, trains only the new branches, and
an export of the result keeps every old branch's file byte for byte; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.layout import branch_file
from mbt_core.artifacts.manifest import Expansion
from mbt_core.cli.main import main
from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.model.expand import changed_parameters
from mbt_core.model.tokenizer import Tokenizer
from tests.hf_models import imported_llama


@pytest.fixture
def imported(tmp_path: Path, tiny_tokenizer: Tokenizer) -> Path:
    return imported_llama(tmp_path, tiny_tokenizer)


def _expand(path: Path, out: Path, *extra: str) -> int:
    return main([
        "expand", str(path), "--out", str(out), "--data", str(path.parent / "text.txt"),
        "--steps", "6", "--lr", "1e-2", "--block-size", "32", "--eval-tokens", "128",
        "--no-progress", "--threads", "1", *extra,
    ])  # fmt: skip


def test_expand_trains_new_branches_and_keeps_old_artifacts(
    imported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = imported.parent / "grown"
    assert _expand(imported, out, "--add", "2", "--layers", "0,3", "--ramp-s", "30") == 0
    printed = capsys.readouterr().out
    assert "base model (2, 2, 2, 2)" in printed and "grown, trained:" in printed
    base, grown = load_checkpoint(imported), load_checkpoint(out / "model.safetensors")
    assert grown.model.cfg.branches == (4, 2, 2, 4) and grown.model.cfg.split == (2, 2, 2, 2)
    assert grown.model.cfg.dtype == "bfloat16"  # trained in float32, stored as the base was
    assert changed_parameters(base.model, grown.model) == []
    assert json.loads(grown.info["expansion"]) == Expansion((2, 2, 2, 2), 0.0, 1.0, 30.0).to_dict()
    old = export_artifacts(base, imported.parent / "old")
    new = export_artifacts(grown, imported.parent / "new")
    assert new.expansion is not None and new.expansion.grown(new.config) == [0, 3]
    for li, k in enumerate(base.model.cfg.branches):
        for b in range(k):
            name = branch_file(li, b)
            assert new.branch(li, b).sha256 == old.branch(li, b).sha256, name
            assert (imported.parent / "new" / name).read_bytes() == (
                imported.parent / "old" / name
            ).read_bytes()
    assert new.branch(3, 3).sha256 not in {a.sha256 for a in old.artifacts}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--add", "1", "--layers", "4"], "layer 4 does not exist"),
        (["--add", "0"], "--add must be a positive"),
        (["--add", "1", "--beta-start", "0.8", "--beta-target", "0.5"], "start <= target"),
        (["--add", "1", "--ramp-s", "-5"], "ramp_s must be >= 0"),
        (["--add", "1", "--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(
    imported: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _expand(imported, imported.parent / "bad", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbt expand: error: ") and message in err and err.count("\n") == 1
    assert not (imported.parent / "bad" / "model.safetensors").exists()


def test_a_missing_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["expand", str(tmp_path / "none.safetensors"), "--add", "1", "--out", str(tmp_path)]
    )
    assert code == 2 and "no such checkpoint file" in capsys.readouterr().err
