"""The scheduler (``runner/scheduler.py``) in this process, on the in-memory store, with REAL
stage children running the TEST-ONLY fake stage bodies (``COLMAP_TEST_FAKE_STAGES``): process
groups, the workspace lock, checkpoints, the test-fault hook and the child protocol are the
real ones; only pycolmap's work is left out, so each job takes about a second.

Resume, cancel, retry, drain, timeouts, outside kills and crashes keep the assertions of the
former real-server tests (issue 5), except the comparison with an undisturbed reconstruction,
which ``tests/test_lifecycle.py`` keeps for one real resume.

A "server crash" is simulated by making the store unavailable before stopping the runner: the
runner's bookkeeping then fails as it would in a dead process, the row stays ``processing``
with its child's process group recorded, and a new runner on the same store recovers it.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from runner_harness import (
    RecordingStore,
    ScriptedStages,
    add_job,
    checkpoint_mtimes,
    get,
    runner_settings,
    stage_children,
    started,
    status_is,
    still_alive,
    until,
    use_fake_stages,
    wait_done,
    workspace,
)

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.jobs import Intent
from colmap_pipeline.protocol import STAGE_NAMES, STAGES
from colmap_pipeline.runner import scheduler
from colmap_pipeline.runner.scheduler import JobRunner, manual_retries

pytestmark = pytest.mark.asyncio


@pytest.fixture
def fake_stages(monkeypatch):
    use_fake_stages(monkeypatch)


def outcomes(job) -> list[tuple]:
    return [(a["attempt"], a["outcome"], a["failed_stage"]) for a in job.attempts]


def sleeper(*argv: str) -> subprocess.Popen:
    """A process sleeping 120 s in its own group, with ``argv`` after its code."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv],
                            start_new_session=True)


async def crash(runner: JobRunner, store) -> None:
    """Stop ``runner`` as a SIGKILLed server would end: no bookkeeping reaches the store."""
    store.unavailable = True
    try:
        await runner.stop()
    finally:
        store.unavailable = False


# --- a job, and the progress it reports ---------------------------------------------------

async def test_job_runs_every_stage_in_a_child_and_relays_progress(tmp_path, fake_stages):
    store, settings = RecordingStore(), runner_settings(tmp_path)
    await add_job(store, settings)
    async with started(store, settings):
        job = await wait_done(store)
    assert job.status == "completed" and job.progress == 100, job.error_message
    assert job.current_stage == "Completed" and job.finished_at
    assert job.results is not None and job.results["registered_images"] == 3
    assert job.results["fake"] is True and job.results["job_wall_time_s"] > 0
    assert job.message == "Registered 3 of 3 frames; 0 3D points"
    [rec] = job.attempts
    assert rec["outcome"] == "completed" and rec["resumed_from"] == "frames"
    assert rec["skipped_stages"] == [] and list(rec["stage_wall_s"]) == list(STAGES)
    assert sorted(checkpoint_mtimes(workspace(settings).root)) == sorted(STAGES)
    assert job.pgid is None
    # the child's messages reach the row unchanged; the bar never moves back
    messages = [m for *_, m in store.progress_log]
    for stage in STAGES:
        assert f"Fake {stage} half done (test only)" in messages
    bar = [p for _, p, _, _ in store.progress_log]
    assert bar == sorted(bar) and bar[-1] == 100
    named = [s for _, _, s, _ in store.progress_log]
    assert [s for i, s in enumerate(named) if i == 0 or named[i - 1] != s] == [
        STAGE_NAMES[s] for s in STAGES]


