"""Test helpers for the storage tests: stage bodies that write real workspace files and a
checkpoint (no child), and a store wrapper that fails chosen requests."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from colmap_pipeline.layout import Workspace, write_json_atomic
from colmap_pipeline.storage import ObjectInfo, Storage, StorageError

#: what each simulated stage writes (relative path -> bytes) and removes
STAGE_FILES: dict[str, dict[str, bytes]] = {
    "frames": {"frames/f_00001.jpg": b"jpeg-1" * 100, "frames/f_00002.jpg": b"jpeg-2" * 100,
               "frames.json": b'{"frames": ["f_00001.jpg", "f_00002.jpg"]}'},
    "features": {"database.db": b"sqlite-with-keypoints" * 50},
    "matching": {"database.db": b"sqlite-with-matches" * 80},
    "mapping": {"sparse/0/points3D.bin": b"points" * 30, "database.before_mapping.db": b"x"},
    "dense": {}, "meshing": {},
    "export": {"artifacts/sparse.ply": b"ply\n" + b"0" * 500, "artifacts/model.zip": b"PK" * 60,
               "result.json": b'{"registered_images": 2}'},
}
#: files a simulated stage removes (the mapping rung dropping a frame)
STAGE_REMOVES = {"mapping": ["frames/f_00002.jpg"]}


def write_stage(ws: Workspace, stage: str) -> None:
    """Simulate ``stage`` in ``ws``: its files written, its removals done, its checkpoint."""
    for rel, data in STAGE_FILES[stage].items():
        path = ws.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel in STAGE_REMOVES.get(stage, []):
        (ws.root / rel).unlink()
    write_json_atomic(ws.checkpoint(stage), {"stage": stage, "elapsed_s": 0.1, "summary": {}})


def tree(root: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root`` but hidden ones and job.json."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "job.json"}


class FlakyStorage(Storage):
    """``inner`` with chosen requests failing: ``fail(op, key)`` True -> :class:`StorageError`.
    ``calls`` lists ``(op, key)`` of every request."""

    def __init__(self, inner: Storage, fail: Callable[[str, str], bool]) -> None:
        self.inner = inner
        self.fail = fail
        self.remote = inner.remote
        self.calls: list[tuple[str, str]] = []

    def _go(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        if self.fail(op, key):
            raise StorageError(f"injected failure of {op} {key}")

    def upload_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        self._go("upload", key)
        self.inner.upload_file(key, path, content_type)

    def download_file(self, key: str, path: Path) -> bool:
        self._go("download", key)
        return self.inner.download_file(key, path)

    def read_bytes(self, key: str) -> bytes | None:
        self._go("read", key)
        return self.inner.read_bytes(key)

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._go("write", key)
        self.inner.write_bytes(key, data, content_type)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        self._go("list", prefix)
        return self.inner.list_objects(prefix)

    def list_dirs(self, prefix: str) -> list[str]:
        self._go("list_dirs", prefix)
        return self.inner.list_dirs(prefix)

    def info(self, key: str) -> ObjectInfo | None:
        self._go("info", key)
        return self.inner.info(key)

    def stream(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        self._go("stream", key)
        return self.inner.stream(key, chunk_bytes)

    def delete_prefix(self, prefix: str) -> int:
        self._go("delete", prefix)
        return self.inner.delete_prefix(prefix)

    def signed_url(self, key: str, ttl_s: int, *, filename: str,
                   media_type: str | None) -> str | None:
        return self.inner.signed_url(key, ttl_s, filename=filename, media_type=media_type)

    def check(self) -> None:
        self._go("check", "")
        self.inner.check()


def emulator_storage(emu: Any, **kw: Any) -> Storage:
    """A :class:`GcsStorage` on a fresh bucket of the emulator ``emu``."""
    from colmap_pipeline.storage.gcs import GcsStorage

    return GcsStorage(emu.new_bucket(), emulator_host=emu.url, retry_deadline_s=5, **kw)
