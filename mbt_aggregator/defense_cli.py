"""The gateway's command-line flags for its output defenses (``mbt_aggregator.defense``)."""

from __future__ import annotations

import argparse

from mbt_aggregator.defense import AUDIT, MEDIAN, OFF, REPLICA_CHECKS, DefenseConfig
from mbt_aggregator.registry import QuarantinePolicy

_DESCRIPTION = """\
Checks on every branch output before it is fused. The cheap ones are on by default; the
replica median costs calls, so it is opt-in. A flipped sign or a random direction with the
right norm passes any norm bound: only a replica check sees those."""


def add_defense_arguments(p: argparse.ArgumentParser) -> None:
    d, q = DefenseConfig(), QuarantinePolicy()
    g = p.add_argument_group("defenses against broken or hostile branches", _DESCRIPTION)
    g.add_argument(
        "--output-bounds",
        action=argparse.BooleanOptionalAction,
        default=d.bounds,
        help="enforce the signed manifest's calibrated per-branch output-norm bounds: reject "
        "rows beyond --reject-factor x the bound, clip rows above it (NaN/Inf rows are always "
        "rejected; branches without a bound get the --norm-factor check)",
    )
    g.add_argument(
        "--reject-factor",
        type=float,
        default=d.reject_factor,
        metavar="K",
        help="reject, rather than clip, rows whose norm exceeds K x the bound (%(default)s)",
    )
    g.add_argument(
        "--replica-check",
        choices=REPLICA_CHECKS,
        default=d.replica_check,
        help=f"{OFF}: trust the replica asked; {AUDIT}: send a share of steps (--audit-rate) "
        "to two replicas and compare them; disagreeing rows are masked and both nodes counted "
        f"(mbt_replica_disagreements_total); {MEDIAN}: with 3 or more live replicas, ask 3 "
        "every step and take the coordinate-wise median (outvotes one bad replica; triples "
        "that branch's compute), audit with 2 (default: %(default)s)",
    )
    g.add_argument(
        "--audit-rate",
        type=float,
        default=d.audit_rate,
        help="share of a replicated branch's steps also sent to a second replica "
        "(%(default)s); an audit replays the session to that replica first",
    )
    g.add_argument(
        "--audit-seed",
        type=int,
        default=None,
        help="seed of the audit draws, for reproducible runs (default: unpredictable)",
    )
    g.add_argument(
        "--replica-rtol",
        type=float,
        default=d.replica_rtol,
        help="replicas agree when a row differs by at most this relative L2 distance "
        "(%(default)s; float32 replicas match exactly, bfloat16 ones within ~4e-3)",
    )
    g.add_argument(
        "--replica-wait-ms",
        type=float,
        default=d.replica_wait_ms,
        help="once one replica of an audit or vote answered, how long to wait for the others "
        "(%(default)s)",
    )
    g.add_argument(
        "--alert-steps",
        type=int,
        default=d.alert_steps,
        help="after two replicas of a branch disagreed (in an audit, or a hedge checked "
        "against its late primary), audit every one of that branch's next N steps "
        "(%(default)s; 0: no alert)",
    )
    g.add_argument(
        "--quarantine-strikes",
        type=int,
        default=q.strikes,
        metavar="N",
        help="quarantine a node (no traffic) after N rejected answers within "
        "--quarantine-window-s (0: never; default %(default)s)",
    )
    g.add_argument("--quarantine-window-s", type=float, default=q.window_s)
    g.add_argument(
        "--quarantine-s",
        type=float,
        default=q.period_s,
        help="length of a first quarantine; a node rejected again on probation goes back for "
        "twice as long (%(default)s)",
    )
    g.add_argument(
        "--probation-s",
        type=float,
        default=q.probation_s,
        help="after a quarantine, one rejected answer within this sends the node back "
        "(%(default)s)",
    )


def defense_from_args(args: argparse.Namespace) -> DefenseConfig:
    return DefenseConfig(
        bounds=args.output_bounds,
        reject_factor=args.reject_factor,
        replica_check=args.replica_check,
        audit_rate=args.audit_rate,
        audit_seed=args.audit_seed,
        replica_rtol=args.replica_rtol,
        replica_wait_ms=args.replica_wait_ms,
        alert_steps=args.alert_steps,
        quarantine=QuarantinePolicy(
            strikes=args.quarantine_strikes,
            window_s=args.quarantine_window_s,
            period_s=args.quarantine_s,
            probation_s=args.probation_s,
        ),
    )