async def test_one_job_at_a_time_and_gpu_slots_are_bounded(tmp_path):
    """MAX_CONCURRENT_JOBS=2 with MAX_GPU_JOBS=1: two jobs run together, but never two GPU
    stages at once; a third waits for a worker."""
    store = RecordingStore()
    settings = runner_settings(tmp_path, max_concurrent_jobs=2, max_gpu_jobs=1)
    in_gpu: list[int] = []
    runner_ref: list[JobRunner] = []

    async def on_run(stage: str) -> None:
        in_gpu.append(runner_ref[0].active_gpu_jobs)
        await asyncio.sleep(0.05)

    stages = ScriptedStages(settings, on_run=on_run)
    for i in range(3):
        await add_job(store, settings, f"job-{i}")
    runner = JobRunner(store, settings, gpu_enabled=True, stage_runner=stages)
    runner_ref.append(runner)
    await runner.start()
    try:
        await until(lambda: runner.active_jobs == 2, 5, "two jobs running")
        assert (await get(store, "job-2")).status == "pending"
        assert await store.queue_position("job-2") == 1
        for i in range(3):
            assert (await wait_done(store, f"job-{i}")).status == "completed"
    finally:
        await runner.stop()
    assert max(in_gpu) == 1 and runner.active_gpu_jobs == 0
    assert stages.calls.count("features") == 3


# --- resume after a crash at every stage ---------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
async def test_crash_at_stage_then_resume(tmp_path, fake_stages, stage):
    store = RecordingStore()
    paused = runner_settings(tmp_path, test_fault=f"pause:{stage}")
    await add_job(store, paused)
    ws = workspace(paused)
    runner = JobRunner(store, paused, gpu_enabled=False)
    await runner.start()
    await until(lambda: ws.test_pause_file(stage).exists(), 20, f"pause at {stage}")
    done_before = list(STAGES[:STAGES.index(stage)])
    mtimes = checkpoint_mtimes(ws.root)
    assert sorted(mtimes) == sorted(done_before)
    children = stage_children(ws.root)
    assert len(children) == 1
    async def recorded() -> Any:  # the parent records the group just after the spawn
        job = await get(store, "job-1")
        return job if job.pgid is not None else None

    job = await until(recorded, 10, "the child's process group to be recorded")
    assert job.status == "processing" and job.pgid == next(iter(children))
    await crash(runner, store)
    assert (await get(store, "job-1")).status == "processing"  # as a dead server left it

    async with started(store, runner_settings(tmp_path)):  # no test fault: runs normally
        assert still_alive(children) == [], "a stage child from before the crash is alive"
        job = await wait_done(store)
    assert job.status == "completed", job.error_message
    after = checkpoint_mtimes(ws.root)
    assert {s: after[s] for s in done_before} == mtimes, "a finished stage ran again"
    assert sorted(after) == sorted(STAGES)
    # the crashed attempt left no record (its server died); the resumed one ran only the rest
    [attempt] = job.attempts
    assert attempt["outcome"] == "completed"
    assert attempt["resumed_from"] == stage and attempt["skipped_stages"] == done_before
    assert list(attempt["stage_wall_s"]) == list(STAGES[STAGES.index(stage):])
    assert job.attempt == 2
    assert (await store.count_by_status()).get("processing") is None


