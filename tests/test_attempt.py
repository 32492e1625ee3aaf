"""One job's run (``runner/attempt.py``): the retry policy, the failure mapping (exit status ->
error code), attempt records, the results written at completion. The policy tests run a
:class:`JobRunner` on the in-memory store with a scripted stand-in for the stage children
(``runner_harness.ScriptedStages``): no process is started, each test takes milliseconds."""
from __future__ import annotations

import signal

import pytest
from runner_harness import (
    RecordingStore,
    ScriptedStages,
    add_job,
    error_outcome,
    runner_settings,
    started,
    until,
    wait_done,
)

from colmap_pipeline.jobs import Intent
from colmap_pipeline.protocol import STAGES, ErrorEvent
from colmap_pipeline.results import AttemptRecord
from colmap_pipeline.runner import attempt
from colmap_pipeline.runner.attempt import (
    AttemptState,
    Failure,
    RetryKind,
    backoff_delay,
    failure_for,
    transient,
)
from colmap_pipeline.runner.executor import StageOutcome


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(attempt, "backoff_delay", lambda n: 0.0)


# --- pure policy ----------------------------------------------------------------------------

def test_backoff_is_exponential_bounded_and_jittered():
    for n, bound in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (20, 30.0)):
        samples = [backoff_delay(n) for _ in range(200)]
        assert all(0.1 * bound <= d <= bound for d in samples)
        assert max(samples) - min(samples) > 0.3 * bound  # jitter spreads the retries


@pytest.mark.parametrize(("outcome", "kind"), [
    (StageOutcome(-signal.SIGKILL), RetryKind.OUTSIDE_SIGNAL),
    (StageOutcome(-signal.SIGTERM), RetryKind.OUTSIDE_SIGNAL),
    (StageOutcome(-signal.SIGHUP), RetryKind.OUTSIDE_SIGNAL),
    (StageOutcome(-signal.SIGABRT), None),  # pycolmap crashed: would crash again
    (StageOutcome(-signal.SIGSEGV), None),
    (StageOutcome(-signal.SIGKILL, timed_out=True), None),  # we killed it at the deadline
    (error_outcome("workspace_busy"), RetryKind.STORAGE),
    (error_outcome("pipeline_error", rc=4, exception="OSError"), RetryKind.STORAGE),
    (error_outcome("pipeline_error", rc=4, exception="OperationalError"), RetryKind.STORAGE),
    (error_outcome("pipeline_error", rc=4, exception="KeyError"), None),
    (error_outcome("insufficient_motion"), None),
    (error_outcome("reconstruction_failed"), None),
    (StageOutcome(1), None),
])
def test_transient_classification(outcome, kind):
    assert transient(outcome) == kind


def test_failure_for_maps_each_way_a_child_ends():
    timeout = failure_for("features", StageOutcome(-9, timed_out=True), job_timeout_s=3600)
    assert timeout == Failure("job_timeout", "The job exceeded JOB_TIMEOUT_S=3600 s during "
                              "Feature Detection.", timeout.hint)
    ev = ErrorEvent("insufficient_motion", "The camera barely moves.", "Walk around.",
                    {"motion_fraction": 0.002, "frames_used": 3})
    named = failure_for("frames", StageOutcome(3, error=ev), job_timeout_s=1)
    assert named == Failure("insufficient_motion", "The camera barely moves.", "Walk around.",
                            {"motion_fraction": 0.002, "frames_used": 3})
    crash = failure_for("mapping", StageOutcome(-signal.SIGABRT), job_timeout_s=1)
    assert crash.code == "pipeline_crashed"
    assert crash.message == "The Sparse Reconstruction process was killed by signal SIGABRT."
    bug = failure_for("export", error_outcome("pipeline_error", rc=4, exception="KeyError"),
                      job_timeout_s=1)
    assert bug.code == "pipeline_error" and bug.details is None
    assert bug.message == "The Exporting process ended with exit status 4."
    silent = failure_for("export", StageOutcome(1), job_timeout_s=1)
    assert silent.message == "The Exporting process ended with exit status 1."
    unknown = failure_for("frames", StageOutcome(3, error=ErrorEvent("no_such_code", "m")),
                          job_timeout_s=1)
    assert (unknown.code, unknown.message) == ("pipeline_error", "m")
    assert Failure.of("storage_error").hint.startswith("Retry the job")


