"""Set-up a pipeline child process does for itself at start (Linux).

The parent (the API process) passes ``COLMAP_WORKER_PARENT_PID`` and ``COLMAP_WORKER_NICE`` in
the environment (see :func:`colmap_pipeline.executor.child_env`). Doing this in the child
avoids ``preexec_fn``, which is unsafe in a parent that runs threads.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def harden_child() -> None:
    """Ask the kernel for SIGKILL when the parent dies, lower our CPU priority.

    No-op when not started by the server (the variables are absent), e.g. the CLI.
    Exits at once (status 1) if the parent is already gone.
    """
    parent = os.environ.get("COLMAP_WORKER_PARENT_PID")
    if not parent:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass
    if os.getppid() != int(parent):  # parent died before prctl took effect
        os._exit(1)
    nice = int(os.environ.get("COLMAP_WORKER_NICE", "0") or 0)
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass
