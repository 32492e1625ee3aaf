"""The Google Cloud Storage store (``colmap_pipeline/storage/gcs.py``): V4 signed URLs with
service-account credentials (none with the emulator's anonymous ones), transient errors
retried with backoff, errors that outlast the retries, and refused access named as such."""
from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from storage_harness import emulator_storage

from colmap_pipeline.storage import BucketUnavailable, StorageError
from colmap_pipeline.storage.gcs import GcsStorage


def _service_account():
    """Service-account credentials with a fresh RSA key (what GOOGLE_APPLICATION_CREDENTIALS
    gives in production), built offline."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return service_account.Credentials.from_service_account_info({
        "type": "service_account", "project_id": "proj", "private_key_id": "k1",
        "private_key": pem, "client_email": "colmap@proj.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"})


def test_service_account_credentials_sign_v4_urls(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    store = GcsStorage("my-bucket", project="proj", credentials=_service_account())
    assert store.can_sign()
    url = store.signed_url("jobs/j1/work/artifacts/sparse.ply", 900, filename="sparse.ply",
                           media_type="application/octet-stream")
    assert url is not None
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert (parts.scheme, parts.netloc) == ("https", "storage.googleapis.com")
    assert parts.path == "/my-bucket/jobs/j1/work/artifacts/sparse.ply"
    assert q["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert q["X-Goog-Expires"] == "900"
    assert q["X-Goog-Credential"].startswith("colmap@proj.iam.gserviceaccount.com/")
    assert q["response-content-disposition"] == 'attachment; filename="sparse.ply"'
    assert len(q["X-Goog-Signature"]) == 512  # RSA-2048: 256 bytes, hex


def test_the_emulator_cannot_sign_so_artifacts_stream(gcs_emulator):
    store = emulator_storage(gcs_emulator)
    assert store.can_sign() is False
    assert store.signed_url("jobs/j/work/artifacts/x", 60, filename="x", media_type=None) is None


def _answer(status: int, method: str, url: str) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = b'{"error": {"code": %d, "message": "injected"}}' % status
    r.headers["content-type"] = "application/json"
    r.url = url
    r.request = requests.Request(method, url).prepare()
    return r


def _inject(store: GcsStorage, monkeypatch, status: int, times: int, method: str) -> list[str]:
    """The next ``times`` requests with ``method`` answer ``status``; returns the log of every
    request made."""
    http = store.client._http
    real = http.request
    seen: list[str] = []
    left = [times]

    def request(*a, **kw):  # called as (method, url, ...) and as (method=, url=, ...)
        m, url = kw.get("method") or a[0], kw.get("url") or a[1]
        seen.append(m)
        if m == method and left[0] > 0:
            left[0] -= 1
            return _answer(status, m, url)
        return real(*a, **kw)

    monkeypatch.setattr(http, "request", request)
    return seen


def test_transient_errors_are_retried_with_backoff(gcs_emulator, monkeypatch, tmp_path):
    store = emulator_storage(gcs_emulator, retry_initial_s=0.05)
    src = tmp_path / "a.bin"
    src.write_bytes(b"stage output")
    seen = _inject(store, monkeypatch, 503, times=2, method="POST")
    store.upload_file("jobs/j/stages/frames.tar", src)  # an upload: retried although no
    assert seen.count("POST") == 3                      # precondition (idempotent here)
    assert store.read_bytes("jobs/j/stages/frames.tar") == b"stage output"
    seen = _inject(store, monkeypatch, 429, times=1, method="GET")
    assert store.read_bytes("jobs/j/stages/frames.tar") == b"stage output"
    assert seen.count("GET") == 2


def test_errors_that_outlast_the_retries_become_storage_errors(gcs_emulator, monkeypatch,
                                                               tmp_path):
    store = GcsStorage(gcs_emulator.new_bucket(), emulator_host=gcs_emulator.url,
                       retry_deadline_s=0.6, retry_initial_s=0.05)
    src = tmp_path / "a.bin"
    src.write_bytes(b"x")
    seen = _inject(store, monkeypatch, 503, times=10**6, method="POST")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.upload_file("jobs/j/stages/frames.tar", src)
    assert time.monotonic() - t0 < 5
    assert len(seen) >= 3  # retried until the deadline
    assert "upload of jobs/j/stages/frames.tar" in str(err.value)
    assert isinstance(err.value, OSError)  # the runner's storage retry policy takes it


def test_refused_access_is_named_access_denied(gcs_emulator, monkeypatch):
    store = emulator_storage(gcs_emulator)
    _inject(store, monkeypatch, 403, times=10**6, method="GET")
    with pytest.raises(BucketUnavailable) as err:
        store.check()
    assert err.value.reason == "access_denied"
    with pytest.raises(BucketUnavailable) as err:
        store.info("jobs/j/x")
    assert err.value.reason == "access_denied"


def test_an_unreachable_endpoint_is_named_unreachable():
    store = GcsStorage("b", emulator_host="http://127.0.0.1:9", retry_deadline_s=0.3,
                       retry_initial_s=0.05)
    with pytest.raises(BucketUnavailable) as err:
        store.check()
    assert err.value.reason == "unreachable"
