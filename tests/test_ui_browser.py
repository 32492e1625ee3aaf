"""The web page ``/ui`` in a real headless browser (issue 16 items 4 and 5): Debian's chromium
driven by Playwright (``executable_path``: Playwright never downloads a browser), WebGL through
SwiftShader (no GPU). One real job on the sample, with API keys on: the key is typed once, the
video is uploaded through the page, the page follows the job to ``completed`` and the 3D viewer
draws the sparse cloud and the cameras.

Skips with the reason when chromium, Playwright or ``node_modules/three`` (``npm ci``) is absent
on a developer machine; fails instead in CI (``CI`` set), where ``.ci/run`` installs them.
``UPDATE_SCREENSHOT=1`` writes the job page's screenshot to ``docs/ui-job.png`` (the README's).
"""
from __future__ import annotations

import base64
import mimetypes
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from conftest import REPO, SAMPLE_VIDEO

from colmap_pipeline.web import ui

CHROMIUM = Path("/usr/bin/chromium")
THREE = REPO / "node_modules" / "three" / "build" / "three.module.js"
SCREENSHOT = REPO / "docs" / "ui-job.png"
#: software WebGL in a headless chromium without a GPU
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
                 "--disable-dev-shm-usage"]
KEY = "ui-browser-key-7d2f9c41"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
#: the viewer's canvas must differ from a flat image: grey-level variance above this
MIN_CANVAS_VARIANCE = 20.0
#: the whole sample job at ``low`` on 2 loaded cores, with room
JOB_TIMEOUT_MS = 300_000

# grey-level mean and variance of the WebGL canvas (drawn onto a 2D canvas; the renderer keeps
# its drawing buffer)
CANVAS_STATS_JS = """() => {
  const gl = document.querySelector('#viewer canvas');
  const c = document.createElement('canvas');
  c.width = gl.width; c.height = gl.height;
  const ctx = c.getContext('2d');
  ctx.drawImage(gl, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let n = 0, s = 0, s2 = 0, bright = 0;
  for (let i = 0; i < d.length; i += 4) {
    const g = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
    n += 1; s += g; s2 += g * g; if (g > 80) bright += 1;
  }
  const mean = s / n;
  return {width: c.width, height: c.height, mean, variance: s2 / n - mean * mean, bright};
}"""


# every value the job page's progress bar shows, in order (an init script: it runs before the
# page's own, and is not subject to the page's CSP)
RECORD_PROGRESS_JS = """window.__progress = [];
new MutationObserver((changes) => {
  for (const c of changes) {
    if (c.target.id === 'job-bar') window.__progress.push(Number(c.target.getAttribute('value')));
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['value']});"""


#: points of the synthetic dense cloud
DENSE_POINTS = 20000
#: the page's viewer module on the synthetic dense cloud and mesh (base64 arguments); its stats
DENSE_VIEWER_JS = """async ([ply, glb]) => {
  const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)).buffer;
  const files = {"fused.ply": bytes(ply), "mesh.glb": bytes(glb)};
  const layer = (name) => ({name, url: name, bytes: files[name].byteLength});
  const mod = await import("/ui/viewer.js");
  const viewer = await mod.createViewer(
    document.querySelector("#viewer"), document.querySelector("#viewer-layers"),
    {sparse: null, transforms: null, dense: layer("fused.ply"), mesh: layer("mesh.glb")},
    async (url) => files[url]);
  return viewer.stats();
}"""
#: an origin nothing listens on: the viewer test's files are served by the browser's router
FILES_ORIGIN = "http://127.0.0.1:9"


def _require(ok: bool, why: str) -> None:
    """Skip with ``why`` on a developer machine; fail in CI, where everything must be there."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must have it: .ci/run installs it)")
        pytest.skip(why)


def _local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("data", "blob") or parsed.hostname in LOCAL_HOSTS


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium through Playwright, once for the module (skipped, or failed in CI,
    without chromium, Playwright or node_modules/three)."""
    _require(CHROMIUM.is_file(), f"{CHROMIUM} is absent (apt-get install chromium)")
    _require(THREE.is_file(), "node_modules/three is absent (run npm ci)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "playwright is not installed (pip install -r requirements-dev.txt)")
    pw = sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        pw.stop()


def _watched_page(context: Any) -> tuple[Any, dict[str, list[str]]]:
    """A new page of ``context`` whose console errors, requests and requests to another host
    are recorded (those are aborted as well)."""
    seen: dict[str, list[str]] = {"errors": [], "requests": [], "foreign": []}
    context.route(lambda url: not _local(url), lambda route: route.abort())
    context.add_init_script(RECORD_PROGRESS_JS)
    page = context.new_page()
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: seen["errors"].append(f"page error: {exc}"))

    def on_request(request: Any) -> None:
        seen["requests"].append(request.url)
        if not _local(request.url):
            seen["foreign"].append(request.url)

    page.on("request", on_request)
    return page, seen


