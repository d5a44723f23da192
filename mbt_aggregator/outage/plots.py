"""PNG figures of an outage run (matplotlib, Agg backend: no display needed).

* ``latency.png``: per scenario (rows) and policy (columns), every token's latency over the
  run's time, with the faults (red) and recoveries (green) marked;
* ``quality.png``: perplexity and KL against the fraction of branch steps lost while the text
  was scored, from the kill sweep (a line) and from every scenario run (points).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from mbt_aggregator.outage.report import RunResult


def latency_plot(runs: Sequence[RunResult], path: Path) -> Path:
    scenarios = list(dict.fromkeys(r.scenario for r in runs))
    policies = list(dict.fromkeys(r.policy for r in runs))
    fig, axes = plt.subplots(
        len(scenarios),
        len(policies),
        figsize=(3.2 * len(policies) + 1, 2.2 * len(scenarios) + 0.8),
        sharey=True,
        squeeze=False,
    )
    by_key = {(r.scenario, r.policy): r for r in runs}
    for row, scenario in enumerate(scenarios):
        for col, policy in enumerate(policies):
            ax = axes[row][col]
            run = by_key.get((scenario, policy))
            ax.set_title(f"{scenario} / {policy}", fontsize=8)
            ax.tick_params(labelsize=7)
            if run is None:
                continue
            if run.series:
                t, ms, _ = zip(*run.series, strict=True)
                ax.scatter(t, ms, s=3, color="tab:blue")
            for m in run.markers:
                color = "tab:red" if m["kind"] == "fault" else "tab:green"
                ax.axvline(m["t_s"], color=color, linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            if row == len(scenarios) - 1:
                ax.set_xlabel("seconds since start", fontsize=7)
            if col == 0:
                ax.set_ylabel("token latency (ms)", fontsize=7)
    fig.suptitle("token latency over time (red: fault, green: recovery)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_plot(
    runs: Sequence[RunResult],
    sweep: Sequence[dict[str, Any]],
    baseline_perplexity: float,
    path: Path,
) -> Path:
    fig, (ax_ppl, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    points = [r for r in runs if r.lost_fraction is not None and r.kl is not None]
    swept = [s for s in sweep if s.get("lost_fraction") is not None and s.get("kl") is not None]
    for ax, key, label in (
        (ax_ppl, "perplexity", "perplexity"),
        (ax_kl, "kl", "KL(healthy || run)"),
    ):
        if swept:
            ax.plot(
                [s["lost_fraction"] for s in swept],
                [s[key] for s in swept],
                marker="o",
                color="black",
                label="kill 0..k nodes",
            )
        for scenario in dict.fromkeys(r.scenario for r in points):
            mine = [r for r in points if r.scenario == scenario]
            ax.scatter(
                [r.lost_fraction for r in mine],
                [getattr(r, key) for r in mine],
                s=18,
                zorder=3,
                label=scenario,
            )
        ax.set_xlabel("fraction of branch steps lost while scoring")
        ax.set_ylabel(label)
    ax_ppl.axhline(baseline_perplexity, color="grey", linestyle=":", label="in-process")
    ax_ppl.set_yscale("log")  # an undetected Byzantine node is off by orders of magnitude
    ax_ppl.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_kl.set_yscale("symlog", linthresh=1e-3)  # healthy runs sit at 0
    ax_ppl.legend(fontsize=7)
    fig.suptitle("quality against the fraction of branches lost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ramp_plot(runs: Sequence[RunResult], path: Path) -> Path:
    """Per expand run: beta and the drift (KL) over time, and the probe's perplexity and the
    tokens' latency over the same time, the expansion marked."""
    fig, axes = plt.subplots(2, len(runs), figsize=(4.6 * len(runs) + 0.6, 5.0), squeeze=False)
    for col, run in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        t = [s["t_s"] for s in run.ramp]
        top.plot(t, [s["beta"] for s in run.ramp], color="tab:blue", label="beta")
        top.set_ylabel("beta", fontsize=7)
        top.set_title(f"{run.scenario} / {run.policy}", fontsize=8)
        kl = top.twinx()
        measured = [(s["t_s"], s["drift_kl"]) for s in run.ramp if s["drift_kl"] is not None]
        if measured:
            kl.plot(*zip(*measured, strict=True), color="tab:red", marker=".", label="drift KL")
        kl.set_ylabel("drift KL (nats/token)", fontsize=7, color="tab:red")
        ppl = [(s["t_s"], s["probe_perplexity"]) for s in run.ramp if s["probe_perplexity"]]
        if ppl:
            bottom.plot(*zip(*ppl, strict=True), color="tab:purple", marker=".")
        bottom.set_ylabel("probe perplexity", fontsize=7, color="tab:purple")
        bottom.set_xlabel("seconds since start", fontsize=7)
        if run.series:
            lat = bottom.twinx()
            ts, ms, _ = zip(*run.series, strict=True)
            lat.scatter(ts, ms, s=2, color="tab:gray", alpha=0.5)
            lat.set_yscale("log")
            lat.set_ylabel("token latency (ms)", fontsize=7, color="tab:gray")
        for ax in (top, bottom, kl):
            ax.tick_params(labelsize=7)
        for m in run.markers:
            for ax in (top, bottom):
                ax.axvline(m["t_s"], color="tab:green", linestyle="--", linewidth=0.8)
    fig.suptitle("live expansion: beta, drift and probe perplexity over the ramp", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
