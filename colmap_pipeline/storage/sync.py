"""A job's files between this replica's disk and the bucket (bucket mode; a no-op when the
store is the local disk, :attr:`.base.Storage.remote` False).

The unit is **one object per stage**: ``stages/STAGE.tar`` holds what the stage changed in the
workspace (new or modified files, and the list of files it removed), then
``work/checkpoints/STAGE.json`` is written as the stage's commit mark. Why a tar per stage and
not an object per file:

- a stage is committed by one object written after one other, so a half-uploaded stage (a
  replica killed mid-upload) is never taken for a finished one: without its checkpoint object
  a reader ignores its tar, and the stage runs again;
- the frames stage writes 30-300 JPEG files; one request instead of hundreds (GCS bills and
  rate-limits per request);
- a delta, not a snapshot: frames are uploaded once, not again with every later stage.

Artifacts are the exception: each is its own object (``work/artifacts/NAME``) so that a
client downloads it straight from the bucket (a signed URL) or the service streams it; and
``frames.json`` gets a copy of its own (``work/frames.json``) for ``GET /jobs/ID/frames``.
Inputs are stored as uploaded (``input/video.<container>``) or as one tar (``input/images``).

Keys come from :class:`..layout.ObjectKeys`; what the disk holds of the bucket is in
``WS/.storage.json`` (:class:`Manifest`). Every method blocks (call it in a thread) and raises
:class:`.base.StorageError` (an ``OSError``) when the store fails after its retries.
"""
from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import (
    JobDir,
    ObjectKeys,
    prepare_workspace,
    read_checkpoint,
    read_json,
    write_json_atomic,
)
from ..presets import Preset
from ..protocol import STAGES
from .base import Storage

log = logging.getLogger("colmap_worker.storage")

#: tar member listing the files a stage removed (hidden: never a workspace file of a stage)
REMOVED_MEMBER = ".removed.json"


