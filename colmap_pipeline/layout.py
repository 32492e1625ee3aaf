"""The one owner of every path under ``DATA_DIR``, and of the workspace's small JSON files.

No other module spells a folder or file name under ``DATA_DIR``: they ask this one. The
storage backends (local disk today, a bucket next) plug in here. A light leaf: the API process,
the runner and the stage children all import it; it imports no pycolmap and no web framework.

::

    DATA_DIR/colmap_app.db               the SQLite job store (embedded mode)
    DATA_DIR/uploads/<hex>.part|.upload  request bodies being received (server-made names)
    DATA_DIR/jobs/JOB_ID/                one job (:class:`JobDir`)
        input/video.<container>          the uploaded video, or
        input/images/img_NNNNN.jpg|png   the uploaded photo set
        work/                            the pipeline workspace (:class:`Workspace`)
            job.json                     what the stages run on (:func:`write_job`)
            .lock                        flock held by the stage child that runs
            frames/ frames.json frames_added.json   selected frames and their scores
            database.db database.before_mapping.db  COLMAP database, and its copy before mapping
            sparse/<k>/ dense/           COLMAP models; dense MVS (GPU)
            artifacts/NAME               what clients download
            checkpoints/STAGE.json       written atomically when a stage ends
            logs/STAGE.log               each stage child's stderr
            result.json                  the job's results (:class:`..results.JobResult`)
            .storage.json                what of the workspace is in the bucket (bucket mode)

The bucket (``STORAGE_BUCKET``, :class:`ObjectKeys`) mirrors the same names::

    jobs/JOB_ID/input/video.<container>      the uploaded video, as it is
    jobs/JOB_ID/input/images.tar             the uploaded photo set, one tar
    jobs/JOB_ID/stages/STAGE.tar             what STAGE changed in work/ (a delta, one tar)
    jobs/JOB_ID/work/checkpoints/STAGE.json  written after STAGE.tar: the stage's commit mark
    jobs/JOB_ID/work/artifacts/NAME          each artifact, its own object (downloads)
    jobs/JOB_ID/work/frames.json             a copy of the frames stage's (GET /jobs/ID/frames)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import PipelineError
from .presets import Preset
from .protocol import STAGES

#: file name of the SQLite job store in DATA_DIR (when DATABASE_PATH is not set)
DATABASE_FILE = "colmap_app.db"
#: suffix of an upload still being received, and of a complete one not yet installed
PARTIAL_SUFFIX = ".part"
UPLOAD_SUFFIX = ".upload"


class Workspace:
    """Paths of one job's pipeline workspace (nothing is created by constructing it)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.job_json = self.root / "job.json"
        self.lock_file = self.root / ".lock"
        self.frames_dir = self.root / "frames"
        self.frames_json = self.root / "frames.json"
        self.database = self.root / "database.db"
        #: the database as the matching stage left it, saved by the mapping stage (whose
        #: ladder adds pairs, cameras and frames) so that a re-run starts from it
        self.database_before_mapping = self.root / "database.before_mapping.db"
        #: frames the ladder's ``more_frames`` rung added to ``frames/``
        self.frames_added_json = self.root / "frames_added.json"
        self.sparse_dir = self.root / "sparse"
        self.dense_dir = self.root / "dense"
        self.artifacts_dir = self.root / "artifacts"
        self.checkpoints_dir = self.root / "checkpoints"
        self.logs_dir = self.root / "logs"
        self.result_json = self.root / "result.json"
        #: which stages and files of this workspace are in the bucket (bucket mode only)
        self.storage_manifest = self.root / ".storage.json"

    def checkpoint(self, stage: str) -> Path:
        """Path of ``checkpoints/<stage>.json``."""
        return self.checkpoints_dir / f"{stage}.json"

    def log(self, stage: str) -> Path:
        """Path of ``logs/<stage>.log`` (the stage child's stderr)."""
        return self.logs_dir / f"{stage}.log"

    def artifact(self, name: str) -> Path:
        """Path of ``artifacts/<name>``; ``name`` must be a plain file name (no separators).

        Raises:
            ValueError: ``name`` is empty, ``.``/``..`` or holds a path separator.
        """
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"not an artifact name: {name!r}")
        return self.artifacts_dir / name

    def test_pause_file(self, stage: str) -> Path:
        """``test_fault_paused.<stage>``: the test-only ``pause`` hook's marker file."""
        return self.root / f"test_fault_paused.{stage}"

    def stage_files(self) -> dict[str, tuple[int, int]]:
        """The files stage snapshots carry: ``{relative POSIX path: (bytes, mtime ns)}``.

        Every file under the workspace except ``job.json`` (rewritten by each attempt, it holds
        this replica's absolute input path), ``checkpoints/`` (their own objects), hidden files
        (the lock, the storage manifest, half-written temporaries) and the test-fault markers.
        ``artifacts/NAME`` entries are listed: the sync stores each as its own object.
        Blocking.
        """
        out: dict[str, tuple[int, int]] = {}
        if not self.root.is_dir():
            return out
        skip = {self.job_json.name, self.checkpoints_dir.name}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")
                           and not (rel_dir == Path(".") and d in skip)]
            for name in filenames:
                if name.startswith(".") or name.startswith("test_fault_paused."):
                    continue
                if rel_dir == Path(".") and name in skip:
                    continue
                st = (Path(dirpath) / name).stat()
                out[(rel_dir / name).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def is_artifact_file(self, rel: str) -> bool:
        """Whether ``rel`` (a :meth:`stage_files` key) is a file in ``artifacts/``."""
        return rel.startswith(self.artifacts_dir.name + "/")


class JobDir:
    """``DATA_DIR/jobs/JOB_ID``: the input and the workspace of one job."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.input_dir = self.root / "input"
        self.input_images = self.input_dir / "images"
        self.work = Workspace(self.root / "work")

    def input_video(self, container: str) -> Path:
        """``input/video.<container>`` (the container name comes from the probe, not the client)."""
        return self.input_dir / f"video.{container}"

    def local_input(self, stored: str | os.PathLike[str]) -> Path:
        """The job's input as stored on its row (an absolute path under the ``DATA_DIR`` of
        the replica that took the upload), mapped into this job folder: the part after the
        job's id, under :attr:`root`. A path without the job's id is returned as it is."""
        parts = Path(stored).parts
        name = self.root.name
        if name not in parts:
            return Path(stored)
        at = len(parts) - 1 - parts[::-1].index(name)
        return self.root.joinpath(*parts[at + 1:])


class ObjectKeys:
    """Object keys of one job in the bucket: the names of :class:`JobDir` under ``jobs/JOB_ID/``
    (see the module's table). ``JOB_ID`` is a server-made UUID, never a client's name."""

    #: the prefix of every job's objects
    ROOT = "jobs/"

    def __init__(self, job_id: str):
        self.prefix = f"{self.ROOT}{job_id}/"
        self.stages_prefix = self.prefix + "stages/"
        self.checkpoints_prefix = self.prefix + "work/checkpoints/"
        self.artifacts_prefix = self.prefix + "work/artifacts/"
        #: a copy of ``work/frames.json`` (it is in ``stages/frames.tar`` too), served by
        #: ``GET /jobs/ID/frames`` on a replica whose disk lacks it
        self.frames_json = self.prefix + "work/frames.json"

    def input(self, jdir: JobDir, path: Path) -> str:
        """Key of the input ``path`` (a file or the photo folder) of ``jdir``: its path under
        the job folder; a folder is stored as one ``.tar``."""
        rel = path.relative_to(jdir.root).as_posix()
        return self.prefix + rel + (".tar" if path.is_dir() else "")

    def stage(self, stage: str) -> str:
        """``stages/<stage>.tar``: what ``stage`` changed in the workspace."""
        return f"{self.stages_prefix}{stage}.tar"

    def checkpoint(self, stage: str) -> str:
        """``work/checkpoints/<stage>.json``: written last, it commits the stage."""
        return f"{self.checkpoints_prefix}{stage}.json"

    def artifact(self, name: str) -> str:
        """``work/artifacts/<name>``; ``name`` must be a plain file name (no separators)."""
        Workspace(".").artifact(name)  # raises ValueError for a name with separators
        return self.artifacts_prefix + name


class DataDir:
    """``DATA_DIR``: the uploads folder, the job folders and the default job-store file."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.uploads = self.root / "uploads"
        self.jobs = self.root / "jobs"
        self.database = self.root / DATABASE_FILE

    def job(self, job_id: str) -> JobDir:
        """The folder of job ``job_id``."""
        return JobDir(self.jobs / job_id)

    def make_dirs(self) -> None:
        """Create ``DATA_DIR``, ``uploads/`` and ``jobs/`` (blocking: call in a thread)."""
        for d in (self.root, self.uploads, self.jobs):
            d.mkdir(parents=True, exist_ok=True)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path``: temporary file in the same folder, fsync, ``os.replace``.

    Readers never see a half-written file. Blocking.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: str | os.PathLike[str]) -> Any:
    """``path`` parsed as JSON. Raises ``OSError`` or ``ValueError``."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_job(workspace: str | os.PathLike[str], video: str | os.PathLike[str], preset: Preset,
              use_gpu: bool = False, test_fault: str = "", random_seed: int = -1) -> Path:
    """Create the workspace folder and write ``job.json`` atomically; returns its path.

    ``job.json`` = ``{"input": absolute video path or photo folder, "preset": Preset.to_dict(),
    "use_gpu": bool, "test_fault": "ACTION:STAGE" or "", "random_seed": int}``.
    ``random_seed`` >= 0 makes matching and mapping repeatable: RANSAC and the mapper get that
    seed and run on one thread (pycolmap's multi-threaded verification and mapping differ from
    run to run; see DESIGN.md section 8). -1 = random seed, all cores.
    """
    ws = Workspace(workspace)
    ws.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ws.job_json, {"input": str(Path(video).resolve()),
                                    "preset": preset.to_dict(), "use_gpu": bool(use_gpu),
                                    "test_fault": test_fault, "random_seed": int(random_seed)})
    return ws.job_json


def read_job(workspace: str | os.PathLike[str]) -> dict[str, Any]:
    """``job.json`` as a dict with ``"preset"`` turned into a :class:`Preset`.

    Raises:
        PipelineError("pipeline_error"): missing or malformed ``job.json``.
    """
    ws = Workspace(workspace)
    try:
        job = read_json(ws.job_json)
        job["preset"] = Preset(**job["preset"])
        job["input"] = str(job["input"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError("pipeline_error", details={
            "reason": f"bad job.json: {exc}"}) from None
    job.setdefault("use_gpu", False)
    job.setdefault("test_fault", "")
    return dict(job)


def read_checkpoint(workspace: str | os.PathLike[str], stage: str) -> dict[str, Any] | None:
    """The checkpoint of ``stage`` or ``None`` if the stage has not completed."""
    try:
        data = read_json(Workspace(workspace).checkpoint(stage))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def next_stage(workspace: str | os.PathLike[str]) -> str | None:
    """First stage (in :data:`..protocol.STAGES` order) without a checkpoint; ``None`` when all
    are done."""
    for stage in STAGES:
        if read_checkpoint(workspace, stage) is None:
            return stage
    return None


def prepare_workspace(ws: str | os.PathLike[str], video: str, preset: Preset, *, use_gpu: bool,
                      test_fault: str, random_seed: int = -1) -> bool:
    """Write ``job.json`` for an attempt; drop every checkpoint when the input or preset
    differs from the one they were made with (settings changed between attempts), so only
    still-valid checkpoints are reused. Blocking: call in a thread.

    Returns: True when existing checkpoints were invalidated.
    """
    w = Workspace(ws)
    invalid = False
    try:
        old = read_json(w.job_json)
        invalid = (old.get("input") != str(Path(video).resolve())
                   or old.get("preset") != preset.to_dict())
    except (OSError, ValueError, AttributeError):
        pass
    if invalid and w.checkpoints_dir.exists():
        shutil.rmtree(w.checkpoints_dir, ignore_errors=True)
    write_job(ws, video, preset, use_gpu=use_gpu, test_fault=test_fault,
              random_seed=random_seed)
    return invalid
