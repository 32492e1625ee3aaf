"""A job store that stays unreachable for longer than the storage retries last (issue 12 item 4,
"never stuck ``processing``"): :class:`~colmap_pipeline.runner.attempt.JobRun` gives up after
``STORAGE_RETRIES`` storage errors, and the write that fails the job must still land once the
store answers again. Found with ``tests/test_replicas.py``'s outage test at 75 s (two
replicas, PostgreSQL refused): the job stayed ``processing`` for good, its ticket ended, its
replica heartbeating, so no sweep would ever take it. Here on the in-memory store with a
scripted executor (``runner_harness``), in under a second."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
from fakes import InMemoryJobStore
from runner_harness import (
    ScriptedStages,
    add_job,
    get,
    runner_settings,
    started,
    until,
    wait_done,
)

from colmap_pipeline.jobs import StoreUnavailable
from colmap_pipeline.runner import attempt

#: seconds the store stays unreachable (every storage retry and the final write fall inside)
DOWN_S = 0.5


class UnreachableStore(InMemoryJobStore):
    """The in-memory store whose every public coroutine method raises
    :class:`StoreUnavailable` while :attr:`down` is set (a lost database)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused = 0

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name.startswith("_") or not inspect.iscoroutinefunction(value):
            return value
        if not super().__getattribute__("down"):
            return value

        async def refused(*_: Any, **__: Any) -> Any:
            self.refused += 1
            raise StoreUnavailable("database unreachable (test)")
        return refused


@pytest.mark.asyncio
async def test_a_store_lost_past_every_storage_retry_still_fails_the_job_once_back(
        tmp_path, monkeypatch):
    monkeypatch.setattr(attempt, "backoff_delay", lambda n: 0.01)
    store = UnreachableStore()
    settings = runner_settings(tmp_path)

    async def outage(stage: str) -> None:
        if stage == "features":  # frames done; the database goes away for DOWN_S
            store.down = True
            asyncio.get_running_loop().call_later(DOWN_S, setattr, store, "down", False)

    stages = ScriptedStages(settings, on_run=outage)
    await add_job(store, settings)
    async with started(store, settings, stage_runner=stages):
        await until(lambda: "features" in stages.calls and not store.down, DOWN_S + 5,
                    "the outage to begin and end")
        job = await wait_done(store, timeout_s=5)
    assert store.refused > attempt.STORAGE_RETRIES  # every retry fell inside the outage
    assert job.status == "failed" and job.error_code == "storage_error", job
    assert "database unreachable" in str(job.error_message)
    assert (await get(store)).status == "failed"
