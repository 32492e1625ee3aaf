"""Local-disk storage: objects are files under a root folder, the key being the path.

The embedded mode's store, rooted at ``DATA_DIR``: as the object keys
(:class:`..layout.ObjectKeys`) are the paths of :class:`..layout.DataDir`, an artifact's object
*is* its file in the workspace, so nothing is ever copied (:attr:`LocalStorage.remote` is
False and :mod:`.sync` does nothing). Tests use it on a scratch folder as a stand-in bucket.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .base import STREAM_CHUNK_BYTES, BucketUnavailable, ObjectInfo, Storage


class LocalStorage(Storage):
    """Objects as files under ``root`` (see the module docstring). Keys must be relative POSIX
    paths without ``..``."""

    remote = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not an object key: {key!r}")
        return self.root.joinpath(*parts)

    def upload_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        dest = self._path(key)
        if Path(path).resolve() != dest.resolve():
            _copy_atomic(Path(path), dest)

    def download_file(self, key: str, path: Path) -> bool:
        src = self._path(key)
        if not src.is_file():
            return False
        if src.resolve() != Path(path).resolve():
            _copy_atomic(src, Path(path))
        return True

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        out = []
        if self.root.is_dir():
            for p in self.root.rglob("*"):
                key = p.relative_to(self.root).as_posix()
                if p.is_file() and key.startswith(prefix):
                    st = p.stat()
                    out.append(ObjectInfo(key, st.st_size, updated=st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str) -> list[str]:
        folder = self._path(prefix.rstrip("/"))
        return sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []

    def info(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        return ObjectInfo(key, p.stat().st_size) if p.is_file() else None

    def stream(self, key: str, chunk_bytes: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        with self._path(key).open("rb") as fh:
            while chunk := fh.read(chunk_bytes):
                yield chunk

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list_objects(prefix)
        for o in objects:
            self._path(o.key).unlink(missing_ok=True)
        return len(objects)

    def signed_url(self, key: str, ttl_s: int, *, filename: str,
                   media_type: str | None) -> str | None:
        """Never: local files are served by the service itself."""
        return None

    def check(self) -> None:
        if not self.root.is_dir():
            raise BucketUnavailable("missing", f"{self.root} is not a folder")


def _copy_atomic(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
