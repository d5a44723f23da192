"""Calibrated output-norm bounds: measurement, the clip/reject check, and signing at export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from mbt_core.artifacts.calibration import branch_norm_bounds, calibration_tokens, check_outputs
from mbt_core.artifacts.load import load_verified_manifest
from mbt_core.artifacts.manifest import NormBound, canonical_bytes, read_manifest
from mbt_core.cli.main import main
from mbt_core.errors import SignatureError
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from tests.conftest import SAMPLE_TEXT
from tests.unit import hypothesis_profiles  # noqa: F401  (registers the profiles)
from tests.unit.artifact_helpers import edit_manifest, export_signed, new_key

HELD_OUT = "Full fathom five thy father lies; of his bones are coral made.\n" * 8


def norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.double(), dim=-1)


def test_rows_within_the_bound_come_back_bit_for_bit() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    bound = float(torch.linalg.vector_norm(x, dim=-1).max())  # one row exactly at it
    clipped, rejected = check_outputs(x, bound)
    assert clipped is x and not rejected.any()


def test_rows_above_the_bound_are_clipped_and_far_above_rejected() -> None:
    torch.manual_seed(0)
    signs = torch.randint(0, 2, (6, 16)).float() * 2 - 1
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0, 4.5, 40.0])
    x = 0.25 * signs * scale[:, None]  # row norms exactly 0.5, 1, 2, 4, 4.5, 40
    clipped, rejected = check_outputs(x, bound=1.0, k=4.0)
    assert rejected.tolist() == [False, False, False, False, True, True]
    assert torch.equal(clipped[:2], x[:2])  # below and exactly at the bound: untouched
    for i in (2, 3):  # clipped down to the bound (4 = k x bound is still clipped), direction kept
        assert math.isclose(float(norms(clipped[i])), 1.0, rel_tol=1e-6)
        assert torch.allclose(clipped[i] * scale[i], x[i])
    assert not clipped[4:].any()  # rejected rows are zeroed, never fed onward


def test_non_finite_rows_are_rejected_alone() -> None:
    x = torch.full((4, 8), 0.1)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3, 5] = -float("inf")
    clipped, rejected = check_outputs(x, bound=10.0)
    assert rejected.tolist() == [False, True, True, True]
    assert torch.equal(clipped[0], x[0]) and torch.isfinite(clipped).all()


def test_bad_bounds_are_refused() -> None:
    x = torch.ones(2, 4)
    for bound, k in ((0.0, 4.0), (float("nan"), 4.0), (1.0, 0.5), (1.0, float("inf"))):
        with pytest.raises(ValueError):
            check_outputs(x, bound, k)


@given(
    rows=st.lists(
        st.lists(
            st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=False),
            min_size=4,
            max_size=4,
        ),
        min_size=1,
        max_size=8,
    ),
    bound=st.floats(min_value=1e-3, max_value=1e6),
    k=st.floats(min_value=1.0, max_value=100.0),
)
def test_check_outputs_invariants(rows: list[list[float]], bound: float, k: float) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    clipped, rejected = check_outputs(x, bound, k)
    n = torch.linalg.vector_norm(x, dim=-1)  # float32, as the check measures
    finite = torch.isfinite(x).all(-1)
    expected_reject = ~finite | (n > k * bound)
    assert torch.equal(rejected, expected_reject)
    assert torch.isfinite(clipped).all()
    kept = ~rejected
    assert (norms(clipped[kept]) <= bound * (1 + 1e-5)).all()
    within = kept & (n <= bound)
    assert torch.equal(clipped[within], x[within])


def _manual_branch_norms(model: MBTLanguageModel, idx: Tensor) -> dict[tuple[int, int], Tensor]:
    """Per-branch output norms by running the layers by hand (no hooks)."""
    out = {}
    with torch.no_grad():
        h = model.embed(idx)
        for li, layer in enumerate(model.layers):
            for b, branch in enumerate(layer.branches):
                out[(li, b)] = norms(branch(h)).flatten()
            h = layer(h).output
    return out


@pytest.fixture()
def calibrated(
    tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer
) -> dict[tuple[int, int], NormBound]:
    ids = calibration_tokens(tiny_tokenizer, [SAMPLE_TEXT], 256)
    return branch_norm_bounds(tiny_model, ids, margin=2.0)


def test_bounds_measure_every_branch(
    tiny_model: MBTLanguageModel,
    tiny_tokenizer: Tokenizer,
    calibrated: dict[tuple[int, int], NormBound],
) -> None:
    ids = calibration_tokens(tiny_tokenizer, [SAMPLE_TEXT], 256)
    t = tiny_model.cfg.context_length
    manual = _manual_branch_norms(tiny_model, ids[: ids.numel() // t * t].view(-1, t))
    assert (
        set(calibrated)
        == set(manual)
        == {(li, b) for li, k in enumerate(tiny_model.cfg.branches) for b in range(k)}
    )
    for key, nb in calibrated.items():
        assert math.isclose(nb.max_norm, float(manual[key].max()), rel_tol=1e-5)
        assert nb.bound == pytest.approx(2.0 * nb.max_norm)
        assert nb.quantile_norm <= nb.max_norm and nb.level == 0.999


def _guarded_logits(
    model: MBTLanguageModel, idx: Tensor, bounds: dict[tuple[int, int], NormBound]
) -> tuple[Tensor, dict[tuple[int, int], int]]:
    """Logits with every branch output passed through ``check_outputs`` (as the gateway
    does), and how many rows of each branch were clipped or rejected."""
    changed: dict[tuple[int, int], int] = {}
    handles = []
    for li, layer in enumerate(model.layers):
        for b, branch in enumerate(layer.branches):

            def guard(
                _m: object, _i: object, out: Tensor, key: tuple[int, int] = (li, b)
            ) -> Tensor:
                rows = out.reshape(-1, out.shape[-1])
                clipped, rejected = check_outputs(rows, bounds[key].bound)
                changed[key] = int(((clipped != rows).any(-1) | rejected).sum())
                return clipped.view_as(out)

            handles.append(branch.register_forward_hook(guard))
    try:
        with torch.no_grad():
            return model(idx), changed
    finally:
        for h in handles:
            h.remove()


def test_healthy_branches_pass_bit_for_bit_on_unseen_text(
    tiny_model: MBTLanguageModel,
    tiny_tokenizer: Tokenizer,
    calibrated: dict[tuple[int, int], NormBound],
) -> None:
    idx = torch.tensor([tiny_tokenizer.encode(HELD_OUT)[:48]])
    with torch.no_grad():
        plain = tiny_model(idx)
    guarded, changed = _guarded_logits(tiny_model, idx, calibrated)
    assert set(changed.values()) == {0}
    assert torch.equal(guarded, plain)


def test_a_branch_gone_wild_is_clipped_or_rejected(
    tiny_model: MBTLanguageModel,
    tiny_tokenizer: Tokenizer,
    calibrated: dict[tuple[int, int], NormBound],
) -> None:
    idx = torch.tensor([tiny_tokenizer.encode(HELD_OUT)[:48]])
    with torch.no_grad():
        plain = tiny_model(idx)
        tiny_model.layers[1].branches[2].blocks[-1].mlp[2].bias.fill_(50.0)
    guarded, changed = _guarded_logits(tiny_model, idx, calibrated)
    assert changed[(1, 2)] == idx.numel()  # every position of the broken branch
    assert all(n == 0 for key, n in changed.items() if key[0] == 0)
    assert not torch.equal(guarded, plain)


def test_bounds_are_signed_into_the_manifest(
    tmp_path: Path,
    tiny_model: MBTLanguageModel,
    tiny_tokenizer: Tokenizer,
    calibrated: dict[tuple[int, int], NormBound],
) -> None:
    key = new_key(tmp_path, "release")
    out, state = tmp_path / "release", tmp_path / "state.json"
    checkpoint = Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer)
    export_signed(checkpoint, out, [key], norm_bounds=calibrated)
    manifest = load_verified_manifest(out, [key.public_path], state_file=state, record=False)
    assert manifest.norm_bounds() == calibrated
    assert manifest.trunk().norm_bound is None
    edit_manifest(out, lambda d: d["artifacts"][1]["norm_bound"].update(bound=1e9))
    with pytest.raises(SignatureError, match="manifest changed after signing"):
        load_verified_manifest(out, [key.public_path], state_file=state)


def test_manifest_without_bounds_keeps_its_old_canonical_form(
    tmp_path: Path, tiny_model: MBTLanguageModel, tiny_tokenizer: Tokenizer
) -> None:
    key = new_key(tmp_path, "release")
    checkpoint = Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer)
    manifest = export_signed(checkpoint, tmp_path / "r", [key])
    assert b"norm_bound" not in canonical_bytes(manifest)
    assert read_manifest(tmp_path / "r").norm_bounds() == {}
    edit_manifest(tmp_path / "r", lambda d: d["artifacts"][0].update(norm_bound=None))
    with pytest.raises(Exception, match="norm_bound must be an object"):
        read_manifest(tmp_path / "r")


def test_export_without_bounds_for_every_branch_is_refused(
    tmp_path: Path,
    tiny_model: MBTLanguageModel,
    tiny_tokenizer: Tokenizer,
    calibrated: dict[tuple[int, int], NormBound],
) -> None:
    partial = dict(list(calibrated.items())[:-1])
    checkpoint = Checkpoint(model=tiny_model, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="one bound per"):
        export_signed(checkpoint, tmp_path / "r", [], norm_bounds=partial)
    assert not (tmp_path / "r").exists()


def test_cli_export_calibrates_by_default(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "default"
    assert main(["export", str(tiny_checkpoint), str(out), "--calibration-tokens", "200"]) == 0
    assert "output-norm bounds calibrated on 200 tokens" in capsys.readouterr().out
    entries = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert all("norm_bound" in e for e in entries if e["role"] == "branch")
    text = tmp_path / "cal.txt"
    text.write_text(SAMPLE_TEXT)
    own = tmp_path / "own"
    assert main(["export", str(tiny_checkpoint), str(own), "--calibration", str(text)]) == 0
    assert read_manifest(own).norm_bounds() != read_manifest(out).norm_bounds()
    none = tmp_path / "none"
    assert main(["export", str(tiny_checkpoint), str(none), "--no-calibration"]) == 0
    assert read_manifest(none).norm_bounds() == {}