@dataclass
class Manifest:
    """What of a workspace is in the bucket: the stages pushed (in order) and the files as
    they were then (``{relative path: (bytes, mtime ns)}``,
    :meth:`..layout.Workspace.stage_files`)."""

    pushed: list[str] = field(default_factory=list)
    files: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """The manifest at ``path``; empty when absent or unreadable."""
        try:
            doc = read_json(path)
            return cls(list(doc["pushed"]), {k: (int(v[0]), int(v[1]))
                                             for k, v in doc["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return cls()

    def save(self, path: Path) -> None:
        """Write atomically."""
        write_json_atomic(path, {"pushed": self.pushed, "files": self.files})


@contextmanager
def _scratch(folder: Path, suffix: str) -> Iterator[Path]:
    """A hidden temporary file in ``folder`` (never part of a snapshot), removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sync-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _extract(tar_path: Path, dest: Path) -> list[str]:
    """Extract a tar made here into ``dest`` (the ``data`` filter refuses absolute paths,
    ``..`` and links out of ``dest``); returns the removed-files list it carries."""
    removed: list[str] = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.name == REMOVED_MEMBER:
                fh = tar.extractfile(member)
                removed = list(json.loads(fh.read())) if fh else []
            else:
                tar.extract(member, dest, filter="data")
    return removed


class JobSync:
    """The sync of one job folder ``jdir`` with ``storage`` (see the module docstring)."""

    def __init__(self, storage: Storage, jdir: JobDir) -> None:
        self.storage = storage
        self.jdir = jdir
        self.ws = jdir.work
        self.keys = ObjectKeys(jdir.root.name)

    @property
    def active(self) -> bool:
        """Whether anything is copied (bucket mode)."""
        return self.storage.remote

    # ---- the input ----------------------------------------------------------------------------
    def upload_input(self, path: Path) -> None:
        """Store the job's input (``input/video.<container>``, or the ``input/images`` folder
        as one tar)."""
        if not self.active:
            return
        key = self.keys.input(self.jdir, path)
        if not path.is_dir():
            self.storage.upload_file(key, path, mimetypes.guess_type(path.name)[0])
            return
        with _scratch(self.jdir.root, ".tar") as tmp:
            with tarfile.open(tmp, "w") as tar:
                for f in sorted(path.iterdir()):
                    tar.add(f, arcname=f.name, recursive=False)
            self.storage.upload_file(key, tmp, "application/x-tar")

    def fetch_input(self, stored: str) -> str:
        """The input's path on this disk, downloaded first when the disk lacks it. ``stored``
        is the row's ``input_path`` (any replica's ``DATA_DIR``); returned unchanged when not
        :attr:`active`."""
        if not self.active:
            return stored
        local = self.jdir.local_input(stored)
        is_dir = local == self.jdir.input_images
        if (local.is_dir() and any(local.iterdir())) if is_dir else local.is_file():
            return str(local)
        if not is_dir:
            if not self.storage.download_file(self.keys.input(self.jdir, local), local):
                raise FileNotFoundError(f"the input of job {self.jdir.root.name} is not in "
                                        "the bucket")
            return str(local)
        local.mkdir(parents=True, exist_ok=True)
        with _scratch(self.jdir.root, ".tar") as tmp:
            if not self.storage.download_file(self.keys.input(self.jdir, local), tmp):
                raise FileNotFoundError(f"the photos of job {self.jdir.root.name} are not in "
                                        "the bucket")
            _extract(tmp, local)
        return str(local)

    # ---- the workspace ------------------------------------------------------------------------
    def prepare(self, stored_input: str, preset: Preset, *, use_gpu: bool, test_fault: str,
                random_seed: int = -1) -> str:
        """Everything before an attempt's first stage: the input (:meth:`fetch_input`), the
        workspace from the bucket when this disk is behind it (:meth:`restore`),
        :func:`..layout.prepare_workspace`, and the push of stages finished here but not yet
        in the bucket (:meth:`push`: an upload that failed last time). Returns the input's
        local path. In the embedded mode this is :func:`..layout.prepare_workspace` alone."""
        video = self.fetch_input(stored_input)
        self.restore()
        invalid = prepare_workspace(self.ws.root, video, preset, use_gpu=use_gpu,
                                    test_fault=test_fault, random_seed=random_seed)
        self.push(invalidated=invalid)
        return video

    def remote_stages(self) -> list[str]:
        """The stages committed in the bucket: the longest prefix of :data:`..protocol.STAGES`
        with a checkpoint object."""
        objects = self.storage.list_objects(self.keys.checkpoints_prefix)
        names = {o.key.rsplit("/", 1)[-1] for o in objects}
        done: list[str] = []
        for stage in STAGES:
            if f"{stage}.json" not in names:
                break
            done.append(stage)
        return done

    def restore(self) -> list[str]:
        """Rebuild the workspace from the bucket when the bucket has committed stages this
        disk has not (a fresh ``DATA_DIR``, or another replica went further): the stages' tars
        in order, the artifacts, then the checkpoints. Returns the stages restored (``[]``:
        the disk was current)."""
        if not self.active:
            return []
        done = self.remote_stages()
        if set(done) <= set(Manifest.load(self.ws.storage_manifest).pushed):
            return []
        log.info("job %s: restoring %s from the bucket", self.jdir.root.name, done)
        shutil.rmtree(self.ws.root, ignore_errors=True)
        self.ws.root.mkdir(parents=True)
        for stage in done:
            with _scratch(self.ws.root, ".tar") as tmp:
                if not self.storage.download_file(self.keys.stage(stage), tmp):
                    raise FileNotFoundError(f"{self.keys.stage(stage)} is missing")
                for rel in _extract(tmp, self.ws.root):
                    (self.ws.root / rel).unlink(missing_ok=True)
        for obj in self.storage.list_objects(self.keys.artifacts_prefix):
            name = obj.key[len(self.keys.artifacts_prefix):]
            self.storage.download_file(obj.key, self.ws.artifact(name))
        for stage in done:
            self.storage.download_file(self.keys.checkpoint(stage), self.ws.checkpoint(stage))
        Manifest(list(done), self.ws.stage_files()).save(self.ws.storage_manifest)
        return done

    def _local_stages(self) -> list[str]:
        done: list[str] = []
        for stage in STAGES:
            if read_checkpoint(self.ws.root, stage) is None:
                break
            done.append(stage)
        return done

    def push(self, *, invalidated: bool = False) -> list[str]:
        """Upload every stage finished on this disk and not yet in the bucket: its tar (and
        its artifacts), then its checkpoint. ``invalidated``: the checkpoints were dropped
        (settings changed), so the bucket's go too. Returns the stages pushed."""
        if not self.active:
            return []
        manifest = Manifest.load(self.ws.storage_manifest)
        if invalidated and manifest.pushed:
            self.storage.delete_prefix(self.keys.stages_prefix)
            self.storage.delete_prefix(self.keys.checkpoints_prefix)
            manifest = Manifest()
        done = self._local_stages()
        for stage in [s for s in manifest.pushed if s not in done]:  # re-run here: uncommit
            self.storage.delete_prefix(self.keys.checkpoint(stage))
        manifest.pushed = [s for s in manifest.pushed if s in done]
        pending = [s for s in done if s not in manifest.pushed]
        if not pending:
            return []
        files = self.ws.stage_files()
        changed = sorted(rel for rel, st in files.items() if manifest.files.get(rel) != st)
        removed = sorted(rel for rel in manifest.files if rel not in files)
        for i, stage in enumerate(pending):  # more than one only after a failed upload
            self._upload_stage(stage, changed if i == 0 else [], removed if i == 0 else [])
            self.storage.upload_file(self.keys.checkpoint(stage), self.ws.checkpoint(stage),
                                     "application/json")
        Manifest(manifest.pushed + pending, files).save(self.ws.storage_manifest)
        return pending

    def _upload_stage(self, stage: str, changed: list[str], removed: list[str]) -> None:
        """``stages/STAGE.tar`` with ``changed`` (but artifacts, each its own object) and the
        ``removed`` list."""
        for rel in (r for r in changed if self.ws.is_artifact_file(r)):
            name = rel.split("/", 1)[1]
            self.storage.upload_file(self.keys.artifact(name), self.ws.root / rel,
                                     mimetypes.guess_type(name)[0])
        for rel in (r for r in removed if self.ws.is_artifact_file(r)):
            self.storage.delete_prefix(self.keys.artifact(rel.split("/", 1)[1]))
        if self.ws.frames_json.name in changed:  # small, and read by any replica's API
            self.storage.upload_file(self.keys.frames_json, self.ws.frames_json,
                                     "application/json")
        with _scratch(self.ws.root, ".tar") as tmp:
            with tarfile.open(tmp, "w") as tar:
                for rel in changed:
                    if not self.ws.is_artifact_file(rel):
                        tar.add(self.ws.root / rel, arcname=rel, recursive=False)
                data = json.dumps([r for r in removed if not self.ws.is_artifact_file(r)])
                info = tarfile.TarInfo(REMOVED_MEMBER)
                info.size = len(data.encode())
                tar.addfile(info, io.BytesIO(data.encode()))
            self.storage.upload_file(self.keys.stage(stage), tmp, "application/x-tar")

    # ---- removal ------------------------------------------------------------------------------
    def delete(self) -> int:
        """Remove every object of the job (``jobs/JOB_ID/``); returns how many."""
        return self.storage.delete_prefix(self.keys.prefix) if self.active else 0

    def discard(self) -> None:
        """Remove the job folder and the job's objects; a store error is logged, not raised
        (used on paths that are failing already)."""
        shutil.rmtree(self.jdir.root, ignore_errors=True)
        try:
            self.delete()
        except OSError as exc:
            log.error("job %s: could not remove its objects: %s", self.jdir.root.name, exc)



def sweep_orphan_objects(storage: Storage, keep: set[str], min_age_s: float,
                         now: float | None = None) -> int:
    """Remove the objects of every job under ``jobs/`` whose id is not in ``keep`` (jobs that
    keep files, and those running here) and whose newest object is at least ``min_age_s``
    old: what a failed delete, or an upload racing a delete, left. The bucket is shared by
    every replica, so an upload whose row is not written yet must never be taken for an
    orphan: give ``min_age_s`` well above an upload's duration. Nothing in the embedded mode
    (the disk sweep covers it). Returns the number of jobs swept. Blocking.
    """
    if not storage.remote:
        return 0
    now = time.time() if now is None else now
    swept = 0
    for job_id in storage.list_dirs(ObjectKeys.ROOT):
        if job_id in keep:
            continue
        prefix = ObjectKeys(job_id).prefix
        newest = max((o.updated or now for o in storage.list_objects(prefix)), default=now)
        if now - newest >= min_age_s:
            storage.delete_prefix(prefix)
            swept += 1
    return swept