def _upload_through_the_page(page: Any, base: str) -> str:
    """From ``/``: type the key, upload the sample at low; the new job's id."""
    page.goto(base + "/")
    assert page.url == base + "/ui"  # a browser asking for / is sent on to the page
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    assert page.evaluate("localStorage.getItem('colmap-worker.api-key')") == KEY
    page.set_input_files("#upload-files", str(SAMPLE_VIDEO))
    page.fill("#upload-name", "browser test")
    page.select_option("#upload-quality", "low")
    page.click("#upload-button")
    page.wait_for_url(re.compile(r".*/ui#/jobs/[A-Za-z0-9_-]+$"))
    assert page.eval_on_selector("#upload-bar", "b => b.value") == 100
    return page.url.rsplit("/", 1)[1]


def _check_live(page: Any, job: dict[str, Any], requests: list[str]) -> None:
    """Live progress came from the events stream (when the job view offers one) followed to
    its end, and the bar never went backwards."""
    assert page.text_content("#job-live") == ""  # cleared once the job ended
    live = page.eval_on_selector("#job-live", "e => ({...e.dataset})")
    if "events_url" in job:
        assert any("/events" in u for u in requests), requests
        assert live["mode"] == "events" and int(live["events"]) >= 5, live
    shown = page.evaluate("window.__progress")
    assert shown == sorted(shown) and shown[-1] == 100, shown
    assert len(set(shown)) >= 4, shown


def _check_viewer(page: Any, res: dict[str, Any]) -> None:
    """Every point of the nerfstudio PLY and one frustum per registered image, drawn."""
    viewer = page.eval_on_selector("#viewer", "v => ({...v.dataset})")
    assert int(viewer["cameras"]) == res["registered_images"], viewer
    assert int(viewer["points"]) == res["points3d"], (viewer, res["points3d"])
    stats = page.evaluate(CANVAS_STATS_JS)
    assert stats["width"] >= 400 and stats["height"] >= 300, stats
    assert stats["variance"] > MIN_CANVAS_VARIANCE, stats
    assert stats["bright"] > 100, stats  # points and frustums are lit pixels


def _check_timeline(page: Any, job: dict[str, Any]) -> None:
    """Every stage done, those that ran with their time."""
    for li in page.query_selector_all("#timeline li[data-stage]"):
        assert li.get_attribute("class") == "done", li.inner_text()
    wall = job["attempts"][-1]["stage_wall_s"]
    for stage in ("frames", "features", "matching", "mapping", "export"):
        text = page.text_content(f"#timeline li[data-stage={stage}] .time") or ""
        value, unit = text.split()
        shown_s = float(value) * (60 if unit == "min" else 1)
        assert abs(shown_s - wall[stage]) <= 0.06 * (60 if unit == "min" else 1), (stage, text)


def _check_frames(page: Any, frames: dict[str, Any]) -> None:
    """One dot per frame and measure (kept ones marked kept), and each kept frame's image."""
    scores = frames["frames"]
    kept = sum(f["kept"] for f in scores)
    measured = len(scores) + sum(f["motion_px"] is not None for f in scores)
    assert len(page.query_selector_all("#frames-plot circle[data-reason]")) == measured
    kept_dots = len(page.query_selector_all("#frames-plot circle[data-reason=kept]"))
    assert kept_dots == kept + sum(f["kept"] and f["motion_px"] is not None for f in scores)
    strip = min(kept, 60)
    page.wait_for_selector(f"#frames-strip figure:nth-child({strip}) img")
    assert len(page.query_selector_all("#frames-strip img")) == strip
    widths = page.eval_on_selector_all("#frames-strip img", "a => a.map(i => i.naturalWidth)")
    assert min(widths) > 0


def _check_results_and_downloads(page: Any, base: str, job: dict[str, Any]) -> None:
    res = job["results"]
    table = page.inner_text("#results")
    assert f"{res['registered_images']} of {res['frames_used']}" in table
    assert str(res["points3d"]) in table
    links = page.eval_on_selector_all("#downloads a", "a => a.map(x => x.getAttribute('href'))")
    assert [u.split("?")[0] for u in links] == [
        f"/jobs/{job['job_id']}/artifacts/{a['name']}" for a in job["artifacts"]]
    assert all("?token=" in u for u in links)  # signed: keys are on
    first = httpx.get(base + links[0])  # a signed link works without the key
    assert first.status_code == 200 and len(first.content) == job["artifacts"][0]["bytes"]


