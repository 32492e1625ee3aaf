"""Google Cloud Storage (``STORAGE_BUCKET``) through google-cloud-storage.

Credentials: ``GOOGLE_APPLICATION_CREDENTIALS`` (a service-account JSON, as in the deployment
guide) or any Application Default Credentials; with ``STORAGE_EMULATOR_HOST`` the client talks
to that endpoint anonymously (``gcp-storage-emulator`` in the tests and the two-replica demo).

Transient failures (HTTP 408/429/5xx, dropped connections) are retried by google-api-core's
``Retry`` with exponential backoff (google-cloud-storage's ``DEFAULT_RETRY``: 1 s initial,
x2, 60 s cap) for at most ``retry_deadline_s``. Every write here is idempotent (the same bytes
under the same key), so uploads are retried too, which the library only does by itself for
requests with preconditions. What still fails becomes :class:`.base.StorageError`.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials, Signing
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage as gcs
from google.cloud.storage.retry import DEFAULT_RETRY

from .base import STREAM_CHUNK_BYTES, BucketUnavailable, ObjectInfo, Storage, StorageError

#: seconds one operation may spend retrying transient errors
RETRY_DEADLINE_S = 60.0
#: first backoff delay (s), doubled after each failure up to :data:`RETRY_MAX_DELAY_S`, with
#: jitter (google-cloud-storage's ``DEFAULT_RETRY`` values)
RETRY_INITIAL_S = 1.0
RETRY_MAX_DELAY_S = 60.0
#: seconds per HTTP request (connect and read)
REQUEST_TIMEOUT_S = 60.0
#: seconds the readiness check may take
CHECK_TIMEOUT_S = 5.0
#: errors that mean "the request failed" (after the retries)
_FAILURES = (gexc.GoogleAPIError, GoogleAuthError, requests.RequestException)


@contextmanager
def _failures(what: str) -> Iterator[None]:
    """Turn the client's exceptions into :class:`StorageError` naming ``what``."""
    try:
        yield
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise BucketUnavailable("access_denied", f"{what}: access refused: {exc}") from exc
    except _FAILURES as exc:
        raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc


