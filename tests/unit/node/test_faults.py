"""The node's test-only Byzantine fault: refused without the opt-in, each corruption mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mbt_core.model.aggregate import aggregate
from mbt_node.cli import build_parser, config_from_args
from mbt_node.faults import (
    ENABLE_ENV,
    HUGE_FACTOR,
    CorruptionFault,
    corrupt,
    parse_fault,
    require_enabled,
)

FAULT = "corrupt=nan"
BASE = ["--artifacts", "a", "--trusted-key", "k.pem", "--serve", "0:0", "--insecure"]


def _outputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(6, 16)


def test_without_the_environment_variable_the_node_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENABLE_ENV}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbt_node.cli",
            "--artifacts",
            str(tmp_path),
            "--trusted-key",
            str(tmp_path / "k.pem"),
            "--serve",
            "0:0",
            "--unsafe-test-fault",
            FAULT,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert ENABLE_ENV in lines[0] and "tests only" in lines[0]


@pytest.mark.parametrize("value", [None, "", "0", "true", "yes"])
def test_only_exactly_one_enables_the_fault(value: str | None) -> None:
    environ = {} if value is None else {ENABLE_ENV: value}
    with pytest.raises(ValueError, match=ENABLE_ENV):
        require_enabled(parse_fault(FAULT), environ)


def test_enabled_fault_reaches_the_config_and_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENABLE_ENV, "1")
    args = build_parser().parse_args([*BASE, "--unsafe-test-fault", "corrupt=flip,rate=0.5,seed=3"])
    with caplog.at_level("WARNING", logger="mbt_node"):
        cfg = config_from_args(args)
    assert cfg.test_fault == CorruptionFault("flip", 0.5, 3)
    assert "TEST FAULT ACTIVE" in caplog.text


def test_no_fault_by_default() -> None:
    args = build_parser().parse_args(BASE)
    assert config_from_args(args).test_fault is None
    x = _outputs()
    assert corrupt(None, x) is x


@pytest.mark.parametrize(
    "spec",
    ["", "nan", "corrupt=", "corrupt=zero", "corrupt=nan,rate=0", "corrupt=nan,rate=1.5",
     "corrupt=nan,rate=x", "corrupt=nan,seed=1.5", "corrupt=nan,bogus=1", "rate=0.5",
     "corrupt=nan,corrupt=flip"],
)  # fmt: skip
def test_malformed_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_fault(spec)


def test_malformed_spec_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*BASE, "--unsafe-test-fault", "corrupt=zero"])
    assert exc.value.code == 2
    assert "corrupt must be one of" in capsys.readouterr().err


def test_nan_mode_is_all_nan_and_rejected_by_the_gateway_checks() -> None:
    x = _outputs()
    bad = parse_fault("corrupt=nan").apply(x)
    assert torch.isnan(bad).all()
    fused = aggregate(torch.stack([x, bad, x]), torch.full((3,), 1 / 3))
    assert fused.rejected[1].all() and not fused.rejected[0].any()


def test_huge_mode_scales_and_fails_the_norm_check() -> None:
    x = _outputs()
    bad = parse_fault("corrupt=huge").apply(x)
    torch.testing.assert_close(bad, x * HUGE_FACTOR)
    fused = aggregate(torch.stack([x, bad, x]), torch.full((3,), 1 / 3))
    assert fused.rejected[1].all()


def test_flip_mode_negates() -> None:
    x = _outputs()
    torch.testing.assert_close(parse_fault("corrupt=flip").apply(x), -x)


def test_random_mode_keeps_each_row_norm_but_not_its_direction() -> None:
    x = _outputs()
    bad = parse_fault("corrupt=random,seed=1").apply(x)
    torch.testing.assert_close(bad.norm(dim=-1), x.norm(dim=-1))
    cosine = torch.nn.functional.cosine_similarity(bad, x, dim=-1)
    assert cosine.abs().max() < 0.9
    fused = aggregate(torch.stack([x, bad, x]), torch.full((3,), 1 / 3))
    assert not fused.rejected.any()  # the subtle attacker passes both checks


def test_rate_corrupts_some_rows_and_leaves_the_others_exact() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    bad = parse_fault("corrupt=flip,rate=0.25,seed=2").apply(x)
    hit = (bad != x).any(-1)
    assert 0.15 < hit.float().mean() < 0.35
    torch.testing.assert_close(bad[~hit], x[~hit])
    torch.testing.assert_close(bad[hit], -x[hit])


def test_input_is_never_modified_and_dtype_is_kept() -> None:
    x = _outputs().to(torch.bfloat16)
    before = x.clone()
    for mode in ("nan", "huge", "flip", "random"):
        out = CorruptionFault(mode).apply(x)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(x, before)
