"""mbt-bench: benchmarks of the MBT runtime (outage: the outage simulation; soak: churn under
load for minutes)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType

import grpc

from mbt_aggregator.outage.ramp import ramp_table, ramp_windows
from mbt_aggregator.outage.report import baseline_row, table, table_row, write_json
from mbt_aggregator.outage.runner import BenchConfig, payload, run_outage
from mbt_aggregator.outage.scenario import Scenario, load_scenario, shipped_names
from mbt_aggregator.outage.soak import SoakConfig, run_soak, soak_doc, summary
from mbt_aggregator.outage.workload import QUICK, Workload
from mbt_core.artifacts.manifest import read_manifest
from mbt_core.cluster.local import Layout
from mbt_core.cluster.process import StartError
from mbt_core.errors import MbtError
from mbt_core.model.checkpoint import load_checkpoint

OUTAGE_DOC = """\
Run one fixed workload through a local cluster (branch-node processes + a gateway on this
machine) healthy and under injected faults, for several fan-out policies, and compare latency,
throughput, availability and quality with the in-process baseline of the same model.

Workload: STREAMS clients each send the prompts in turn (greedy, MAX_NEW_TOKENS each) for
DURATION_S seconds (longer, by at most {grace:g} s, until a scheduled recovery shows in the tokens),
and a fixed excerpt of The Tempest is scored with next-token log-probabilities right after the
first fault (half-way without one). Faults happen at seconds after the workload starts, as the
scenario files say (--list shows the shipped ones; a .toml file of your own works as well).

Columns: p50/p95/p99 ms: token latency seen by the clients; tok/s: tokens received per second,
all clients together; req ok/sent: requests completed / sent; lost: tokens of failed requests
that never came; ppl: perplexity of the text; KL: mean KL(healthy || run) of the next-token
distribution over the text (healthy = the in-process model); br lost: fraction of branch steps
masked or rejected while the text was scored; mask s: fault -> first token that no longer
used the node; recov s: recovery (restart begun, SIGCONT, link up) -> first token using the
node again; match: completed requests whose greedy tokens equal the in-process ones.

The sweep kills nodes 0, 1, ... one after another (policy all) and scores the text after
each kill: quality against the fraction of branches lost.

Output in --out: report.json (everything, per token), latency.png and quality.png (matplotlib:
{extra}).
"""

OUTAGE_EPILOG = """\
examples:
  mbt-bench outage --quick                       # < 2 min: 2 nodes, healthy + crash
  mbt-bench outage                               # every shipped scenario x 5 policies
  mbt-bench outage --scenario pause --scenario my.toml --policy deadline+hedge --nodes 4
  sudo mbt-bench outage --netns --scenario partition --scenario slow-link

