"""The entry point shared by the long-running processes (node, gateway).

The event loop is chosen here, at the entry point only (uvloop); user errors become one line on
stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Coroutine
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