def test_attempt_record_has_the_published_shape():
    st = AttemptState(3, "2026-01-01T00:00:00.000000+00:00", {"frames": 1.5}, "frames", [],
                      "features")
    rec = st.record("retrying", retry=RetryKind.STORAGE, error_code="storage_error",
                    detail="disk")
    assert AttemptRecord.model_validate(rec).attempt == 3
    assert rec["failed_stage"] == "features" and rec["retry"] == "storage"
    assert rec["stage_wall_s"] == {"frames": 1.5} and rec["finished_at"] > rec["started_at"]
    plain = st.record("completed", failed_stage=None)
    assert "retry" not in plain and "detail" not in plain
    assert plain["failed_stage"] == "features"  # None means "the current stage"
    st.stage = None
    assert st.record("completed")["failed_stage"] is None


# --- the policy, on a scripted executor -----------------------------------------------------

async def run_one(tmp_path, script, **settings_kw):
    store = RecordingStore()
    settings = runner_settings(tmp_path, **settings_kw)
    stages = ScriptedStages(settings, script=script)
    await add_job(store, settings)
    async with started(store, settings, stage_runner=stages):
        job = await wait_done(store)
    return job, stages


@pytest.mark.asyncio
async def test_storage_errors_are_retried_with_backoff_then_complete(tmp_path, no_backoff):
    job, stages = await run_one(tmp_path, {
        "matching": [error_outcome("workspace_busy"),
                     error_outcome("pipeline_error", rc=4, exception="OSError")]})
    assert job.status == "completed", job.error_message
    assert [(a["attempt"], a["outcome"], a.get("retry"), a["error_code"], a["failed_stage"])
            for a in job.attempts] == [
        (1, "retrying", "storage", "storage_error", "matching"),
        (2, "retrying", "storage", "storage_error", "matching"),
        (3, "completed", None, None, None)]
    assert job.attempt == 3 and job.auto_retries == 2
    # each retry resumed at matching: earlier stages ran once
    assert stages.calls == ["frames", "features", "matching", "matching", "matching",
                            "mapping", "dense", "meshing", "export"]
    assert job.attempts[2]["skipped_stages"] == ["frames", "features"]


@pytest.mark.asyncio
async def test_storage_errors_give_up_after_three_retries(tmp_path, no_backoff):
    job, _ = await run_one(tmp_path, {"features": [error_outcome("workspace_busy")] * 5})
    assert job.status == "failed" and job.error_code == "storage_error"
    assert "features: workspace_busy" in str(job.error_message)
    assert [a["outcome"] for a in job.attempts] == ["retrying"] * 3 + ["failed"]
    assert job.attempts[-1]["error_code"] == "storage_error" and job.attempt == 4


@pytest.mark.asyncio
async def test_too_little_free_disk_fails_as_insufficient_storage(tmp_path, no_backoff):
    job, stages = await run_one(tmp_path, {}, min_free_disk_bytes=1 << 62)
    assert job.status == "failed" and job.error_code == "insufficient_storage"
    assert "MIN_FREE_DISK_BYTES" in str(job.error_message)
    assert stages.calls == []  # checked before each stage: none started
    assert [(a["outcome"], a["failed_stage"]) for a in job.attempts] == [
        ("retrying", "frames")] * 3 + [("failed", "frames")]