a scenario file (TOML; node = an index or "random", drawn with the scenario's seed or --seed):
  description = "SIGKILL node 0 after 1.5 s, restart it 1 s later"
  [[events]]
  action = "kill"        # kill | pause | flap | partition | slow_link (timed, at_s)
  node = 0               # slow (delay_ms) | corrupt (mode, rate): from the start
  at_s = 1.5
  recover_after_s = 1.0  # restart / SIGCONT / link up; omit to keep the fault
"""

FULL_POLICIES = ("all", "all+hedge", "quorum", "deadline", "deadline+hedge")
QUICK_POLICIES = ("all", "deadline")
QUICK_SCENARIOS = ("healthy", "crash")
# The default order: the reference first, then by kind of fault (netns ones need --netns).
FULL_SCENARIOS = ("healthy", "crash", "pause", "slow", "flapping", "byzantine-nan", "byzantine")
FULL_LAYOUT = Layout(nodes=4, replicas=2)
QUICK_LAYOUT = Layout(nodes=2, replicas=1)
FULL = Workload()
BENCH_EXTRA = "pip install 'mbt-runtime[bench]'"  # matplotlib, for the plots


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so that the cluster and namespaces are cleaned up."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbt-bench", description=__doc__)
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    o = sub.add_parser(
        "outage",
        help="latency, availability and quality under injected node faults",
        description=OUTAGE_DOC.format(grace=FULL.recovery_grace_s, extra=BENCH_EXTRA),
        epilog=OUTAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    o.add_argument(
        "--quick",
        action="store_true",
        help=f"a small run (< 2 min): {QUICK_LAYOUT.nodes} nodes, scenarios "
        f"{','.join(QUICK_SCENARIOS)}, policies {','.join(QUICK_POLICIES)}, "
        f"{QUICK.duration_s:g} s per run",
    )
    o.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    o.add_argument(
        "--scenario",
        action="append",
        default=None,
        metavar="FILE_OR_NAME",
        help="a scenario .toml file or a shipped name (repeat; default: every shipped one "
        "that runs without --netns, all of them with --netns)",
    )
    o.add_argument(
        "--policy",
        action="append",
        default=None,
        metavar="NAME",
        help="all | quorum | deadline, each optionally +hedge (repeat; default: "
        f"{','.join(FULL_POLICIES)})",
    )
    o.add_argument(
        "--out", type=Path, default=Path("outage-report"), help="output folder (%(default)s)"
    )
    o.add_argument(
        "--seed", type=int, default=0, help="seed of the scenarios' random choices (%(default)s)"
    )
    src = o.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None, help="model (default: shipped)")
    src.add_argument("--artifacts", type=Path, default=None, help="a signed export (mbt export)")
    o.add_argument("--trusted-key", type=Path, action="append", default=[], help="with --artifacts")
    o.add_argument(
        "--expand-checkpoint",
        type=Path,
        default=None,
        metavar="FILE",
        help="the grown model an expand scenario publishes (mbt expand, from the --checkpoint "
        "model); default: that model grown untrained (noisy copies of its branches)",
    )
    lay = o.add_mutually_exclusive_group()
    lay.add_argument("--nodes", type=int, default=None, help=f"default {FULL_LAYOUT.nodes}")
    lay.add_argument(
        "--branches-per-node",
        type=int,
        default=None,
        help="instead of --nodes: as many nodes as it takes to hold this many branches of each "
        "layer per node",
    )
    o.add_argument(
        "--replicas",
        type=int,
        default=None,
        help=f"nodes per branch (default {FULL_LAYOUT.replicas})",
    )
    o.add_argument("--streams", type=int, default=None, help=f"clients (default {FULL.streams})")
    o.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens per request (default {FULL.max_new_tokens})",
    )
    o.add_argument(
        "--duration-s", type=float, default=None, help=f"per run (default {FULL.duration_s:g})"
    )
    o.add_argument(
        "--request-timeout-s",
        type=float,
        default=1.0,
        help="the gateway's per-call bound: how long 'all' waits for a silent node (%(default)s)",
    )
    o.add_argument(
        "--deadline-ms", type=float, default=40.0, help="of the deadline policy (%(default)s)"
    )
    o.add_argument(
        "--quorum-weight",
        type=float,
        default=0.7,
        help="of the quorum policy: the fraction of a layer's weight to wait for (%(default)s)",
    )
    o.add_argument(
        "--netns",
        action="store_true",
        help="root only: every node in its own network namespace on a bridge (mDNS over real "
        "interfaces, partitions, tc-shaped links); always cleaned up",
    )
    o.add_argument("--no-sweep", action="store_true", help="skip the kill 0..k nodes sweep")
    o.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"draw latency.png and quality.png (needs matplotlib: {BENCH_EXTRA}; default: "
        "when matplotlib is installed)",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_soak(sub)
    return p


def _add_soak(sub: argparse._SubParsersAction) -> None:
    d = SoakConfig()
    s = sub.add_parser(
        "soak",
        help="clients generate for minutes while nodes are killed, restarted, paused, resumed",
        description=soak_doc(),
        epilog="examples:\n  mbt-bench soak                      # 10 min, 4 nodes x 2 "
        "replicas, 4 clients\n  mbt-bench soak --duration-s 60 --seed 3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--duration-s", type=float, default=d.duration_s, help="of the load (%(default)s)"
    )
    s.add_argument("--clients", type=int, default=d.clients, help="concurrent (%(default)s)")
    s.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per request")
    s.add_argument("--nodes", type=int, default=d.layout.nodes, help="(%(default)s)")
    s.add_argument(
        "--replicas", type=int, default=d.layout.replicas, help="per branch, >= 2 (%(default)s)"
    )
    s.add_argument("--seed", type=int, default=d.seed, help="of the faults drawn (%(default)s)")
    s.add_argument("--checkpoint", type=Path, default=None, help="model (default: shipped)")
    s.add_argument(
        "--out", type=Path, default=Path("soak-report"), help="output folder (%(default)s)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_soak_command(args: argparse.Namespace) -> int:
    cfg = SoakConfig(
        duration_s=args.duration_s,
        clients=args.clients,
        max_new_tokens=args.max_new_tokens,
        layout=Layout(args.nodes, args.replicas),
        seed=args.seed,
        checkpoint=args.checkpoint,
        progress=not args.no_progress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_soak(cfg)
    data = asdict(result) | {"missed": result.missed()}
    (args.out / "gateway.log").write_text(data.pop("gateway_log"), encoding="utf-8")
    write_json(args.out / "soak.json", data)
    print(summary(result))
    print(f"wrote {args.out / 'soak.json'}, {args.out / 'gateway.log'}")
    return 1 if result.missed() else 0


def _layout(args: argparse.Namespace) -> Layout:
    default = QUICK_LAYOUT if args.quick else FULL_LAYOUT
    replicas = args.replicas if args.replicas is not None else default.replicas
    nodes = args.nodes if args.nodes is not None else default.nodes
    if args.branches_per_node is not None:
        if args.branches_per_node <= 0:
            raise ValueError("--branches-per-node must be positive")
        if args.artifacts is None:
            branches = load_checkpoint(args.checkpoint).model.cfg.branches
        else:
            branches = read_manifest(args.artifacts).config.branches
        nodes = math.ceil(max(branches) * replicas / args.branches_per_node)
    return Layout(nodes, replicas)


def _workload(args: argparse.Namespace) -> Workload:
    base = QUICK if args.quick else FULL
    changes = {
        key: value
        for key, value in (
            ("streams", args.streams),
            ("max_new_tokens", args.max_new_tokens),
            ("duration_s", args.duration_s),
        )
        if value is not None
    }
    return replace(base, **changes)


def _scenarios(args: argparse.Namespace) -> tuple[Scenario, ...]:
    if args.scenario:
        names = args.scenario
    elif args.quick:
        names = list(QUICK_SCENARIOS)
    else:
        names = [*FULL_SCENARIOS, *(n for n in shipped_names() if n not in FULL_SCENARIOS)]
    found = tuple(load_scenario(n) for n in names)
    if not args.scenario and not args.netns:
        found = tuple(s for s in found if not s.needs_netns)
    return found


def _list() -> None:
    for name in shipped_names():
        s = load_scenario(name)
        print(f"{name:<15} {s.description}{'  [--netns]' if s.needs_netns else ''}")


def run_outage_command(args: argparse.Namespace) -> int:
    if args.list:
        _list()
        return 0
    policies = tuple(args.policy or (QUICK_POLICIES if args.quick else FULL_POLICIES))
    cfg = BenchConfig(
        layout=_layout(args),
        policies=policies,
        scenarios=_scenarios(args),
        workload=_workload(args),
        seed=args.seed,
        checkpoint=args.checkpoint,
        artifacts=args.artifacts,
        trusted_keys=tuple(args.trusted_key),
        netns=args.netns,
        request_timeout_s=args.request_timeout_s,
        deadline_ms=args.deadline_ms,
        quorum_weight=args.quorum_weight,
        sweep=not args.no_sweep,
        progress=not args.no_progress,
        expand_checkpoint=args.expand_checkpoint,
    )
    plots = plotting(args.plots)  # before the run: --plots without matplotlib stops here
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_outage(cfg)
    data = payload(cfg, result, args.quick)
    written = [args.out / "report.json"]
    write_json(written[0], data)
    if plots:
        from mbt_aggregator.outage.plots import latency_plot, quality_plot, ramp_plot

        written.append(latency_plot(result.runs, args.out / "latency.png"))
        written.append(
            quality_plot(
                result.runs, result.sweep, result.baseline.perplexity, args.out / "quality.png"
            )
        )
        ramps = [r for r in result.runs if r.ramp]
        if ramps:
            written.append(ramp_plot(ramps, args.out / "ramp.png"))
    base = data["baseline"]
    rows = [
        baseline_row(
            base["latency_p50_ms"],
            base["latency_p95_ms"],
            base["latency_p99_ms"],
            base["tokens_per_s"],
            base["perplexity"],
        ),
        *(table_row(r) for r in result.runs),
    ]
    layout = cfg.layout
    print(
        f"mbt-bench outage: {layout.nodes} nodes x {layout.replicas} replica(s), "
        f"{cfg.workload.streams} clients x {cfg.workload.max_new_tokens} tokens, "
        f"{cfg.workload.duration_s:g} s per run, seed {cfg.seed}"
        f"{', netns' if cfg.netns else ''}; {result.wall_s:.0f} s in all\n"
    )
    print(table(rows))
    if result.sweep:
        print("\nsweep (policy all): nodes killed -> branch steps lost, perplexity, KL")
        for s in result.sweep:
            if s.get("error"):
                print(f"  {s['nodes_killed']}: {s['error']}")
            else:
                print(
                    f"  {s['nodes_killed']}: {s['lost_fraction']:6.1%}  "
                    f"{s['perplexity']:8.2f}  {s['kl']:.4f}"
                )
    for r in result.runs:
        if r.ramp:
            print(f"\nramp of {r.scenario} / {r.policy}: the gateway's expansion, per second")
            print(ramp_table(ramp_windows(r.ramp, r.series)))
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def plotting(wanted: bool | None) -> bool:
    """Whether to draw the plots: ``wanted`` (--plots/--no-plots), or by default whether
    matplotlib is installed. A server install has none (it is the ``bench`` extra): then one
    line says how to get it, and asking for plots is an error (before the run, not after)."""
    if wanted is False:
        return False
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if wanted:
        raise ValueError(f"--plots needs matplotlib: {BENCH_EXTRA}")
    print(f"mbt-bench outage: no plots: matplotlib is not installed ({BENCH_EXTRA})", flush=True)
    return False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.bench == "soak":
            return run_soak_command(args)
        return run_outage_command(args)
    except (MbtError, ValueError, OSError, StartError, TimeoutError) as exc:
        print(f"mbt-bench {args.bench}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # the gateway itself failed (crashed, stopped answering)
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.Call) else exc
        print(f"mbt-bench {args.bench}: error: gateway: {detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mbt-bench {args.bench}: interrupted (cluster stopped, cleaned up)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
