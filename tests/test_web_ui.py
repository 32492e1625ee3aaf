"""colmap_pipeline.web.ui in process (the page's routes, not the browser: tests/test_ui_browser.py
drives the page itself): the browser redirect of ``/``, the page and its CSP, the static files,
three.js from node_modules, and a kept frame's image."""
from __future__ import annotations

import base64
import hashlib
import re

import pytest
from web_harness import add_job

from colmap_pipeline.jobs import JobStatus
from colmap_pipeline.layout import DataDir, write_json_atomic
from colmap_pipeline.web import ui

pytestmark = pytest.mark.asyncio

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
JPEG = b"\xff\xd8\xff\xe0" + b"frame" * 20 + b"\xff\xd9"


@pytest.mark.parametrize("accept, page", [
    (BROWSER_ACCEPT, True),                                   # Chromium, Firefox
    ("text/html", True),
    ("text/html;q=0.9, application/json", False),            # JSON preferred
    ("application/json, text/html;q=0.5", False),
    ("text/html;q=0", False),
    ("*/*", False),                                           # curl, httpx
    ("application/json", False),
    ("", False),
    (None, False),
    ("text/html;q=abc", False),                               # a q that is not a number
])
async def test_prefers_html(accept, page):
    assert ui.prefers_html(accept) is page


async def test_a_browser_is_sent_to_the_page_and_api_clients_get_json(api):
    for path in ("/", "/ui/"):
        r = await api.client.get(path, headers={"Accept": BROWSER_ACCEPT})
        assert r.status_code == 307 and r.headers["location"] == "/ui", path
    for accept in ("*/*", "application/json"):
        r = await api.client.get("/", headers={"Accept": accept})
        assert r.status_code == 200 and r.json()["message"] == "COLMAP Worker API"


async def test_the_page_and_its_csp(api):
    r = await api.client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    # the inline import map is allowed by its own hash, and nothing else inline
    importmap = re.search(r'<script type="importmap">(.*?)</script>', r.text, re.S)
    assert importmap is not None
    digest = base64.b64encode(hashlib.sha256(importmap.group(1).encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # every address the page names is on this origin
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text)
    assert "/ui/vendor/three/build/three.module.js" in importmap.group(1)
    for path, kind in (("/ui/app.js", "javascript"), ("/ui/viewer.js", "javascript"),
                       ("/ui/style.css", "text/css")):
        r = await api.client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
        assert r.headers["x-content-type-options"] == "nosniff"
    assert (await api.client.get("/ui/nothing.js")).status_code == 404


async def test_three_is_served_from_node_modules_when_installed(api):
    if not ui.three_installed():
        pytest.skip("node_modules/three is absent (run npm ci)")
    for path in ("build/three.module.js", "examples/jsm/loaders/PLYLoader.js",
                 "examples/jsm/loaders/GLTFLoader.js", "examples/jsm/controls/OrbitControls.js"):
        r = await api.client.get(f"{ui.VENDOR_THREE}/{path}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], path
        assert r.content == (ui.THREE_DIR / path).read_bytes()
    # only the ES modules: not the package's other files
    assert (await api.client.get(f"{ui.VENDOR_THREE}/package.json")).status_code == 404


async def test_three_installed_needs_the_module_build(tmp_path):
    assert not ui.three_installed(tmp_path)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "three.module.js").write_text("export {};")
    assert ui.three_installed(tmp_path)


async def test_without_node_modules_the_page_loads_and_the_log_says_why(make_api, monkeypatch,
                                                                       tmp_path, caplog):
    monkeypatch.setattr(ui, "THREE_DIR", tmp_path / "node_modules" / "three")
    api = await make_api()
    assert "three.js is not installed" in caplog.text and "npm ci" in caplog.text
    assert (await api.client.get("/ui")).status_code == 200
    assert (await api.client.get("/ui/app.js")).status_code == 200
    r = await api.client.get(f"{ui.VENDOR_THREE}/build/three.module.js")
    assert r.status_code == 404  # the viewer's import fails; the page says to run npm ci
    app_js = (await api.client.get("/ui/app.js")).text
    assert 'import("./viewer.js")' in app_js and "npm ci" in app_js


def _frames(data_dir, job_id: str) -> None:
    work = DataDir(data_dir).job(job_id).work
    work.frames_dir.mkdir(parents=True, exist_ok=True)
    for name in ("frame_00000.jpg", "frame_00001.jpg"):
        (work.frames_dir / name).write_bytes(JPEG + name.encode())
    (work.root / "secret.jpg").write_bytes(b"not a frame")
    write_json_atomic(work.frames_json, {
        "frames": [{"file": "frame_00000.jpg"}],
        "scores": [{"timestamp_s": 0.0, "window": 0, "sharpness": 100.0, "brightness": 100.0,
                    "kept": True, "file": "frame_00000.jpg"},
                   {"timestamp_s": 0.1, "window": 0, "sharpness": 50.0, "brightness": 100.0,
                    "kept": False, "reason": "not_sharpest", "file": "frame_00001.jpg"}]})


async def test_a_kept_frame_image_and_nothing_else(api):
    job = await add_job(api.store, JobStatus.PROCESSING)
    url = f"/jobs/{job.job_id}/frames"
    assert (await api.client.get(f"{url}/frame_00000.jpg")).status_code == 404  # no frames yet
    _frames(api.data_dir, job.job_id)
    r = await api.client.get(f"{url}/frame_00000.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == JPEG + b"frame_00000.jpg"
    # a dropped frame, a path out of frames/, a name not of a frame: the same 404
    for name in ("frame_00001.jpg", "..%2Fsecret.jpg", "secret.jpg", "frames.json", "x" * 300):
        r = await api.client.get(f"{url}/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", name


async def test_a_frame_image_follows_the_job_owner(make_api):
    api = await make_api(api_keys="alice:alice-key-1234,bob:bob-key-5678")
    job = await add_job(api.store, JobStatus.PROCESSING, owner="alice")
    _frames(api.data_dir, job.job_id)
    url = f"/jobs/{job.job_id}/frames/frame_00000.jpg"
    assert (await api.client.get(url)).status_code == 401
    assert (await api.client.get(url, headers={"X-API-Key": "bob-key-5678"})).status_code == 404
    r = await api.client.get(url, headers={"X-API-Key": "alice-key-1234"})
    assert r.status_code == 200 and r.content.startswith(b"\xff\xd8")
    # the page itself needs no key (it holds no data; it asks for the key)
    assert (await api.client.get("/ui")).status_code == 200
