"""Job lifecycle on a real server with real reconstructions of the sample (issue 5): one
resume after kill -9 of the server during matching, one cancel followed by a retry, and the
SIGTERM drain; each resumed model is compared with an undisturbed one. Also the upload
behaviour that must survive a restart (idempotency keys) and the free-disk limit.

Everything else about the lifecycle (resume at every stage, outside kills, crashes, timeouts,
automatic retries, retention, orphan sweeps, the boot kill of a surviving child) runs in
seconds in tests/test_scheduler.py, test_attempt.py and test_housekeeping.py, on fake stage
bodies.

Servers run with ``PIPELINE_RANDOM_SEED=0`` (seeded, single-threaded matching and mapping):
with random seeds two undisturbed runs of the sample differ by up to 30 % in points.

Servers keep :data:`LIFECYCLE_FRAMES` frames per job (``MAX_FRAMES_LOW``), not 30: resume,
cancel and drain act the same on a smaller model. The four real jobs (the undisturbed
reference and the three fault scenarios) start together, each on its own server, when the
first of those tests is set up (:func:`real_jobs`): their single-threaded matching and mapping
overlap, and each scenario waits at its pause until its test acts. Module on the 2-core
machine, same load: 111 s with 30 frames and each test starting its own job in turn, 66 s now.

Fault tests use the TEST-ONLY hook ``TEST_FAULT=pause:STAGE``: the stage child creates
``WS/test_fault_paused.STAGE`` and blocks until the file is removed. A restarted server without
``TEST_FAULT`` writes a ``job.json`` without the fault, so the resumed child runs normally.
"""
from __future__ import annotations

import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import SAMPLE_VIDEO, ServerProcess, wait_until
from runner_harness import checkpoint_mtimes, stage_children, still_alive

from colmap_pipeline.layout import DataDir, Workspace
from colmap_pipeline.protocol import STAGES

pytestmark = pytest.mark.e2e

#: frames per job of this module's servers (``MAX_FRAMES_LOW``; the preset's 30 are tested
#: end to end in tests/test_e2e.py)
LIFECYCLE_FRAMES = 12

# --- helpers --------------------------------------------------------------------------------

class Servers:
    """Start, SIGKILL and restart ``python main.py`` on one DATA_DIR (``tmp/data``)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.all: list[ServerProcess] = []

    def start(self, **env) -> ServerProcess:
        log = self.tmp / "server.log"
        if log.exists():  # keep the previous server's log for debugging
            log.rename(self.tmp / f"server.{len(self.all)}.log")
        # repeatable models (compare with ±1 / ±5 %) of LIFECYCLE_FRAMES frames
        env = {"PIPELINE_RANDOM_SEED": 0, "MAX_FRAMES_LOW": LIFECYCLE_FRAMES, **env}
        srv = ServerProcess(self.tmp, {k: str(v) for k, v in env.items()})
        self.all.append(srv)
        return srv

    @staticmethod
    def sigkill(srv: ServerProcess) -> None:
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        srv._log.close()

    def stop_all(self) -> None:
        for srv in self.all:
            srv.stop()


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.stop_all()


def upload(c: httpx.Client, data: bytes | None = None, key: str | None = None,
           **fields) -> httpx.Response:
    body = SAMPLE_VIDEO.read_bytes() if data is None else data
    headers = {"Idempotency-Key": key} if key else {}
    return c.post("/upload-video", files={"video": ("clip.mp4", body, "video/mp4")},
                  data={"project_id": "life", "quality": "low", **fields}, headers=headers)


def workspace(srv: ServerProcess, job_id: str) -> Path:
    return DataDir(srv.data_dir).job(job_id).work.root


def pause_flag(ws: Path, stage: str) -> Path:
    return Workspace(ws).test_pause_file(stage)


def get_job(srv: ServerProcess, job_id: str) -> dict:
    with srv.client() as c:
        return c.get(f"/jobs/{job_id}").json()


def assert_nothing_processing(srv: ServerProcess) -> None:
    with srv.client() as c:
        assert c.get("/jobs", params={"status": "processing"}).json()["total"] == 0


#: SHUTDOWN_GRACE_S of the drain test's server (s)
DRAIN_GRACE_S = 3.0


class Scenario:
    """A server of its own (:class:`Servers`, seeded) with the sample uploaded to it."""

    def __init__(self, tmp: Path, key: str | None = None, **env):
        self.servers = Servers(tmp)
        self.srv = self.servers.start(**env)
        with self.srv.client() as c:
            r = upload(c, key=key)
        assert r.status_code == 202, r.text
        self.job_id: str = r.json()["job_id"]
        self.ws = workspace(self.srv, self.job_id)


class Reference(Scenario):
    """The undisturbed run: the sample on a server without faults."""

    _results: dict | None = None

    def results(self) -> dict:
        """The completed job's ``results`` (waits for the job, then stops its server)."""
        if self._results is None:
            job = self.srv.wait_for_job(self.job_id, timeout_s=600)
            self.servers.stop_all()
            assert job["status"] == "completed", job.get("error")
            assert job["results"]["frames_extracted"] == LIFECYCLE_FRAMES
            self._results = job["results"]
        return self._results