@pytest.mark.asyncio
async def test_outside_kill_is_retried_once_per_run(tmp_path):
    kill = StageOutcome(-signal.SIGKILL)
    job, stages = await run_one(tmp_path, {"mapping": [kill, kill]})
    assert job.status == "failed" and job.error_code == "pipeline_crashed"
    assert job.error_message == "The Sparse Reconstruction process was killed by signal SIGKILL."
    assert [(a["outcome"], a.get("retry"), a["error_code"], a.get("detail"))
            for a in job.attempts] == [
        ("retrying", "outside_signal", "pipeline_crashed", "signal SIGKILL"),
        ("failed", None, "pipeline_crashed", None)]
    assert stages.calls.count("mapping") == 2


@pytest.mark.asyncio
async def test_a_named_failure_keeps_its_details_and_is_not_retried(tmp_path):
    """Issue 10 item 6: the numbers of a failed reconstruction reach ``error_details``."""
    numbers = {"frames_used": 30, "median_keypoints": 812, "verified_pairs": 4,
               "largest_model_images": 2}
    job, stages = await run_one(tmp_path, {
        "mapping": [error_outcome("reconstruction_failed", **numbers)]})
    assert job.status == "failed" and job.error_code == "reconstruction_failed"
    assert job.error_details == numbers
    assert job.error_hint and job.error_message  # the catalog's, as the child sent none
    assert job.current_stage == "Sparse Reconstruction" and job.attempt == 1
    assert stages.calls.count("mapping") == 1
    assert [(a["outcome"], a["failed_stage"], a["error_code"]) for a in job.attempts] == [
        ("failed", "mapping", "reconstruction_failed")]


@pytest.mark.asyncio
async def test_completed_results_are_typed_with_artifact_urls(tmp_path):
    job, stages = await run_one(tmp_path, {})
    assert stages.calls == list(STAGES)
    assert job.status == "completed"
    assert job.results["artifacts"][0]["url"] == "/jobs/job-1/artifacts/sparse.ply"
    assert job.results["registered_images"] == 4 and job.results["job_wall_time_s"] >= 0
    assert set(job.results) == {"frames_extracted", "frames_used", "registered_images",
                                "points3d", "mean_reprojection_error_px",
                                "mean_track_length", "artifacts", "job_wall_time_s"}
    assert job.message == "Registered 4 of 5 frames; 120 3D points"


@pytest.mark.asyncio
async def test_a_result_outside_the_schema_fails_the_job(tmp_path):
    store = RecordingStore()
    settings = runner_settings(tmp_path)
    stages = ScriptedStages(settings, result={"frames_extracted": "many"})
    await add_job(store, settings)
    async with started(store, settings, stage_runner=stages):
        job = await wait_done(store)
    assert job.status == "failed" and job.error_code == "pipeline_error"
    assert "does not match the results schema" in str(job.error_message)
    assert job.attempts[-1]["failed_stage"] == "export"


@pytest.mark.asyncio
async def test_a_run_whose_job_was_claimed_by_another_worker_starts_no_further_stage(tmp_path):
    """Issue 12 (PostgreSQL mode): a replica taken for dead whose job another replica
    claimed (the row's ``attempt`` moved on) stops at its next stage boundary."""
    store = RecordingStore()
    settings = runner_settings(tmp_path)

    async def other_replica_claims(stage: str) -> None:
        if stage == "features":  # the sweep requeued it, another worker claimed it
            assert await store.apply("job-1", Intent.REQUEUE)
            assert await store.apply("job-1", Intent.CLAIM)

    stages = ScriptedStages(settings, on_run=other_replica_claims)
    await add_job(store, settings)
    async with started(store, settings, stage_runner=stages) as runner:
        await until(lambda: not runner.active_jobs and stages.calls, 10, "the run to end")
        job = await store.get_job("job-1")
    assert stages.calls == ["frames", "features"]  # matching never started here
    assert job is not None and job.status == "processing" and job.attempt == 2
    assert job.attempts[-1]["outcome"] == "stopped"
