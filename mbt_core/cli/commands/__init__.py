"""Subcommands of ``mbt``: each module has ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

from types import ModuleType

from mbt_core.cli.commands import (
    certs,
    cluster,
    diagnose,
    evaluate,
    expand,
    export,
    finetune,
    generate,
    import_hf,
    keys,
    roster,
    sign,
    status,
    train,
    trust,
    verify,
)

COMMANDS: dict[str, ModuleType] = {
    "cluster": cluster,
    "train": train,
    "finetune": finetune,
    "expand": expand,
    "generate": generate,
    "eval": evaluate,
    "diagnostics": diagnose,
    "import": import_hf,
    "export": export,
    "keys": keys,
    "sign": sign,
    "verify": verify,
    "trust": trust,
    "roster": roster,
    "certs": certs,
    "status": status,
}