@dataclass
class RealJobs:
    """The module's real reconstructions, each on its own server and DATA_DIR."""

    reference: Reference  # undisturbed
    kill: Scenario  # paused at matching, for the kill -9
    cancel: Scenario  # paused at matching, for cancel then retry
    drain: Scenario  # paused at features, for the SIGTERM drain (grace DRAIN_GRACE_S)


@pytest.fixture(scope="module")
def real_jobs(tmp_path_factory):
    """All four real jobs, started together (four servers at once, each sent the sample) when
    the first test needing one is set up. Their frames and features run at once, and seeded
    matching and mapping use one core each, so the reference and the later tests' jobs run
    alongside the first test's: they wait at their pause (no CPU) until their test acts, and
    every timed assertion (a cancel kills within 5 s, the drain's grace) runs while the others
    are paused or done."""
    specs = [("undisturbed", Reference, {}),
             ("kill", Scenario, {"key": "fault-matching", "TEST_FAULT": "pause:matching"}),
             ("cancel", Scenario, {"TEST_FAULT": "pause:matching"}),
             ("drain", Scenario, {"TEST_FAULT": "pause:features",
                                  "SHUTDOWN_GRACE_S": DRAIN_GRACE_S})]
    with ThreadPoolExecutor(len(specs)) as pool:  # the four servers start at once
        futures = [pool.submit(cls, tmp_path_factory.mktemp(name), **env)
                   for name, cls, env in specs]
    made = [f.result() for f in futures if f.exception() is None]
    try:
        assert len(made) == len(specs), [f.exception() for f in futures]
        yield RealJobs(*made)
    finally:
        for sc in made:
            sc.servers.stop_all()


def assert_matches_undisturbed(job: dict, reference: Reference) -> None:
    """``job`` completed, with the reference's frames, registered images within ±1 and points
    within ±5 % (waits for the reference if it is still running)."""
    assert job["status"] == "completed", job.get("error")
    res, ref = job["results"], reference.results()
    assert res["frames_extracted"] == ref["frames_extracted"]
    assert abs(res["registered_images"] - ref["registered_images"]) <= 1, (
        res["registered_images"], ref["registered_images"])
    assert abs(res["points3d"] - ref["points3d"]) <= 0.05 * ref["points3d"], (
        res["points3d"], ref["points3d"])


# --- resume after kill -9 of the server -----------------------------------------------------

def test_sigkill_server_during_matching_then_resume(real_jobs):
    """The one real resume: checkpoints reused, the child killed with its server, and the
    resumed model equal to an undisturbed one (every other stage: tests/test_scheduler.py)."""
    stage = "matching"
    servers, srv, job_id, ws = (real_jobs.kill.servers, real_jobs.kill.srv,
                                real_jobs.kill.job_id, real_jobs.kill.ws)
    wait_until(lambda: pause_flag(ws, stage).exists(), 300, f"pause at {stage}")
    done_before = list(STAGES[:STAGES.index(stage)])
    mtimes = checkpoint_mtimes(ws)
    assert sorted(mtimes) == sorted(done_before)
    children = stage_children(ws)
    assert len(children) == 1
    assert get_job(srv, job_id)["status"] == "processing"

    servers.sigkill(srv)
    srv2 = servers.start()  # no TEST_FAULT: the resumed child runs normally
    assert still_alive(children) == [], "a stage child from before the kill is alive"
    job = srv2.wait_for_job(job_id, timeout_s=300)

    assert_matches_undisturbed(job, real_jobs.reference)
    after = checkpoint_mtimes(ws)
    assert {s: after[s] for s in done_before} == mtimes, "a finished stage ran again"
    assert sorted(after) == sorted(STAGES)
    # the killed attempt left no record (its server died); the resumed one ran only the rest
    [attempt] = job["attempts"]
    assert attempt["outcome"] == "completed"
    assert attempt["resumed_from"] == stage and attempt["skipped_stages"] == done_before
    assert list(attempt["stage_wall_s"]) == list(STAGES[STAGES.index(stage):])
    assert job["attempt"] == 2
    assert_nothing_processing(srv2)
    servers.stop_all()


# --- cancel, then retry ---------------------------------------------------------------------

