"""The lock that keeps training runs one at a time: an flock on `locks_dir/train.lock`.

The OS drops an flock when its holder dies, however it dies (SIGKILL included), so a killed run
never leaves a stale lock behind: the file stays, the lock does not. The file names the holder
(pid, start time) for the "already running" message; that text is informational only.
It is separate from the registry's short lock, so a rollback never waits for a run.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["LOCK_NAME", "AlreadyRunning", "training_lock", "training_running"]

LOCK_NAME = "train.lock"


class AlreadyRunning(RuntimeError):
    """Another training run holds the lock."""


@contextmanager
def training_lock(locks_dir: Path) -> Iterator[Path]:
    """Hold the training lock for the block; raise AlreadyRunning at once if another run holds it."""
    locks_dir = Path(locks_dir)
    locks_dir.mkdir(parents=True, exist_ok=True)
    path = locks_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise AlreadyRunning(f"a training run is already running ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # still holding the lock: nobody reads a half-cleared name
    finally:
        os.close(fd)  # closing releases the flock


def training_running(locks_dir: Path) -> bool:
    """Whether a training run holds the lock now (for status displays; takes and drops it if free)."""
    path = Path(locks_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
