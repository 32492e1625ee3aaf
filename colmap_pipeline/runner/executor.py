"""Child processes for pipeline work: argv only (never a shell), own process group, lower CPU
priority, and death with the server (``PR_SET_PDEATHSIG``, set by the child itself in
:mod:`colmap_pipeline.core.child`).

The API process uses this module to run ``python -m colmap_pipeline …``; it never imports
pycolmap itself. A child that pycolmap aborts (SIGABRT) fails one stage of one job.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from ..layout import Workspace
from ..protocol import EXIT_OK, DoneEvent, ErrorEvent, ProgressEvent, parse_event

ProgressCallback = Callable[[float, str], Awaitable[None]]

#: folder holding the ``colmap_pipeline`` package
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: seconds between SIGTERM and SIGKILL when stopping a child's process group
KILL_GRACE_S = 3.0


def child_env(*, nice: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a pipeline child: the parent's, plus what :mod:`.child` reads."""
    env = dict(os.environ)
    env["COLMAP_WORKER_PARENT_PID"] = str(os.getpid())
    env["COLMAP_WORKER_NICE"] = str(nice)
    env["PYTHONUNBUFFERED"] = "1"
    # the child must import this very package, whatever the server's working directory
    root = str(PACKAGE_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    if extra:
        env.update(extra)
    return env


def pipeline_argv(*args: str) -> list[str]:
    """``[sys.executable, "-m", "colmap_pipeline", *args]``."""
    return [sys.executable, "-m", "colmap_pipeline", *args]


def kill_process_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to process group ``pgid``; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_members(pgid: int) -> list[tuple[int, list[str]]]:
    """``[(pid, argv)]`` of live processes in process group ``pgid`` (Linux ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            # fields[0] = state (field 3), fields[2] = pgrp (field 5); see proc(5)
            if int(fields[2]) != pgid or fields[0] in ("Z", "X"):
                continue
            argv = [a.decode(errors="replace")
                    for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(entry.name), argv))
    return out


def kill_recorded_group(pgid: int, workspace: Path, wait_s: float = 5.0) -> bool:
    """SIGKILL process group ``pgid`` if it is still a pipeline child of ``workspace``.

    Used at boot on the groups a previous server recorded: a pid can be reused after a crash,
    so the group is killed only when one of its members is a ``colmap_pipeline`` process whose
    argv names ``workspace``. Blocks (call it in a thread) until the group is gone or
    ``wait_s`` passes.

    Returns: True when a matching group was found and killed.
    """
    if not Path("/proc/self/stat").exists():  # not Linux: rely on PR_SET_PDEATHSIG only
        return False
    ws = str(workspace)
    members = _group_members(pgid)
    if not any("colmap_pipeline" in argv and any(ws in a for a in argv)
               for _, argv in members):
        return False
    kill_process_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


async def _stop(proc: asyncio.subprocess.Process, grace_s: float | None = None) -> None:
    """SIGTERM the child's group, then SIGKILL it after ``grace_s`` (default
    :data:`KILL_GRACE_S`; 0 = SIGKILL at once)."""
    if proc.returncode is not None:
        kill_process_group(proc.pid)  # stragglers of an exited leader
        return
    grace = KILL_GRACE_S if grace_s is None else grace_s
    if grace <= 0:
        kill_process_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        return
    kill_process_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        pass
    kill_process_group(proc.pid, signal.SIGKILL)
    await proc.wait()


async def run_json_command(args: list[str], *, timeout_s: float, nice: int = 0,
                           cwd: Path | None = None) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``python -m colmap_pipeline ARGS`` that prints one JSON object on stdout.

    Returns ``(returncode, the parsed object or None, last 2000 characters of stderr)``.
    Raises: PipelineError("pipeline_error") when it runs past ``timeout_s`` (it is killed).
    """
    proc = await asyncio.create_subprocess_exec(
        *pipeline_argv(*args), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env(nice=nice), cwd=cwd,
        start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        await _stop(proc)
        raise PipelineError("pipeline_error",
                            f"'{args[0]}' took longer than {timeout_s:.0f} s") from None
    except asyncio.CancelledError:
        await _stop(proc)
        raise
    try:
        doc = json.loads(out.decode() or "null")
    except ValueError:
        doc = None
    rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    return rc, doc if isinstance(doc, dict) else None, err.decode(errors="replace")[-2000:]


@dataclass
class StageOutcome:
    """How one stage child ended.

    Attributes:
        returncode: the child's exit status (:data:`~..protocol.EXIT_OK` ...); negative =
            killed by that signal number.
        summary: the stage summary from its ``done`` event, when it sent one.
        error: its ``error`` event (catalog code, message, hint, details), if it sent one.
        timed_out: the deadline passed and the group was killed.
        stderr_path: the child's log (``WS/logs/STAGE.log``).
        events: protocol lines read from its stdout.
    """

    returncode: int
    summary: dict[str, Any] | None = None
    error: ErrorEvent | None = None
    timed_out: bool = False
    stderr_path: Path | None = None
    events: int = field(default=0)

    @property
    def ok(self) -> bool:
        """True when the child exited 0 after a ``done`` event."""
        return self.returncode == EXIT_OK and self.summary is not None and not self.timed_out


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if value is not None and inspect.isawaitable(value):
        await value


async def _follow_events(proc: asyncio.subprocess.Process, outcome: StageOutcome,
                         on_progress: ProgressCallback, deadline: float) -> None:
    """Read the child's protocol lines until its stdout closes, filling ``outcome`` and relaying
    each progress event unchanged. Raises TimeoutError at ``deadline`` (``loop.time()``)."""
    loop = asyncio.get_running_loop()
    assert proc.stdout is not None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        line = await asyncio.wait_for(proc.stdout.readline(), remaining)
        if not line:
            return
        event = parse_event(line)
        if event is None:
            continue
        outcome.events += 1
        if isinstance(event, ProgressEvent):
            await on_progress(event.fraction, event.message)
        elif isinstance(event, DoneEvent):
            outcome.summary = event.summary
        else:
            outcome.error = event


async def run_stage(stage: str, workspace: Path, *, on_progress: ProgressCallback,
                    deadline: float, nice: int, env_extra: dict[str, str] | None = None,
                    on_spawn: Callable[[int], Awaitable[None] | None] | None = None,
                    kill_grace_s: float | None = None) -> StageOutcome:
    """Run ``python -m colmap_pipeline stage STAGE --workspace WS`` and follow its events.

    The child prints one JSON object per line on stdout (the protocol of
    :mod:`colmap_pipeline.protocol`: progress / done / error); its stderr goes to
    ``WS/logs/STAGE.log``.

    Args:
        deadline: ``loop.time()`` after which the child's group is killed (job timeout).
        on_progress: awaited with ``(fraction 0-1, message)`` for each progress event, as the
            child sent them.
        on_spawn: called (and awaited, if it returns an awaitable) with the child's pid (= its
            process group id) right after start.
        kill_grace_s: seconds between SIGTERM and SIGKILL when the child must be stopped
            (default :data:`KILL_GRACE_S`).
    Raises: asyncio.CancelledError after stopping the child's group, when the caller is
        cancelled (operator cancel, shutdown).
    """
    ws = Workspace(workspace)
    await asyncio.to_thread(ws.logs_dir.mkdir, parents=True, exist_ok=True)
    log_path = ws.log(stage)
    log = await asyncio.to_thread(open, log_path, "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *pipeline_argv("stage", stage, "--workspace", str(workspace)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
            env=child_env(nice=nice, extra=env_extra), start_new_session=True)
    finally:
        await asyncio.to_thread(log.close)  # the child holds its own copy
    outcome = StageOutcome(returncode=EXIT_OK, stderr_path=log_path)
    try:
        if on_spawn:
            await _maybe_await(on_spawn(proc.pid))
        await _follow_events(proc, outcome, on_progress, deadline)
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        outcome.returncode = await asyncio.wait_for(proc.wait(), remaining)
    except TimeoutError:
        outcome.timed_out = True
        await _stop(proc, kill_grace_s)
        outcome.returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    except BaseException:
        await _stop(proc, kill_grace_s)
        raise
    finally:
        if proc.returncode is not None:
            kill_process_group(proc.pid)  # grandchildren, if any
    return outcome


def describe_exit(returncode: int) -> str:
    """``'exit status 3'`` or ``'signal SIGABRT'`` for a child's return code."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"
