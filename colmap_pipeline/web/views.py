"""A stored job as the caller may see it: lookup with ownership (another key's job is "not
found"), and the public view with the caller's fields (``user_email`` for its owner) and signed
download links (:mod:`.signing`) when keys are on."""
from __future__ import annotations

from fastapi import Request

from ..errors import PipelineError
from ..jobs import Job, JobStatus, JobStore
from .auth import KeyRing, Principal
from .schemas import JobPublic
from .signing import LinkSigner


def not_found() -> PipelineError:
    """404 ``not_found``; the same answer for an unknown, a deleted and another key's job (the
    message echoes nothing of the request)."""
    return PipelineError("not_found", "No job with this id.")


async def live_job(store: JobStore, job_id: str, caller: Principal | None) -> Job:
    """The job, unless unknown, deleted or not the caller's (``caller`` ``None``: access was
    granted by a signed link for this job's path).

    Raises: PipelineError("not_found") (404).
    """
    job = await store.get_job(job_id)
    if job is None or job.status == JobStatus.DELETED:
        raise not_found()
    if caller is not None and not caller.may_see(job):
        raise not_found()
    return job


async def must_get(store: JobStore, job_id: str) -> Job:
    """The job after a runner call moved it (a store never forgets a job: deleted ones stay
    as tombstones).

    Raises: PipelineError("not_found") (404) if it is gone all the same.
    """
    job = await store.get_job(job_id)
    if job is None:
        raise not_found()
    return job


async def job_view(request: Request, store: JobStore, job: Job, caller: Principal) -> JobPublic:
    """:meth:`JobPublic.from_job` for ``caller``: queue position while pending, artifact URLs
    signed while keys are on, ``user_email`` only for the owner."""
    pos = await store.queue_position(job.job_id) if job.status == JobStatus.PENDING else None
    ring: KeyRing = request.app.state.keyring
    signer: LinkSigner = request.app.state.signer
    return JobPublic.from_job(job, pos, link=signer.sign if ring.enabled else None,
                              show_email=caller.sees_email(job))
