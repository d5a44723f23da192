"""mbt-bench outage on a server install: matplotlib (the ``bench`` extra) only for the plots."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mbt_aggregator.outage import cli

HINT = "pip install 'mbt-runtime[bench]'"


@pytest.fixture()
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError


@pytest.mark.usefixtures("no_matplotlib")
def test_without_matplotlib_the_run_goes_on_without_plots_and_says_how_to_get_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.plotting(None) is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and HINT in out
    assert cli.plotting(False) is False and capsys.readouterr().out == ""


@pytest.mark.usefixtures("no_matplotlib")
def test_asking_for_plots_without_matplotlib_fails_at_once_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("the benchmark ran before the missing plots were found")

    monkeypatch.setattr(cli, "run_outage", never)
    assert cli.main(["outage", "--quick", "--plots"]) == 2
    err = capsys.readouterr().err
    assert err == f"mbt-bench outage: error: --plots needs matplotlib: {HINT}\n"


def test_with_matplotlib_the_plots_are_drawn_by_default() -> None:
    assert cli.plotting(None) is True and cli.plotting(True) is True


def test_the_benchmark_command_loads_without_matplotlib() -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from mbt_aggregator.outage.cli import main; sys.exit(main(['outage', '--list']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "crash" in done.stdout
