"""The web page at ``/ui``: a static single page (``web/ui/``: ``index.html``, ``app.js``,
``viewer.js``, ``style.css``; plain ES modules, no bundler) that uploads, lists and watches jobs
and shows a finished one in a three.js 3D viewer; plus the one route it needs beyond the API,
``GET /jobs/{job_id}/frames/{file}`` (a kept frame's JPEG, for the page's frame strip).

three.js comes from npm at install time (``npm ci`` puts it in ``node_modules/three``; it is
never copied into the repository) and is served from ``/ui/vendor/three/...`` through the
page's import map, so the page makes no request to another host. Without ``node_modules`` the
page still loads and its viewer says how to install the library (a warning is logged at start);
the API never depends on it.

The page's answer carries a Content-Security-Policy that allows scripts, styles, images and
connections from this origin only (plus the inline import map, by its hash).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from ..errors import PipelineError
from ..layout import DataDir, read_json
from .auth import AUTH_RESPONSES, LinkOrCallerDep
from .deps import SettingsDep, StoreDep
from .file_answer import FileAnswer
from .schemas import ErrorResponse
from .views import live_job

log = logging.getLogger("colmap_worker.api")

#: the page's own files
UI_DIR = Path(__file__).resolve().parent / "ui"
#: where ``npm ci`` (run in the repository root, or /app in the image) installs three.js
THREE_DIR = Path(__file__).resolve().parents[2] / "node_modules" / "three"
#: the page's path
UI_PATH = "/ui"
#: URL prefix of the three.js package's files (its ``build/`` and ``examples/jsm/``)
VENDOR_THREE = "/ui/vendor/three"
#: a kept frame's file name as the frames stage writes it (e.g. frame_00012.jpg)
FRAME_FILE = re.compile(r"^[A-Za-z0-9_.-]{1,100}\.(?:jpg|jpeg|png)$")

router = APIRouter(responses=AUTH_RESPONSES)


def three_installed(three_dir: Path | None = None) -> bool:
    """Whether ``npm ci`` installed three.js (its ES module build is in ``three_dir``,
    default :data:`THREE_DIR`)."""
    return ((three_dir or THREE_DIR) / "build" / "three.module.js").is_file()


def prefers_html(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for a page rather than JSON: ``text/html`` is listed
    with a q-value above 0 and at least that of ``application/json`` (and of ``*/*`` when JSON
    is not listed). Browsers send ``text/html,…,*/*;q=0.8``; curl sends ``*/*``, httpx and
    most clients ``*/*`` or ``application/json``: those keep getting JSON."""
    if not accept:
        return False
    q: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[media.lower()] = max(weight, q.get(media.lower(), 0.0))
    html = q.get("text/html", 0.0)
    json_q = q.get("application/json", q.get("application/*", q.get("*/*", 0.0)))
    return html > 0 and html >= json_q


def browser_redirect(request: Request) -> RedirectResponse | None:
    """307 to ``/ui`` for a browser (:func:`prefers_html`), else ``None`` (JSON as before)."""
    if prefers_html(request.headers.get("accept")):
        return RedirectResponse(UI_PATH, status_code=307)
    return None


_IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.S)


@lru_cache(maxsize=1)
def page() -> tuple[bytes, str]:
    """``index.html``'s bytes and its Content-Security-Policy (read once; blocking)."""
    html = (UI_DIR / "index.html").read_text(encoding="utf-8")
    found = _IMPORT_MAP.search(html)
    hashes = ""
    if found:
        digest = hashlib.sha256(found.group(1).encode()).digest()
        hashes = f" 'sha256-{base64.b64encode(digest).decode()}'"
    csp = ("default-src 'self'; " f"script-src 'self'{hashes}; " "style-src 'self'; "
           "img-src 'self' blob: data:; connect-src 'self'; worker-src 'self' blob:; "
           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
    return html.encode(), csp


@router.get(UI_PATH, include_in_schema=False)
async def ui_page() -> Response:
    """The page (``index.html``), never cached, with its Content-Security-Policy."""
    body, csp = await asyncio.to_thread(page)
    return HTMLResponse(body, headers={"Content-Security-Policy": csp,
                                       "Cache-Control": "no-cache"})


@router.get(UI_PATH + "/", include_in_schema=False)
async def ui_slash() -> RedirectResponse:
    """``/ui/`` (a typed address) to the page, ``/ui``."""
    return RedirectResponse(UI_PATH, status_code=307)


def _kept_files(doc: dict[str, Any]) -> set[str]:
    """File names of the frames a ``frames.json`` says were kept (video: the kept scores
    and ``frames``; photos: ``frames``)."""
    names = {s.get("file") for s in doc.get("scores", []) if isinstance(s, dict) and s.get("kept")}
    names |= {f.get("file") for f in doc.get("frames", []) if isinstance(f, dict)}
    return {n for n in names if isinstance(n, str)}


def _frame_path(data_dir: str | Path, job_id: str, file: str) -> Path | None:
    """The kept frame ``file`` of the job's workspace, or ``None`` when ``file`` is not one of
    its kept frames or the image is not on this disk (blocking)."""
    work = DataDir(data_dir).job(job_id).work
    try:
        doc = read_json(work.frames_json)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or file not in _kept_files(doc):
        return None
    path = work.frames_dir / file
    return path if path.is_file() else None


@router.get("/jobs/{job_id}/frames/{file}", response_class=FileResponse,
            responses={404: {"model": ErrorResponse}, 200: {"content": {"image/jpeg": {}}}},
            tags=["jobs"], summary="One kept frame's image")
async def get_frame_image(job_id: str, file: str, store: StoreDep, settings: SettingsDep,
                          caller: LinkOrCallerDep) -> Response:
    """The JPEG of one frame handed to SfM (a ``file`` of ``GET /jobs/{job_id}/frames``), as
    the frames stage wrote it (scaled to the preset's size). Only kept frames of the job are
    served, from this server's disk: 404 ``not_found`` for any other name, and where the
    image is not on this disk (bucket mode on another replica, or removed by retention)."""
    await live_job(store, job_id, caller)
    path = None
    if FRAME_FILE.match(file):
        path = await asyncio.to_thread(_frame_path, settings.data_dir, job_id, file)
    if path is None:
        raise PipelineError("not_found", "The job has no kept frame of this name here.",
                            "Take a kept frame's file name from GET /jobs/{job_id}/frames.")
    media = "image/png" if file.endswith(".png") else "image/jpeg"
    return FileAnswer(path, media_type=media, headers={"Cache-Control": "private, max-age=0"})


def mount_ui_files(app: FastAPI) -> None:
    """Mount the page's files at ``/ui/...`` and three.js's ES modules (its ``build/`` and
    ``examples/jsm/``, when installed) at ``/ui/vendor/three/...``; call after the routers are
    included (``/ui`` itself is a route of :data:`router`)."""
    if three_installed():
        for sub in ("build", "examples/jsm"):
            app.mount(f"{VENDOR_THREE}/{sub}", StaticFiles(directory=THREE_DIR / sub),
                      name=f"ui-three-{sub.replace('/', '-')}")
    else:
        log.warning("the /ui page's 3D viewer is off: three.js is not installed in %s (run "
                    "`npm ci` in the repository root)", THREE_DIR.parent)
    app.mount(UI_PATH, StaticFiles(directory=UI_DIR), name="ui")
