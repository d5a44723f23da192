"""Start ``mbt-node`` as a separate process and learn its address (tests, benchmarks, demos).

The node prints one ``mbt-node ready: listening on HOST:PORT, ...`` line once it serves; the
launcher waits for that line (never a fixed sleep) and always cleans the process up.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

READY = re.compile(r"mbt-node ready: listening on (\S+):(\d+), .*node id (\S+),")


class NodeStartError(RuntimeError):
    """The node exited or stayed silent instead of becoming ready."""


@dataclass
class NodeProcess:
    proc: subprocess.Popen[str]
    address: str
    node_id: str
    ready_line: str
    output: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def __post_init__(self) -> None:
        # Keep reading so a chatty node never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (drain), then SIGKILL if it does not exit in time; returns the exit code."""
        self.signal(signal.SIGCONT)  # a paused node cannot drain
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def all_output(self) -> str:
        """Everything the process printed so far (complete once it exited)."""
        if self.proc.poll() is not None and self._reader is not None:
            self._reader.join(timeout=5)
        return "".join(self.output)


def start_node(
    args: Sequence[str], timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> NodeProcess:
    """Run ``mbt-node ARGS`` (stdout and stderr merged) and wait for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mbt_node.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            chunk = os.read(fd, 65536).decode(errors="replace")  # unbuffered: no line is held back
            if not chunk:  # the process exited
                proc.wait()
                raise NodeStartError(f"mbt-node exited with code {proc.returncode}: {seen.strip()}")
            seen += chunk
            match = READY.search(seen)
            if match and "\n" in seen[match.start() :]:  # the whole ready line is in
                host, port, node_id = match.groups()
                line = seen[match.start() : seen.index("\n", match.start())]
                return NodeProcess(proc, f"{host}:{port}", node_id, line, [seen])
        raise NodeStartError(f"mbt-node not ready after {timeout_s} s: {seen.strip()}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        sel.close()
