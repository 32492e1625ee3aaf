"""Exclusive lock on a job workspace, held by the process that writes it (a stage child).

``fcntl.flock`` on ``WS/.lock``: the kernel releases it when the holder dies, however it dies
(SIGKILL included), so a crashed child never leaves a stale lock, and two processes (say a
child that outlived a crashed server and the child of the restarted one) can never write the
same workspace at once. Linux/macOS only (``fcntl``); elsewhere the lock is a no-op.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import PipelineError
from ..layout import Workspace

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # no flock on Windows: the lock is skipped

#: seconds a stage child waits for the lock before failing with ``workspace_busy``; long enough
#: for a killed predecessor to be reaped, short enough to surface a real conflict
DEFAULT_WAIT_S = 30.0


def lock_path(workspace: str | os.PathLike) -> Path:
    """``WS/.lock``."""
    return Workspace(workspace).lock_file


def is_locked(workspace: str | os.PathLike) -> bool:
    """True when some process holds the workspace lock now (probe: try and release)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock_path(workspace), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def workspace_lock(workspace: str | os.PathLike, wait_s: float = DEFAULT_WAIT_S) -> Iterator[None]:
    """Hold the exclusive lock on ``workspace`` for the ``with`` block.

    Args:
        workspace: the job workspace (created if missing).
        wait_s: how long to retry (every 0.1 s) while another process holds it.
    Raises:
        PipelineError("workspace_busy"): still held by another process after ``wait_s``.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    Path(workspace).mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(workspace), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PipelineError("workspace_busy", details={
                        "workspace": str(workspace), "waited_s": wait_s}) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # for humans: who holds it
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
