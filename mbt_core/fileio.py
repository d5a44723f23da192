"""Files that must never be half-written, read too large, or updated by two writers at once.

Writes go to a temporary file that is fsynced and renamed (or linked) into place. Reads of
untrusted documents are capped before parsing, and JSON is parsed strictly: the only error
is a ``ValueError``, whatever the bytes. State files are updated under an ``fcntl.flock``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO planted as a document must not hang


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    atomic_write_stream(path, lambda fh: fh.write(data), mode)


def atomic_write_stream(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], mode: int = 0o644
) -> None:
    """Like :func:`atomic_write_bytes`, with ``write(file)`` producing the contents: a file
    of gigabytes need not be built in memory first."""
    target = Path(path)
    tmp = _write_temp(target, write, mode)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def create_new_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Like :func:`atomic_write_bytes`, but raise ``FileExistsError`` instead of replacing.

    The file is complete and has ``mode`` from the moment it appears (hard-linked into place,
    which fails when the name exists): for private keys, which are never overwritten.
    """
    target = Path(path)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target}: already exists")
    tmp = _write_temp(target, lambda fh: fh.write(data), mode)
    try:
        os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def read_capped(path: str | os.PathLike[str], limit: int) -> bytes:
    """Read a small regular file whole, refusing one larger than ``limit`` bytes.

    Raises ``OSError`` when it cannot be read and ``ValueError`` when it is too large or not a
    regular file (a FIFO or device would block or never end).
    """
    fd = os.open(path, os.O_RDONLY | _NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def parse_json(raw: bytes) -> Any:
    """Strict JSON from untrusted bytes: UTF-8, finite numbers only, bounded nesting.

    Every malformed input raises ``ValueError`` (a deeply nested document would otherwise
    raise ``RecursionError``, and ``1e400`` would become an infinite float).
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.NAME.lock`` beside ``path`` (blocks until free).

    Read-check-write cycles on a state file run inside, so two processes sharing a state
    folder cannot lose each other's updates. The lock file is never removed: unlinking it
    would let a third process lock a new file while the second still holds the old one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_temp(target: Path, write: Callable[[BinaryIO], object], mode: int) -> Path:
    """A fsynced temporary file beside ``target``, filled by ``write``, with ``mode``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp creates 0600: never readable by others
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
