"""``mbt finetune``: an imported (here: tiny random Llama) model continues training with
in-place distillation; what is frozen stays bit for bit, and the masked model stays far closer
to the full one than after the same fine-tune on the labels alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mbt_core.artifacts.export import export_artifacts
from mbt_core.cli.main import main
from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.model.hf_import import ImportOptions, import_decoder
from mbt_core.model.masks import outage_masks
from mbt_core.model.tokenizer import Tokenizer
from tests.conftest import SAMPLE_TEXT
from tests.dense_standin import StandinConfig, train_standin
from tests.hf_models import imported_llama


@pytest.fixture
def imported(tmp_path: Path, tiny_tokenizer: Tokenizer) -> Path:
    return imported_llama(tmp_path, tiny_tokenizer)


def _finetune(path: Path, out: Path, *extra: str) -> int:
    return main([
        "finetune", str(path), "--out", str(out), "--data", str(path.parent / "text.txt"),
        "--steps", "40", "--lr", "3e-3", "--block-size", "32", "--eval-interval", "1000000",
        "--eval-tokens", "256", "--no-progress", "--branch-drop", "0.5", *extra,
    ])  # fmt: skip


def _gap(path: Path) -> float:
    """KL of the half-masked model's next-token distribution from the full model's."""
    ckpt = load_checkpoint(path)
    model = ckpt.model.float() if ckpt.model.cfg.dtype != "float32" else ckpt.model
    ids = torch.tensor([ckpt.tokenizer.encode(SAMPLE_TEXT)[:64]])
    half = outage_masks(model.cfg.branches, 0.5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = F.log_softmax(model(ids), -1)
        masked = F.log_softmax(model(ids, masks=half), -1)
    return F.kl_div(masked, full, log_target=True, reduction="batchmean").item()


def test_finetune_keeps_frozen_parts_and_closes_the_masked_gap(imported: Path) -> None:
    out = imported.parent / "ft"
    assert _finetune(imported, out, "--freeze", "trunk") == 0
    tuned = load_checkpoint(out / "model.safetensors")
    before = load_checkpoint(imported).model.state_dict()
    after = tuned.model.state_dict()
    assert tuned.model.cfg.kind == "sliced" and tuned.model.cfg.dtype == "float32"
    assert tuned.info["finetuned_from"] == imported.name
    for name in ("tok_emb.weight", "head.weight", "ln_f.weight"):
        assert torch.equal(after[name], before[name].float())  # frozen: bit for bit
    moved = [
        n for n in after if n.startswith("layers.") and not torch.equal(after[n], before[n].float())
    ]
    assert any(".attn." in n for n in moved) and any(".mlp." in n for n in moved)
    # The same fine-tune without sub-models (labels only) leaves a far wider masked gap.
    plain = imported.parent / "plain"
    assert _finetune(imported, plain, "--freeze", "trunk", "--submodels", "0") == 0
    assert _gap(out / "model.safetensors") < 0.8 * _gap(plain / "model.safetensors")
    manifest = export_artifacts(tuned, out / "artifacts")  # serves like any model
    assert manifest.config.kind == "sliced"


def test_finetune_refuses_what_it_cannot_do(imported: Path, capsys) -> None:
    out = imported.parent / "bad"
    with pytest.raises(SystemExit):
        _finetune(imported, out, "--freeze", "everything")
    assert "cannot freeze everything" in capsys.readouterr().err
    assert _finetune(imported, out, "--freeze", "trunk,alpha,attention,mlp,norms") == 2
    assert "leaves nothing to train" in capsys.readouterr().err
    assert main(["finetune", str(out / "missing.safetensors"), "--out", str(out)]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


def test_the_dense_stand_in_trains_and_imports_exactly(tmp_path: Path) -> None:
    """The README's stand-in for a pretrained model: a few steps of the real trainer, then
    the K=4 import must give the logits transformers gives for the folder it saved."""
    from transformers import LlamaForCausalLM

    data = tmp_path / "text.txt"
    data.write_text(SAMPLE_TEXT * 4)
    out = tmp_path / "dense"
    cfg = StandinConfig(
        out,
        steps=3,
        d_model=32,
        blocks=1,
        heads=4,
        intermediate=64,
        context=32,
        batch_size=2,
        data=data,
    )
    train_standin(cfg, progress=False)
    reference = LlamaForCausalLM.from_pretrained(out).eval()
    ckpt = import_decoder(out, ImportOptions(branches=4))
    ids = torch.tensor([ckpt.tokenizer.encode(SAMPLE_TEXT)[:32]])
    with torch.no_grad():
        want = reference(ids).logits
        got = ckpt.model(ids)
    assert ckpt.model.cfg.branches == (4, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
