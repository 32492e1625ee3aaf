"""``MAX_PENDING_JOBS_PER_KEY``: how many jobs one API key may have waiting. An upload beyond
it gets 429 ``quota_exceeded`` saying how many of the key's jobs wait, before its body is read.
No ``Retry-After``: waiting alone does not help while the key's jobs stay pending.

Checked before the insert, so two uploads of one key arriving at the same instant may both
pass when one slot is left (the quota bounds a queue, it is not a billing counter).
"""
from __future__ import annotations

from ..errors import PipelineError
from ..jobs import JobStatus
from .auth import CallerDep
from .deps import SettingsDep, StoreDep


async def pending_quota(caller: CallerDep, store: StoreDep, settings: SettingsDep) -> None:
    """Dependency of the upload routes (after the key check, before the body is read).

    Raises: PipelineError ``quota_exceeded`` (429) when the caller's key already has
    ``MAX_PENDING_JOBS_PER_KEY`` pending jobs; never with authentication off or a limit of 0.
    """
    limit = settings.max_pending_jobs_per_key
    if caller.name is None or limit <= 0:
        return
    _, pending = await store.list_jobs(owner=caller.name, status=JobStatus.PENDING.value,
                                       limit=0)
    if pending >= limit:
        raise PipelineError(
            "quota_exceeded", f"This API key has {pending} job{'' if pending == 1 else 's'} "
            f"waiting; at most {limit} may wait at once.",
            details={"pending": pending, "limit": limit})
