"""The storage interface: a flat store of objects named by keys (``jobs/JOB_ID/...``, the names
of :class:`..layout.ObjectKeys`), as Google Cloud Storage is, with the few operations the service
needs. Two implementations: :class:`.local.LocalStorage` (a folder; the embedded mode's, where
the local disk is the store) and :class:`.gcs.GcsStorage` (a bucket).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: bytes per chunk when an object is streamed to a client
STREAM_CHUNK_BYTES = 1024 * 1024


class StorageError(OSError):
    """An object-store request failed after its retries (an ``OSError``: the runner's storage
    retry policy and the intake's clean-up treat it as disk trouble)."""


class BucketUnavailable(StorageError):
    """The bucket is missing, or this service may not use it (``reason``: ``missing``,
    ``access_denied`` or ``unreachable``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size (bytes), content type and last change (POSIX
    seconds); ``None`` when unknown."""

    key: str
    size: int
    content_type: str | None = None
    updated: float | None = None


class Storage(ABC):
    """An object store. Every method blocks (call it in a thread from async code) and raises
    :class:`StorageError` when the store fails after its retries.

    Attributes:
        remote: True when the objects live outside this machine (a bucket): then the local
            disk is only a cache and the job sync (:mod:`.sync`) copies files both ways.
            False for the embedded mode, where ``DATA_DIR`` is the one copy.
    """

    remote: bool = False

    @abstractmethod
    def upload_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        """Store the file ``path`` as ``key`` (replacing an object of that key)."""

    @abstractmethod
    def download_file(self, key: str, path: Path) -> bool:
        """Copy ``key`` to ``path`` (atomically: a temporary file renamed into place; parent
        folders created). Returns False when there is no such object."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` when there is no such object."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store ``data`` as ``key``."""

    @abstractmethod
    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (which ends with ``/``) that hold objects, as
        a folder listing would show them: ``list_dirs("jobs/")`` -> job ids. Sorted."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo | None:
        """The object's size and type, or ``None`` when there is no such object."""

    @abstractmethod
    def stream(self, key: str, chunk_bytes: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        """The object's bytes in chunks of at most ``chunk_bytes`` (each ``next`` blocks)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix``; returns how many."""

    @abstractmethod
    def signed_url(self, key: str, ttl_s: int, *, filename: str,
                   media_type: str | None) -> str | None:
        """A URL that downloads ``key`` without credentials for ``ttl_s`` seconds (naming
        ``filename`` in its ``Content-Disposition``), or ``None`` when this store cannot sign
        one (then the service streams the object)."""

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`BucketUnavailable` unless the store can be used now (readiness)."""

    def ready(self) -> bool:
        """:meth:`check` as a bool (readiness's ``storage`` check)."""
        try:
            self.check()
        except StorageError:
            return False
        return True