async def test_boot_kills_a_recorded_child_group_that_outlived_its_server(tmp_path,
                                                                          fake_stages):
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="pause:frames")
    await add_job(store, settings)
    await add_job(store, settings, "other")
    ws = workspace(settings)
    # job-1 was processing under a dead server whose child did not get PR_SET_PDEATHSIG: a
    # stand-in with the same argv shape in its own group; "other" names a pid that is not ours
    ghost = sleeper("colmap_pipeline", "stage", "frames", "--workspace", str(ws.root))
    bystander = sleeper()
    try:
        assert getattr(await store.claim_next_pending(), "job_id", None) == "job-1"
        await store.set_pgid("job-1", ghost.pid)
        assert getattr(await store.claim_next_pending(), "job_id", None) == "other"
        await store.set_pgid("other", bystander.pid)
        assert await store.apply("other", Intent.FAIL, error_code="pipeline_error")
        async with started(store, settings) as runner:
            assert ghost.wait(5) == -signal.SIGKILL
            assert bystander.poll() is None, "a pid that is not our child was killed"
            assert (await get(store, "other")).pgid is None
            # the job resumed (and paused again at frames); delete it to end quickly
            await until(lambda: ws.test_pause_file("frames").exists(), 20, "resume")
            assert (await get(store, "job-1")).status == "processing"
            assert await runner.delete("job-1")
            assert (await get(store, "job-1")).status == "deleted"
            assert not await runner.delete("job-1")
        assert not ws.root.parent.exists()
    finally:
        for p in (ghost, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


# --- cancel, retry, automatic retries -------------------------------------------------------

async def test_cancel_during_matching_then_retry_completes(tmp_path, fake_stages):
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="pause:matching")
    await add_job(store, settings)
    ws = workspace(settings)
    flag = ws.test_pause_file("matching")
    async with started(store, settings) as runner:
        await until(flag.exists, 20, "pause at matching")
        children = stage_children(ws.root)
        assert len(children) == 1
        mtimes = checkpoint_mtimes(ws.root)
        t0 = time.monotonic()
        assert await runner.cancel("job-1")
        # gone within 5 s (a killed child may take a moment to be reaped on a loaded machine)
        await until(lambda: still_alive(children) == [] and not stage_children(ws.root), 5,
                    "the cancelled stage child to be gone")
        assert time.monotonic() - t0 < 5
        job = await get(store, "job-1")
        assert job.status == "cancelled" and job.finished_at
        assert runner.active_jobs == 0 and runner.active_gpu_jobs == 0
        assert ws.root.exists(), "the workspace stays for a retry"
        assert not await runner.cancel("job-1")

        flag.unlink()
        assert await runner.retry("job-1")
        assert (await get(store, "job-1")).status in ("pending", "processing")
        await until(flag.exists, 20, "the retry to reach matching")  # resumed at matching
        flag.unlink()
        job = await wait_done(store)
        assert job.status == "completed", job.error_message
        after = checkpoint_mtimes(ws.root)
        assert {s: after[s] for s in mtimes} == mtimes  # frames, features not redone
        assert outcomes(job) == [(1, "cancelled", "matching"), (2, "completed", None)]
        assert job.attempts[1]["skipped_stages"] == ["frames", "features"]
        assert not await runner.retry("job-1")


async def test_retry_of_a_running_job_answers_at_once(tmp_path, fake_stages):
    """Issue 10 item 5: the retry of a processing job waited 10 s for its task before 409."""
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="pause:frames")
    await add_job(store, settings)
    async with started(store, settings) as runner:
        await until(workspace(settings).test_pause_file("frames").exists, 20, "pause")
        t0 = time.monotonic()
        assert await runner.retry("job-1") is False
        assert time.monotonic() - t0 < 1.0
        assert await runner.retry("no-such-job") is False
        assert (await get(store, "job-1")).status == "processing"


async def test_manual_retries_are_capped(tmp_path, fake_stages):
    """Issue 10 item 11: MAX_MANUAL_RETRIES retries, then 409 retry_limit_reached."""
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="fail:frames", max_manual_retries=2)
    await add_job(store, settings)
    async with started(store, settings) as runner:
        for n in range(2):
            assert (await wait_done(store)).status == "failed"
            assert manual_retries(await get(store, "job-1")) == n
            assert await runner.retry("job-1")
        job = await wait_done(store)
        assert job.status == "failed" and job.attempt == 3 and len(job.attempts) == 3
        with pytest.raises(PipelineError) as err:
            await runner.retry("job-1")
    assert err.value.code == "retry_limit_reached" and err.value.http_status == 409
    assert err.value.details == {"manual_retries": 2, "max_manual_retries": 2, "attempt": 3,
                                 "auto_retries": 0}
    assert (await get(store, "job-1")).status == "failed"


