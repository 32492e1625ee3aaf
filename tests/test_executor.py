"""Stage children (``runner/executor.py``): argv and environment, the protocol read from their
stdout, process groups stopped on timeout and cancellation, and the boot-time kill of a group
a dead server left. Real children, running the TEST-ONLY fake stage bodies."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from runner_harness import stage_children, use_fake_stages

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.layout import Workspace, prepare_workspace, read_checkpoint
from colmap_pipeline.presets import default_preset
from colmap_pipeline.runner.executor import (
    PACKAGE_ROOT,
    child_env,
    describe_exit,
    kill_recorded_group,
    pipeline_argv,
    run_json_command,
    run_stage,
)


def test_kill_recorded_group_only_kills_our_child_of_that_workspace(tmp_path):
    ws = tmp_path / "jobs" / "j1" / "work"
    code = "import time; time.sleep(60)"
    ours = subprocess.Popen([sys.executable, "-c", code, "colmap_pipeline", "stage", "frames",
                             "--workspace", str(ws)], start_new_session=True)
    other_ws = subprocess.Popen([sys.executable, "-c", code, "colmap_pipeline", "stage",
                                 "frames", "--workspace", str(tmp_path / "elsewhere")],
                                start_new_session=True)
    try:
        time.sleep(0.2)
        assert kill_recorded_group(other_ws.pid, ws) is False
        assert kill_recorded_group(ours.pid, ws) is True
        assert ours.wait(2) == -signal.SIGKILL
        assert other_ws.poll() is None
        assert kill_recorded_group(ours.pid, ws) is False  # gone: nothing to kill
    finally:
        for p in (ours, other_ws):
            p.kill()
            p.wait()


def test_argv_and_environment_of_a_child():
    assert pipeline_argv("stage", "frames") == [sys.executable, "-m", "colmap_pipeline",
                                                "stage", "frames"]
    env = child_env(nice=7, extra={"X": "1"})
    assert env["COLMAP_WORKER_PARENT_PID"] == str(os.getpid())
    assert env["COLMAP_WORKER_NICE"] == "7" and env["X"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PACKAGE_ROOT)
    assert describe_exit(-signal.SIGABRT) == "signal SIGABRT"
    assert describe_exit(3) == "exit status 3" and describe_exit(-99) == "signal 99"


def _workspace(tmp_path, fault: str = "") -> Workspace:
    ws = Workspace(tmp_path / "work")
    prepare_workspace(ws.root, str(tmp_path / "in.mp4"), default_preset("low"), use_gpu=False,
                      test_fault=fault)
    return ws


async def _run(ws: Workspace, stage: str, deadline_s: float = 30.0, **kw):
    seen: list[tuple[float, str]] = []
    pids: list[int] = []

    async def on_progress(fraction: float, message: str) -> None:
        seen.append((fraction, message))

    loop = asyncio.get_running_loop()
    outcome = await run_stage(stage, ws.root, on_progress=on_progress, nice=0,
                              deadline=loop.time() + deadline_s, on_spawn=pids.append, **kw)
    return outcome, seen, pids


@pytest.mark.asyncio
async def test_a_stage_child_reports_progress_then_done(tmp_path, monkeypatch):
    use_fake_stages(monkeypatch)
    ws = _workspace(tmp_path)
    outcome, seen, pids = await _run(ws, "frames")
    assert outcome.ok and outcome.returncode == 0 and outcome.error is None
    assert outcome.summary == {"fake": True, "stage": "frames"}
    assert seen == [(0.0, "Fake frames started (test only)"),
                    (0.5, "Fake frames half done (test only)"),
                    (1.0, "Fake frames done (test only)")]
    assert outcome.events == 4 and len(pids) == 1
    assert (read_checkpoint(ws.root, "frames") or {}).get("summary") == outcome.summary
    assert outcome.stderr_path == ws.log("frames") and ws.log("frames").exists()


@pytest.mark.asyncio
async def test_a_pipeline_error_arrives_with_its_details(tmp_path, monkeypatch):
    use_fake_stages(monkeypatch)
    outcome, _, _ = await _run(_workspace(tmp_path, "fail:features"), "features")
    assert not outcome.ok and outcome.returncode == 3
    assert outcome.error is not None and outcome.error.code == "pipeline_error"
    assert outcome.error.details == {"test_fault": "fail:features"}
    assert outcome.error.hint


@pytest.mark.asyncio
async def test_a_child_past_its_deadline_is_killed_with_its_group(tmp_path, monkeypatch):
    use_fake_stages(monkeypatch)
    ws = _workspace(tmp_path, "sleep:matching")
    t0 = time.monotonic()
    outcome, _, _ = await _run(ws, "matching", deadline_s=1.0, kill_grace_s=0.5)
    assert outcome.timed_out and not outcome.ok and outcome.returncode < 0
    assert time.monotonic() - t0 < 5
    assert not stage_children(ws.root)


@pytest.mark.asyncio
async def test_cancelling_the_caller_stops_the_child(tmp_path, monkeypatch):
    use_fake_stages(monkeypatch)
    ws = _workspace(tmp_path, "pause:mapping")
    task = asyncio.create_task(_run(ws, "mapping"))
    deadline = time.monotonic() + 20
    while not ws.test_pause_file("mapping").exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    [pid] = stage_children(ws.root)
    assert os.getpgid(pid) == pid  # its own process group
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not stage_children(ws.root)


@pytest.mark.asyncio
async def test_run_json_command_returns_the_document_or_kills_at_the_timeout(tmp_path):
    rc, doc, _ = await run_json_command(["probe", str(tmp_path / "missing.mp4")], timeout_s=60)
    assert rc == 2 and doc is not None and doc["error"]["code"] == "no_video_stream"
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as err:  # a child that never answers
        await run_json_command(["stage", "frames", "--workspace", str(tmp_path / "none")],
                               timeout_s=0.01)
    assert err.value.code == "pipeline_error" and "took longer than" in err.value.message
    assert time.monotonic() - t0 < 5
