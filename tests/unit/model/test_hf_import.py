"""``mbt import``: a Hugging Face decoder becomes an MBT model whose logits equal the original's.

The models are tiny random ones of each family (:mod:`tests.hf_models`), saved as a download is;
the comparison runs the imported model as the runtime does (``MBTLanguageModel`` with its KV
cache: a prefill, then one-token steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mbt_core.cli.main import main
from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.model.decoder import UnsupportedModel
from mbt_core.model.hf_import import ImportOptions, import_decoder
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from tests.hf_models import FAMILIES, VOCAB, save_hf

PREFILL, STEPS = 7, 20


@pytest.fixture(scope="module")
def saved(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer
) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        out[family] = (folder, save_hf(family, folder, tiny_tokenizer))
    return out


def _incremental_logits(model: MBTLanguageModel, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache()
    with torch.no_grad():
        got = [model(ids[:, :PREFILL], cache=cache)]
        for t in range(PREFILL, ids.shape[1]):
            got.append(model(ids[:, t : t + 1], cache=cache))
    return torch.cat(got, dim=1)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_logits_equal_the_hf_model(saved, family: str, k: int) -> None:
    folder, reference = saved[family]
    model = import_decoder(folder, ImportOptions(branches=k)).model
    assert model.cfg.kind == "sliced" and set(model.cfg.branches) == {k}
    expected_layers = 2 if family == "gpt_neox" else 4  # parallel residual: one layer a block
    assert model.cfg.n_layers == expected_layers
    ids = torch.randint(0, VOCAB, (1, PREFILL + STEPS), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        want = reference(ids).logits
    diff = (_incremental_logits(model, ids) - want).abs().max().item()
    assert diff < 1e-4, diff


def test_a_missing_branch_renormalizes_and_is_not_an_error(saved) -> None:
    folder, _ = saved["llama"]
    model = import_decoder(folder, ImportOptions(branches=4)).model
    ids = torch.tensor([[5, 17, 42, 9]])
    healthy = [torch.ones(k, dtype=torch.bool) for k in model.cfg.branches]
    degraded = [m.clone() for m in healthy]
    degraded[1][2] = False  # layer 1 (an MLP layer) loses branch 2
    degraded[2][0] = False  # layer 2 (an attention layer) loses branch 0
    with torch.no_grad():
        full = model(ids, healthy)
        partial = model(ids, degraded)
    assert torch.isfinite(partial).all()
    assert not torch.allclose(partial, full, atol=1e-4)
    # Still close to the dense model: 3 of 4 slices carry the sublayer, rescaled by 4/3.
    assert torch.corrcoef(torch.stack([partial.flatten(), full.flatten()]))[0, 1] > 0.5


def test_the_cli_writes_a_checkpoint_in_the_requested_dtype(saved, tmp_path: Path) -> None:
    folder, reference = saved["qwen2"]
    out = tmp_path / "qwen2-k2.safetensors"
    assert main(["import", str(folder), "--branches", "2", "--out", str(out), "--quiet"]) == 0
    assert (
        main(
            [
                "import",
                str(folder),
                "-k",
                "2",
                "--out",
                str(tmp_path / "bf16.safetensors"),
                "--dtype",
                "bfloat16",
                "--quiet",
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "bf16.safetensors"), "pt") as f:
        dtypes = {f.get_slice(n).get_dtype() for n in list(f.keys())}
        assert dtypes == {"BF16"}  # not widened on disk
        config = json.loads(f.metadata()["config"])
    assert config["kind"] == "sliced" and config["dtype"] == "bfloat16"
    assert config["decoder"]["model_type"] == "qwen2"
    ckpt = load_checkpoint(out)
    half = load_checkpoint(tmp_path / "bf16.safetensors")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert ckpt.tokenizer.eos_id == 0 and ckpt.info["imported_from"] == "qwen2"
    ids = torch.tensor([ckpt.tokenizer.encode("Shall I compare thee")])
    with torch.no_grad():
        want = reference(ids).logits
        assert (ckpt.model(ids) - want).abs().max().item() < 1e-4
        rough = half.model(ids).float()
    assert torch.corrcoef(torch.stack([rough.flatten(), want.flatten()]))[0, 1] > 0.99


def _refusal(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(["import", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def test_refusals_are_one_line(saved, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = saved["llama"]  # 8 heads over 4 KV groups, 96 neurons
    out = str(tmp_path / "x.safetensors")
    assert "do not divide the 4 key-value head groups" in _refusal(
        capsys, [str(folder), "-k", "8", "--out", out]
    )
    assert "choose K from 1, 2, 4" in _refusal(capsys, [str(folder), "-k", "3", "--out", out])
    assert "has no config.json" in _refusal(capsys, [str(tmp_path), "-k", "2", "--out", out])
    odd = tmp_path / "mamba"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert "architecture 'mamba' is not supported" in _refusal(
        capsys, [str(odd), "-k", "2", "--out", out]
    )
    assert "exceeds the model's 4096 positions" in _refusal(
        capsys, [str(folder), "-k", "2", "--out", out, "--context-length", "5000"]
    )
    assert not Path(out).exists()  # nothing half-written


def test_a_missing_tokenizer_or_tensor_is_refused(saved, tmp_path: Path) -> None:
    folder, _ = saved["gpt2"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(UnsupportedModel, match=r"tokenizer\.json"):
        import_decoder(bare, ImportOptions(branches=2))
    (bare / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "n_layer": 3}))  # a block too many
    with pytest.raises(UnsupportedModel, match="lacks tensor"):
        import_decoder(bare, ImportOptions(branches=2))


def test_float16_is_kept_on_disk_and_loads_as_float16(saved, tmp_path: Path) -> None:
    folder, _ = saved["gpt_neox"]
    out = tmp_path / "f16.safetensors"
    assert main(["import", str(folder), "-k", "2", "--out", str(out), "--dtype", "float16",
                 "--quiet"]) == 0  # fmt: skip
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in list(f.keys())} == {"F16"}
    model = load_checkpoint(out).model
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_trained_configs_keep_their_bytes_and_sliced_ones_round_trip(saved) -> None:
    """A trained float32 model's config (and so every manifest signed over it before kinds
    existed) serializes as before; an imported one carries its kind, dtype and decoder."""
    from mbt_core.model.config import ModelConfig

    trained = ModelConfig().to_dict()
    assert not {"kind", "dtype", "decoder"} & set(trained)
    assert ModelConfig.from_dict(trained) == ModelConfig()
    sliced = import_decoder(saved["llama"][0], ImportOptions(branches=2)).model.cfg
    data = json.loads(json.dumps(sliced.to_dict()))
    assert data["kind"] == "sliced" and data["decoder"]["rope"]["rope_type"] == "llama3"
    assert ModelConfig.from_dict(data) == sliced
    with pytest.raises(ValueError, match="belongs to a model of kind 'sliced'"):
        ModelConfig.from_dict({**data, "kind": "block"})
    with pytest.raises(ValueError, match="needs its decoder description"):
        ModelConfig.from_dict({**data, "decoder": None})