async def test_outside_sigkill_of_child_is_retried_once(tmp_path, fake_stages):
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="pause:frames")
    await add_job(store, settings)
    ws = workspace(settings)
    flag = ws.test_pause_file("frames")

    async def kill_paused_child() -> None:
        await until(flag.exists, 20, "pause at frames")
        [pid] = stage_children(ws.root)
        os.kill(pid, signal.SIGKILL)
        flag.unlink()  # the next child must create it again

    async with started(store, settings) as runner:
        await kill_paused_child()  # 1st outside kill: retried in place
        await kill_paused_child()  # 2nd: not retried again
        job = await wait_done(store)
        assert job.status == "failed" and job.error_code == "pipeline_crashed"
        assert "SIGKILL" in str(job.error_message)
        assert [(a["attempt"], a["outcome"], a.get("retry")) for a in job.attempts] == [
            (1, "retrying", "outside_signal"), (2, "failed", None)]
        assert job.auto_retries == 1

        assert await runner.retry("job-1")  # an operator retry then completes
        await until(flag.exists, 20, "pause at frames after the retry")
        flag.unlink()
        job = await wait_done(store)
    assert job.status == "completed", job.error_message
    assert [a["outcome"] for a in job.attempts] == ["retrying", "failed", "completed"]
    assert job.attempt == 3


async def test_sigabrt_in_child_fails_as_pipeline_crashed_without_retry(tmp_path, fake_stages):
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="abort:features")
    await add_job(store, settings)
    async with started(store, settings):
        job = await wait_done(store)
    assert job.status == "failed" and job.error_code == "pipeline_crashed"
    assert "SIGABRT" in str(job.error_message) and "Feature Detection" in str(job.error_message)
    assert job.current_stage == "Feature Detection" and job.attempt == 1
    assert [(a["outcome"], a["failed_stage"], a["error_code"]) for a in job.attempts] == [
        ("failed", "features", "pipeline_crashed")]


async def test_pipeline_error_and_timeout_are_never_retried(tmp_path, fake_stages):
    """A stage's PipelineError (with its details, issue 10 item 6) and JOB_TIMEOUT_S each fail
    the job at the first attempt."""
    store = RecordingStore()
    bad = runner_settings(tmp_path, test_fault="fail:frames")
    await add_job(store, bad)
    async with started(store, bad):
        job = await wait_done(store)
    assert job.status == "failed" and job.error_code == "pipeline_error"
    assert job.error_details == {"test_fault": "fail:frames"}  # the child's details, carried
    slow = runner_settings(tmp_path, test_fault="sleep:features", job_timeout_s=1.5)
    await add_job(store, slow, "slow")
    t0 = time.monotonic()
    async with started(store, slow):
        job2 = await wait_done(store, "slow")
    assert time.monotonic() - t0 < 8  # 1.5 s + SIGTERM grace at most
    assert job2.status == "failed" and job2.error_code == "job_timeout"
    assert "JOB_TIMEOUT_S=2 s during Feature Detection" in str(job2.error_message)
    assert not stage_children(workspace(slow, "slow").root)
    await asyncio.sleep(0.3)
    for jid, code in (("job-1", "pipeline_error"), ("slow", "job_timeout")):
        job = await get(store, jid)
        assert job.status == "failed" and job.attempt == 1
        assert [(a["outcome"], a["error_code"]) for a in job.attempts] == [("failed", code)]


# --- graceful shutdown, delete ----------------------------------------------------------------

