"""The FastAPI app without its lifespan: routers, error handling, CORS, the upload rate
limiter and the local ``/docs``. ``main.create_app`` adds the lifespan that opens the store and
starts the runner; tests put fakes into ``app.state`` and call the app in process.

``app.state`` holds ``settings`` (:class:`..config.Settings`), ``upload_limiter``, ``draining``
(set by the first SIGTERM), and, once started, ``store`` (:class:`..jobs.JobStore`), ``runner``
(:class:`.deps.RunnerControl`) and ``gpu`` (:class:`.deps.GpuView`).
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Lifespan

from .. import __version__
from ..config import Settings
from . import routes_jobs, routes_service, routes_uploads
from .docs import install_docs
from .errors import install_error_handlers, method_table
from .head import HeadAsGet
from .rate_limit import UploadRateLimiter


def build_app(settings: Settings, lifespan: Lifespan[FastAPI] | None = None) -> FastAPI:
    """The app with every route; ``lifespan`` (if given) fills ``store``, ``runner`` and
    ``gpu`` in ``app.state``."""
    app = FastAPI(title="COLMAP Worker API", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Upload a video, poll the job, download a COLMAP "
                              "reconstruction.")
    app.state.settings = settings
    app.state.upload_limiter = UploadRateLimiter(settings.max_requests_per_minute)
    app.state.draining = False
    install_error_handlers(app)  # before CORS, so that CORS wraps every error answer too
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                       allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(HeadAsGet)  # HEAD on every GET route (FastAPI adds none)
    routers = [m.router for m in (routes_service, routes_uploads, routes_jobs)]
    for router in routers:
        app.include_router(router)
    app.state.route_methods = method_table(routers)
    install_docs(app)
    return app