@pytest.fixture
def viewer_page(browser) -> Iterator[Any]:
    """A page holding only the viewer's box, with the /ui page's import map and style; the
    page's files and three.js are answered from disk by the browser context's router (no
    server)."""
    importmap = re.search(r'<script type="importmap">.*?</script>',
                          (ui.UI_DIR / "index.html").read_text(), re.S)
    assert importmap is not None
    html = ('<!doctype html><html><head><link rel="icon" href="data:,">'
            f'<link rel="stylesheet" href="/ui/style.css">{importmap.group(0)}</head><body>'
            '<div class="viewer-panel" style="width: 800px"><div id="viewer" class="viewer">'
            '</div><div id="viewer-layers"></div></div></body></html>')

    def serve(route: Any) -> None:
        path = urlparse(route.request.url).path
        if path == "/viewer":
            route.fulfill(body=html, content_type="text/html")
            return
        base, rel = ((ui.THREE_DIR, path.removeprefix(ui.VENDOR_THREE + "/"))
                     if path.startswith(ui.VENDOR_THREE + "/")
                     else (ui.UI_DIR, path.removeprefix("/ui/")))
        file = (base / rel).resolve()
        assert file.is_relative_to(base) and file.is_file(), path
        route.fulfill(body=file.read_bytes(),
                      content_type=mimetypes.guess_type(file.name)[0] or "text/javascript")

    context = browser.new_context(viewport={"width": 900, "height": 800})
    context.route(f"{FILES_ORIGIN}/**", serve)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.goto(f"{FILES_ORIGIN}/viewer")
    yield page
    context.close()
    assert not errors, errors


def test_upload_watch_and_view_a_job_in_a_browser(start_server, browser):
    srv = start_server(API_KEYS=f"web:{KEY}")
    context = browser.new_context(viewport={"width": 1360, "height": 1500})
    try:
        page, seen = _watched_page(context)
        job_id = _upload_through_the_page(page, srv.url)
        t0 = time.monotonic()
        # (selectors, not wait_for_function: the page's CSP forbids eval)
        page.wait_for_selector("#job-status.completed", timeout=JOB_TIMEOUT_MS)
        page.wait_for_selector("#viewer[data-ready=true]", timeout=120_000)
        print(f"job completed in the page after {time.monotonic() - t0:.1f} s")
        with srv.client(headers={"X-API-Key": KEY}) as c:
            job = c.get(f"/jobs/{job_id}").json()
            frames = c.get(f"/jobs/{job_id}/frames").json()
        assert job["status"] == "completed", job
        _check_live(page, job, seen["requests"])
        _check_viewer(page, job["results"])
        _check_timeline(page, job)
        _check_frames(page, frames)
        _check_results_and_downloads(page, srv.url, job)
        if os.environ.get("UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        context.close()
    assert not seen["foreign"], seen["foreign"]
    assert not seen["errors"], seen["errors"]


def _binary_ply(xyz: np.ndarray, rgb: np.ndarray) -> bytes:
    """A binary little-endian PLY of coloured points, laid out as COLMAP's fused.ply (x y z,
    normals, red green blue)."""
    names = ("x", "y", "z", "nx", "ny", "nz", "red", "green", "blue")
    vertex = np.zeros(len(xyz), dtype=[(n, "<f4" if i < 6 else "u1") for i, n in enumerate(names)])
    for i, n in enumerate(names[:3]):
        vertex[n] = xyz[:, i]
    for i, n in enumerate(names[6:]):
        vertex[n] = rgb[:, i]
    props = "".join(f"property {'float' if i < 6 else 'uchar'} {n}\n" for i, n in enumerate(names))
    return (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(xyz)}\n{props}"
            "end_header\n").encode() + vertex.tobytes()


def test_the_viewer_shows_a_dense_cloud_and_a_mesh(viewer_page):
    """The dense layers (made on a GPU only) in the viewer of the page: a fused.ply-like cloud
    and a trimesh GLB (as core/dense.py writes mesh.glb) are parsed and drawn, and switching
    the mesh off changes the picture."""
    import trimesh

    rng = np.random.default_rng(16)
    xyz = rng.normal(size=(DENSE_POINTS, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    ply = _binary_ply(xyz, np.column_stack([np.full(DENSE_POINTS, 250), (xyz[:, :2] + 1) * 100]))
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    mesh.visual.vertex_colors = np.tile([80, 160, 255, 255], (len(mesh.vertices), 1))
    glb = mesh.export(file_type="glb")
    page = viewer_page
    stats = page.evaluate(DENSE_VIEWER_JS, [base64.b64encode(ply).decode(),
                                            base64.b64encode(glb).decode()])
    assert stats == {"points": 0, "cameras": 0, "dense_points": DENSE_POINTS,
                     "mesh_triangles": len(mesh.faces)}, stats
    with_mesh = page.evaluate(CANVAS_STATS_JS)
    assert with_mesh["variance"] > MIN_CANVAS_VARIANCE and with_mesh["bright"] > 1000, with_mesh
    page.click("#viewer-layers label:has-text('mesh.glb') input")
    for _ in range(40):  # the layer's switch re-renders at once; allow a frame or two
        without = page.evaluate(CANVAS_STATS_JS)
        if abs(without["mean"] - with_mesh["mean"]) > 1.0:
            break
        page.wait_for_timeout(50)
    assert abs(without["mean"] - with_mesh["mean"]) > 1.0, (with_mesh, without)
