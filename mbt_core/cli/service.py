"""The entry point shared by the long-running processes (node, gateway).

The event loop is chosen here, at the entry point only (uvloop); user errors become one line on
stderr and exit code 2, with no traceback. Signals stop the loop cleanly.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import uvloop

from mbt_core.cli.logs import configure_logging, json_logging
from mbt_core.errors import MbtError

if TYPE_CHECKING:
    pass


def run_service(
    prog: str,
    log_level: str,
    main: Callable[[], Coroutine[Any, Any, None]],
    log_format: str = "text",
) -> int:
    """Run ``main()`` on uvloop; ``main`` is a factory so that building it may fail cleanly."""
    configure_logging(log_level, log_format)
    try:
        uvloop.run(main())
    except (MbtError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def settle_heap() -> None:
    """Once a service is up: collect, then hide what is left (modules, the model, the server)
    from the cyclic collector. It lives as long as the process, and the collections that every
    request's garbage triggers then no longer walk it."""
    gc.collect()
    gc.freeze()


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the service then drains and exits 0."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def warn_plaintext(prog: str) -> None:
    """The one warning line a service prints when it starts with ``--insecure``: what it
    gives up (a log record when the process logs JSON)."""
    text = (
        "--insecure: plaintext gRPC. Callers are not authenticated (any host that reaches the "
        "port may call it), node ids are claims, sessions are bound only by secrets sent in "
        "clear, and traffic can be read and changed on the way: use it only on a network you "
        "trust"
    )
    say(prog, text, logging.WARNING)


def say(prog: str, message: str, level: int = logging.INFO) -> None:
    """One line for the operator on stderr, ``PROG: message`` (``PROG: warning: message`` at
    WARNING), or a record of logger ``prog`` when the process logs JSON: every line parses."""
    if json_logging():
        logging.getLogger(prog).log(level, "%s", message)
    else:
        kind = "warning: " if level == logging.WARNING else ""
        print(f"{prog}: {kind}{message}", file=sys.stderr, flush=True)
