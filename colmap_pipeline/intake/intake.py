"""Job lifecycle glue between the HTTP layer and the store: turn an upload into a pending job,
and a stored row into the public view.

No FastAPI here: errors are :class:`PipelineError`, turned into HTTP answers by ``api``.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from ..config import Settings
from ..errors import PipelineError
from ..layout import DataDir
from ..runner.executor import run_json_command
from ..web.schemas import ArtifactPublic, JobError, JobPublic

#: seconds the probe child may take for one upload
PROBE_TIMEOUT_S = 60.0
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class UploadForm(BaseModel):
    """The text fields of ``POST /upload-video``."""

    project_id: str = Field(min_length=1, max_length=200,
                            description="the frontend's project id")
    scan_name: str = Field("Untitled scan", min_length=1, max_length=200,
                           description="display name of the scan")
    quality: Literal["low", "medium", "high"] = Field(
        "medium", description="low: 30 frames/1000 px; medium: 50/1600; high: 100/2400")
    user_email: str | None = Field(None, max_length=254, description="owner's e-mail (optional)")

    @field_validator("user_email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not _EMAIL.match(v):
            raise ValueError("not an e-mail address")
        return v


def parse_form(fields: dict[str, str]) -> UploadForm:
    """Validate the text fields.

    Raises: PipelineError("invalid_request") naming each bad field in ``details.fields``.
    """
    try:
        return UploadForm.model_validate(fields)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
                    for e in exc.errors()]
        names = ", ".join(p["field"] for p in problems)
        raise PipelineError("invalid_request", f"Invalid or missing form field(s): {names}",
                            "Send project_id, and quality as one of low, medium, high.",
                            details={"fields": problems}) from None


async def probe_upload(path: Path, settings: Settings) -> dict:
    """Probe an uploaded file in a child process.

    Returns the probe dict (codec, width, height, fps, duration_s, rotation, …).
    Raises: PipelineError no_video_stream (415) or video_too_long (422).
    """
    rc, doc, err = await run_json_command(["probe", str(path)], timeout_s=PROBE_TIMEOUT_S)
    if rc != 0 or not isinstance(doc, dict) or "error" in doc:
        e = (doc or {}).get("error") if isinstance(doc, dict) else None
        if e and e.get("code") in ("no_video_stream", "too_few_frames", "video_truncated"):
            raise PipelineError("no_video_stream", e.get("message") or "", e.get("hint") or "")
        raise PipelineError("no_video_stream", details={"probe_exit": rc})
    duration = float(doc.get("duration_s") or 0.0)
    if duration > settings.max_video_seconds:
        raise PipelineError(
            "video_too_long",
            f"The video lasts {duration:.1f} s; the limit is {settings.max_video_seconds:.0f} s.",
            details={"duration_s": duration, "max_video_seconds": settings.max_video_seconds})
    return doc


def _install_input(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)


async def create_job_from_upload(store: Any, settings: Settings, *, upload_path: Path,
                                 size_bytes: int, sha256: str, client_filename: str | None,
                                 form: UploadForm, video: dict,
                                 idempotency_key: str | None = None) -> dict:
    """Move the upload into the job's folder and insert the ``pending`` row.

    The file is stored as ``DATA_DIR/jobs/JOB_ID/input/video.<container>`` (a name the server
    makes). If the insert fails, the job folder is removed. ``idempotency_key`` (the upload's
    ``Idempotency-Key`` header) is unique among live jobs: a duplicate raises
    ``sqlite3.IntegrityError``.
    Returns: the stored row.
    """
    job_id = str(uuid.uuid4())
    names = [re.sub(r"[^a-z0-9]", "", n.lower())[:8]
             for n in str(video.get("container", "")).split(",")]
    ext = "mp4" if "mp4" in names else next((n for n in names if n), "bin")
    jdir = DataDir(settings.data_dir).job(job_id)
    dest = jdir.input_video(ext)
    await asyncio.to_thread(_install_input, upload_path, dest)
    try:
        return await store.create_job({
            "job_id": job_id, "scan_id": str(uuid.uuid4()), "project_id": form.project_id,
            "scan_name": form.scan_name, "user_email": form.user_email, "quality": form.quality,
            "input_path": str(dest), "input_filename": client_filename,
            "input_bytes": size_bytes, "input_sha256": sha256, "video_info": video,
            **({"idempotency_key": idempotency_key} if idempotency_key else {})})
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, jdir.root, True)
        raise


def job_public(row: dict, queue_position: int | None = None) -> JobPublic:
    """The public view of a stored job row."""
    results = row.get("results")
    artifacts = [ArtifactPublic(**{k: a[k] for k in ArtifactPublic.model_fields if k in a})
                 for a in (results or {}).get("artifacts", []) if "url" in a]
    error = None
    if row.get("error_code"):
        error = JobError(code=row["error_code"], message=row.get("error_message") or "",
                         hint=row.get("error_hint") or "")
    return JobPublic(
        job_id=row["job_id"], scan_id=row["scan_id"], project_id=row["project_id"],
        scan_name=row["scan_name"], quality=row["quality"], status=row["status"],
        progress=row["progress"], current_stage=row.get("current_stage"),
        message=row.get("message"), queue_position=queue_position,
        created_at=row["created_at"], started_at=row.get("started_at"),
        finished_at=row.get("finished_at"), attempt=row.get("attempt", 0),
        input_bytes=row["input_bytes"], input_sha256=row["input_sha256"],
        video=row.get("video_info"), error=error, results=results, artifacts=artifacts,
        attempts=row.get("attempts") or [])
