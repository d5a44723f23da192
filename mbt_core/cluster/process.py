"""Start a runtime process (node, aggregator) and learn its address: tests, benchmarks, demos.

Each server prints one ``... ready: listening on HOST:PORT, ...`` line once it serves; the
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
from pathlib import Path

READY = re.compile(r"(\S+) ready: listening on (\S+):(\d+),")


class StartError(RuntimeError):
    """The process exited or stayed silent instead of becoming ready."""


@dataclass
class ManagedProcess:
    proc: subprocess.Popen[str]
    address: str
    ready_line: str
    output: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def __post_init__(self) -> None:
        # Keep reading so a chatty node never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stdout or ():
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


def start_process(
    module: str, args: Sequence[str], timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> ManagedProcess:
    """Run ``python -m MODULE ARGS`` (stdout and stderr merged) and wait for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.stdout is None:
        raise RuntimeError("no pipe to the process")
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
                raise StartError(f"{module} exited with code {proc.returncode}: {seen.strip()}")
            seen += chunk
            match = READY.search(seen)
            if match and "\n" in seen[match.start() :]:  # the whole ready line is in
                _, host, port = match.groups()
                line = seen[match.start() : seen.index("\n", match.start())]
                return ManagedProcess(proc, f"{host}:{port}", line, [seen])
        raise StartError(f"{module} not ready after {timeout_s} s: {seen.strip()}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        sel.close()


def memory_mib(pid: int, peak: bool = False) -> float:
    """Resident memory of ``pid`` in MiB, now (VmRSS) or its peak so far (VmHWM); NaN once
    the process is gone."""
    field = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