def test_cancel_during_matching_then_retry_completes(real_jobs):
    srv, job_id, ws = real_jobs.cancel.srv, real_jobs.cancel.job_id, real_jobs.cancel.ws
    with srv.client() as c:
        flag = pause_flag(ws, "matching")
        wait_until(flag.exists, 300, "pause at matching")
        children = stage_children(ws)
        assert len(children) == 1
        mtimes = checkpoint_mtimes(ws)
        t0 = time.monotonic()
        r = c.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
        wait_until(lambda: not still_alive(children) and not stage_children(ws), 5,
                   "stage child to die")
        print(f"child gone {time.monotonic() - t0:.2f} s after the cancel request")
        job = c.get(f"/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["finished_at"]
        assert c.get("/health").json()["active_jobs"] == 0
        assert ws.exists(), "the workspace stays for a retry"
        again = c.post(f"/jobs/{job_id}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "job_not_cancellable"

        flag.unlink()
        r = c.post(f"/jobs/{job_id}/retry")
        assert r.status_code == 200 and r.json()["status"] in ("pending", "processing")
        wait_until(flag.exists, 60, "the retry to reach matching")  # resumed at matching
        flag.unlink()
        job = srv.wait_for_job(job_id, timeout_s=300)
        assert_matches_undisturbed(job, real_jobs.reference)
        after = checkpoint_mtimes(ws)
        assert {s: after[s] for s in mtimes} == mtimes  # frames, features not redone
        assert [(a["attempt"], a["outcome"], a["failed_stage"]) for a in job["attempts"]] == [
            (1, "cancelled", "matching"), (2, "completed", None)]
        assert job["attempts"][1]["skipped_stages"] == ["frames", "features"]
        r = c.post(f"/jobs/{job_id}/retry")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_retryable"
    real_jobs.cancel.servers.stop_all()


# --- graceful shutdown ----------------------------------------------------------------------

def test_sigterm_drains_then_job_resumes_after_restart(real_jobs):
    grace = DRAIN_GRACE_S
    servers, srv, job_id, ws = (real_jobs.drain.servers, real_jobs.drain.srv,
                                real_jobs.drain.job_id, real_jobs.drain.ws)
    with srv.client() as c:
        wait_until(lambda: pause_flag(ws, "features").exists(), 300, "pause at features")
        mtimes = checkpoint_mtimes(ws)
        assert list(mtimes) == ["frames"]
        children = stage_children(ws)
        assert c.get("/readiness").status_code == 200
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        r = c.get("/readiness")
        assert r.status_code == 503 and "not_draining" in r.json()["failing"]
        r = upload(c)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert int(r.headers["Retry-After"]) > 0
        assert c.get("/health").status_code == 200  # still alive while draining
    # uvicorn re-raises the captured SIGTERM after its clean shutdown
    assert srv.proc.wait(grace + 20) in (0, -signal.SIGTERM)
    took = time.monotonic() - t0
    assert grace - 0.5 <= took < grace + 15, took
    srv._log.close()
    assert still_alive(children) == []

    srv2 = servers.start()
    job = srv2.wait_for_job(job_id, timeout_s=300)
    assert_matches_undisturbed(job, real_jobs.reference)
    assert checkpoint_mtimes(ws)["frames"] == mtimes["frames"]
    assert [(a["outcome"], a["failed_stage"]) for a in job["attempts"]] == [
        ("interrupted", "features"), ("completed", None)], job["attempts"]
    assert_nothing_processing(srv2)
    servers.stop_all()


# --- uploads across a restart, free disk ----------------------------------------------------

def test_idempotency_key_returns_same_job_across_restart(servers):
    srv = servers.start(TEST_FAULT="pause:frames")
    with srv.client() as c:
        r1 = upload(c, key="scan-42")
        r2 = upload(c, key="scan-42")
        r3 = upload(c, key="scan-43")
        assert r1.status_code == r2.status_code == r3.status_code == 202
        assert r2.json()["job_id"] == r1.json()["job_id"] != r3.json()["job_id"]
        assert r2.headers["Idempotent-Replayed"] == "true"
        assert c.get("/jobs").json()["total"] == 2
        assert upload(c, key="x" * 201).status_code == 422
    srv.stop()
    srv2 = servers.start(TEST_FAULT="pause:frames")
    with srv2.client() as c:
        r4 = upload(c, key="scan-42")
        assert r4.status_code == 202 and r4.json()["job_id"] == r1.json()["job_id"]
        assert c.get("/jobs").json()["total"] == 2
        # a deleted job frees its key
        assert c.delete(f"/jobs/{r1.json()['job_id']}").status_code == 200
        r5 = upload(c, key="scan-42")
        assert r5.status_code == 202 and r5.json()["job_id"] != r1.json()["job_id"]


def test_low_disk_rejects_uploads_with_507_and_fails_readiness(servers):
    free = shutil.disk_usage(servers.tmp).free
    srv = servers.start(MIN_FREE_DISK_BYTES=free * 4)
    with srv.client() as c:
        r = c.get("/readiness")
        assert r.status_code == 503 and r.json()["failing"] == ["free_disk"]
        r = upload(c)
        assert r.status_code == 507
        err = r.json()["error"]
        assert err["code"] == "insufficient_storage" and err["hint"]
        assert err["details"]["min_free_disk_bytes"] == free * 4
        assert c.get("/jobs").json()["total"] == 0
        assert list((srv.data_dir / "uploads").iterdir()) == []
