import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mbt_core.cli.main import main
from mbt_core.model.checkpoint import default_checkpoint_path, load_checkpoint
from tests.conftest import SAMPLE_TEXT


def _mbt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mbt_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_generate_with_the_shipped_model_prints_text() -> None:
    assert default_checkpoint_path().is_file(), (
        "the embedded default model must ship in the package"
    )
    result = _mbt("generate", "ROMEO:", "--max-new-tokens", "50")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")
    continuation = result.stdout[len("ROMEO:") :]
    assert len(continuation.split()) >= 5  # real words, not only whitespace


def test_generate_shows_missing_branches(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "generate",
            "ab",
            "--checkpoint",
            str(tiny_checkpoint),
            "--greedy",
            "--max-new-tokens",
            "3",
            "--drop",
            "1:2",
            "--show-branches",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "branches present: L0:11 L1:110" in err
    assert err.count("[token ") >= 1


def test_user_errors_are_one_line_without_traceback(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cases = [
        (
            ["generate", "x", "--checkpoint", str(tiny_checkpoint), "--drop", "9:0"],
            "layer 9 does not exist",
        ),
        (
            ["generate", "x", "--checkpoint", str(tmp_path / "missing.safetensors")],
            "cannot read checkpoint",
        ),
        (["generate", "x", "--artifacts", str(tmp_path)], "needs at least one --trusted-key"),
        (
            ["eval", str(tmp_path / "nothing.txt"), "--checkpoint", str(tiny_checkpoint)],
            "no such file",
        ),
    ]
    for args, message in cases:
        result = _mbt(*args)
        assert result.returncode == 2, args
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_eval_json_reports_each_outage_setting(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    code = main(["eval", str(text), "--checkpoint", str(tiny_checkpoint), "--json", "--masks", "3"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    rows = report["results"]
    assert [r["setting"] for r in rows] == ["healthy", "25% out", "50% out"]
    assert [len(r["per_mask"]) for r in rows] == [1, 3, 3]
    assert all(r["perplexity"] > 1.0 for r in rows)
    assert rows[1]["perplexity"] == pytest.approx(sum(rows[1]["per_mask"]) / 3)
    # Bits per character: the scored tokens' total loss in bits over their characters.
    assert 0 < report["characters"] <= len(SAMPLE_TEXT)
    for r in rows:
        nats = math.log(r["perplexity"]) * report["tokens"]
        assert r["bits_per_char"] == pytest.approx(nats / math.log(2) / report["characters"])


def test_diagnostics_json(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    assert (
        main(["diagnostics", "--text", str(text), "--checkpoint", str(tiny_checkpoint), "--json"])
        == 0
    )
    layers = json.loads(capsys.readouterr().out)
    assert [entry["branches"] for entry in layers] == [2, 3]
    assert all(1.0 <= entry["effective_num_paths"] <= entry["branches"] for entry in layers)


def test_train_command_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    args = [
        "train",
        "--data",
        str(text),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "3",
        "--vocab-size",
        "280",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--context",
        "16",
        "--layers",
        "2",
        "--branches",
        "3,1",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert ckpt.model.cfg.branches == (3, 1)
    assert ckpt.info["step"] == "3"


def test_train_arch_parallel_trains_width_slices_that_load_and_renormalize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 3)
    common = ["train", "--data", str(text), "--vocab-size", "280", "--context", "32"]
    tiny = [*common, "--d-model", "32", "--heads", "4", "--layers", "2", "--arch", "parallel"]
    run = [*tiny, "--branches", "4", "--batch-size", "4", "--no-progress", "--eval-interval", "20"]
    assert main([*run, "--out", str(tmp_path / "a"), "--steps", "1"]) == 0
    assert main([*run, "--out", str(tmp_path / "b"), "--steps", "40"]) == 0
    first = load_checkpoint(tmp_path / "a" / "model.safetensors")
    last = load_checkpoint(tmp_path / "b" / "model.safetensors")
    cfg = last.model.cfg
    assert (cfg.kind, cfg.branches, cfg.decoder.n_kv_heads) == ("sliced", (4, 4), 4)
    assert cfg.decoder.vocab_size == cfg.vocab_size == last.tokenizer.vocab_size
    assert cfg.layer_kind(0) == "parallel" and cfg.decoder.intermediate_size == 96
    ids = torch.tensor([last.tokenizer.encode(SAMPLE_TEXT)[:33]])
    half = [torch.tensor([True, False, True, False])] * 2

    def loss(model: torch.nn.Module, masks: list[torch.Tensor] | None) -> float:
        with torch.no_grad():
            return F.cross_entropy(model(ids[:, :-1], masks=masks)[0], ids[0, 1:]).item()

    assert loss(last.model, None) < loss(first.model, None) - 0.5
    assert loss(last.model, half) < loss(first.model, half) - 0.5
    capsys.readouterr()
    # K must split the heads; --mlp-hidden is a parallel-only flag.
    assert main([*tiny, "--branches", "3", "--out", str(tmp_path / "c")]) == 2
    assert "choose K from 1, 2, 4" in capsys.readouterr().err
    assert main([*common, "--mlp-hidden", "64", "--out", str(tmp_path / "d")]) == 2
    assert "applies to --arch parallel" in capsys.readouterr().err
