"""The entry point shared by the long-running processes (node, gateway).

The event loop is chosen here, at the entry point only (uvloop); user errors become one line on
stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from mbt_core.errors import MbtError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def run_service(prog: str, log_level: str, main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run ``main()`` on uvloop; ``main`` is a factory so that building it may fail cleanly."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        uvloop.run(main())
    except (MbtError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def add_artifact_arguments(p: argparse.ArgumentParser) -> None:
    """The signed model a service runs: folder, trusted keys, threshold, rollback state."""
    p.add_argument("--artifacts", type=Path, required=True, help="artifact folder (mbt export)")
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        required=True,
        help="public key trusted to sign the manifest; repeat for several",
    )
    p.add_argument("--threshold", type=int, default=1, help="trusted signatures required")
    p.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="rollback-protection state (default: $MBT_STATE_DIR or ~/.local/state/mbt)",
    )


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the service then drains and exits 0."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