async def test_drain_stops_at_the_grace_then_job_resumes(tmp_path, fake_stages):
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="pause:features")
    await add_job(store, settings)
    ws = workspace(settings)
    runner = JobRunner(store, settings, gpu_enabled=False)
    await runner.start()
    await until(ws.test_pause_file("features").exists, 20, "pause at features")
    mtimes = checkpoint_mtimes(ws.root)
    assert list(mtimes) == ["frames"]
    children = stage_children(ws.root)
    t0 = time.monotonic()
    await runner.drain(0.5)
    assert runner.draining and 0.4 <= time.monotonic() - t0 < 2
    await runner.stop()
    assert still_alive(children) == []
    job = await get(store, "job-1")
    assert job.status == "pending" and job.pgid is None
    assert job.message == "Interrupted by a server shutdown; resumes at Feature Detection"
    assert outcomes(job) == [(1, "interrupted", "features")]

    async with started(store, runner_settings(tmp_path)):
        job = await wait_done(store)
    assert job.status == "completed", job.error_message
    assert checkpoint_mtimes(ws.root)["frames"] == mtimes["frames"]
    assert [(a["outcome"], a["failed_stage"]) for a in job.attempts] == [
        ("interrupted", "features"), ("completed", None)]


async def test_drain_lets_the_running_stage_finish_and_starts_no_other(tmp_path, monkeypatch):
    use_fake_stages(monkeypatch, seconds=1.0)
    store = RecordingStore()
    settings = runner_settings(tmp_path)
    await add_job(store, settings)
    ws = workspace(settings)
    runner = JobRunner(store, settings, gpu_enabled=False)
    await runner.start()
    await until(lambda: stage_children(ws.root), 20, "the frames child")
    await runner.drain(10)  # frames ends within the grace; features never starts
    await runner.stop()
    job = await get(store, "job-1")
    assert job.status == "pending" and sorted(checkpoint_mtimes(ws.root)) == ["frames"]
    assert job.message == "Paused by a server shutdown; resumes at Feature Detection"
    assert outcomes(job) == [(1, "interrupted", "features")]
    assert list(job.attempts[0]["stage_wall_s"]) == ["frames"]


async def test_delete_of_a_running_job_stops_it_and_removes_its_files(tmp_path, fake_stages):
    store = RecordingStore()
    settings = runner_settings(tmp_path, test_fault="pause:mapping")
    await add_job(store, settings)
    ws = workspace(settings)
    async with started(store, settings) as runner:
        await until(ws.test_pause_file("mapping").exists, 20, "pause at mapping")
        children = stage_children(ws.root)
        assert await runner.delete("job-1")
        assert still_alive(children) == [] and not ws.root.parent.exists()
        job = await get(store, "job-1")
        assert job.status == "deleted" and runner.active_jobs == 0
        assert outcomes(job) == [(1, "deleted", "mapping")]
        assert not await runner.cancel("job-1") and not await runner.retry("job-1")


async def test_retry_waits_briefly_for_a_stopping_task(tmp_path, monkeypatch):
    """A cancelled job whose task still stops its child is requeued only after the task ends
    (at most RETRY_UNWIND_WAIT_S), so two runs of one job never overlap."""
    monkeypatch.setattr(scheduler, "ABORT_WAIT_S", 0.0)  # cancel returns before the task ends
    store = RecordingStore()
    settings = runner_settings(tmp_path)
    release = asyncio.Event()

    async def slow_stage():
        try:
            await asyncio.sleep(30)
        finally:
            await release.wait()  # a child that takes its time to die
        raise AssertionError("unreachable")

    stages = ScriptedStages(settings, script={"frames": [slow_stage]})
    await add_job(store, settings)
    async with started(store, settings, stage_runner=stages) as runner:
        await until(lambda: stages.calls, 5, "frames to start")
        assert await runner.cancel("job-1")
        asyncio.get_running_loop().call_later(0.3, release.set)
        t0 = time.monotonic()
        assert await runner.retry("job-1")
        assert 0.25 <= time.monotonic() - t0 < scheduler.RETRY_UNWIND_WAIT_S
        job = await wait_done(store)
    assert job.status == "completed"
    assert outcomes(job) == [(1, "cancelled", "frames"), (2, "completed", None)]
    assert await status_is(store, "job-1", "completed")
