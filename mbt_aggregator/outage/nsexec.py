"""Start a module inside a network namespace, keeping the pid (the ``--netns`` node launcher).

``python -m mbt_aggregator.outage.nsexec NAMESPACE MODULE ARGS...`` execs
``ip netns exec NAMESPACE python -m MODULE ARGS...``; ``ip netns exec`` enters the namespace
and execs again without forking, so the process the bench started becomes the node itself.
Kept apart from :mod:`netns` so that it imports nothing heavy before the exec.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def exec_in_namespace(argv: Sequence[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m mbt_aggregator.outage.nsexec NAMESPACE MODULE [ARGS]")
    namespace, module, *args = argv
    os.execvp("ip", ["ip", "netns", "exec", namespace, sys.executable, "-m", module, *args])


if __name__ == "__main__":
    exec_in_namespace(sys.argv[1:])