class GcsStorage(Storage):
    """A bucket of Google Cloud Storage.

    Args:
        bucket: the bucket's name (``STORAGE_BUCKET``); it must exist (never created here).
        project: ``GCS_PROJECT_ID`` (``""``: the credentials' project).
        emulator_host: ``STORAGE_EMULATOR_HOST`` (``http://host:port``; ``""``: Google).
        credentials: explicit credentials (tests); default: as described in the module.
        retry_deadline_s: see :data:`RETRY_DEADLINE_S`.
        retry_initial_s: see :data:`RETRY_INITIAL_S`.
    """

    remote = True

    def __init__(self, bucket: str, *, project: str = "", emulator_host: str = "",
                 credentials: Any = None, retry_deadline_s: float = RETRY_DEADLINE_S,
                 retry_initial_s: float = RETRY_INITIAL_S) -> None:
        self.bucket_name = bucket
        self.emulator = bool(emulator_host)
        options: dict[str, Any] = {}
        if emulator_host:
            url = emulator_host if "://" in emulator_host else f"http://{emulator_host}"
            options = {"client_options": {"api_endpoint": url}}
            credentials = credentials or AnonymousCredentials()
        self.client = gcs.Client(project=project or ("emulator" if emulator_host else None),
                                 credentials=credentials, **options)
        self.credentials = credentials if credentials is not None else self.client._credentials
        self.bucket = self.client.bucket(bucket)
        self.retry: Retry = DEFAULT_RETRY.with_timeout(retry_deadline_s).with_delay(
            initial=retry_initial_s, maximum=RETRY_MAX_DELAY_S, multiplier=2.0)
        self.check_deadline_s = min(CHECK_TIMEOUT_S, retry_deadline_s)

    def upload_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        with _failures(f"upload of {key}"):
            self.bucket.blob(key).upload_from_filename(
                str(path), content_type=content_type, retry=self.retry,
                timeout=REQUEST_TIMEOUT_S)

    def download_file(self, key: str, path: Path) -> bool:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            with _failures(f"download of {key}"):
                self.bucket.blob(key).download_to_filename(tmp, retry=self.retry,
                                                           timeout=REQUEST_TIMEOUT_S)
            os.replace(tmp, path)
            return True
        except StorageError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return False
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            with _failures(f"read of {key}"):
                return bytes(self.bucket.blob(key).download_as_bytes(
                    retry=self.retry, timeout=REQUEST_TIMEOUT_S))
        except StorageError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return None
            raise

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        with _failures(f"write of {key}"):
            self.bucket.blob(key).upload_from_string(
                data, content_type=content_type or "application/octet-stream",
                retry=self.retry, timeout=REQUEST_TIMEOUT_S)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        with _failures(f"list of {prefix}"):
            blobs = self.client.list_blobs(self.bucket, prefix=prefix, retry=self.retry,
                                           timeout=REQUEST_TIMEOUT_S)
            out = [ObjectInfo(b.name, int(b.size or 0), b.content_type,
                              b.updated.timestamp() if b.updated else None) for b in blobs]
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str) -> list[str]:
        with _failures(f"list of {prefix}"):
            pages = self.client.list_blobs(self.bucket, prefix=prefix, delimiter="/",
                                           retry=self.retry, timeout=REQUEST_TIMEOUT_S)
            for _ in pages:  # the prefixes fill in as the pages are read
                pass
            return sorted(p[len(prefix):].rstrip("/") for p in pages.prefixes)

    def info(self, key: str) -> ObjectInfo | None:
        with _failures(f"metadata of {key}"):
            blob = self.bucket.get_blob(key, retry=self.retry, timeout=REQUEST_TIMEOUT_S)
        return None if blob is None else ObjectInfo(key, int(blob.size or 0), blob.content_type)

    def stream(self, key: str, chunk_bytes: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        with _failures(f"download of {key}"), self.bucket.blob(key).open(
                "rb", chunk_size=chunk_bytes, retry=self.retry) as fh:
            while chunk := fh.read(chunk_bytes):
                yield chunk

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        for obj in self.list_objects(prefix):
            try:
                with _failures(f"delete of {obj.key}"):
                    self.bucket.blob(obj.key).delete(retry=self.retry, timeout=REQUEST_TIMEOUT_S)
                n += 1
            except StorageError as exc:
                if not isinstance(exc.__cause__, gexc.NotFound):  # gone already: fine
                    raise
        return n

    def can_sign(self) -> bool:
        """Whether the credentials hold a private key (a service-account JSON): V4 signing
        needs one. Never against the emulator."""
        return not self.emulator and isinstance(self.credentials, Signing)

    def signed_url(self, key: str, ttl_s: int, *, filename: str,
                   media_type: str | None) -> str | None:
        """A V4 signed GET URL valid ``ttl_s`` seconds (at most 7 days, the V4 limit), or
        ``None`` when the credentials cannot sign (:meth:`can_sign`)."""
        if not self.can_sign():
            return None
        with _failures(f"signing of {key}"):
            return str(self.bucket.blob(key).generate_signed_url(
                version="v4", expiration=timedelta(seconds=ttl_s), method="GET",
                credentials=self.credentials, response_type=media_type,
                response_disposition=f'attachment; filename="{filename}"'))

    def check(self) -> None:
        """Raises :class:`BucketUnavailable`: ``missing`` (404), ``access_denied`` (401/403),
        ``unreachable`` (anything else within :data:`CHECK_TIMEOUT_S`)."""
        try:
            self.client.get_bucket(self.bucket_name, timeout=CHECK_TIMEOUT_S,
                                   retry=self.retry.with_timeout(self.check_deadline_s))
        except gexc.NotFound as exc:
            raise BucketUnavailable("missing", f"bucket {self.bucket_name!r} not found") from exc
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            raise BucketUnavailable("access_denied", f"bucket {self.bucket_name!r}: "
                                                     f"access refused: {exc}") from exc
        except _FAILURES as exc:
            raise BucketUnavailable("unreachable", f"bucket {self.bucket_name!r}: "
                                                   f"{type(exc).__name__}: {exc}") from exc
