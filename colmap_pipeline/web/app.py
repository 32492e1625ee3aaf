"""The FastAPI app without its lifespan: routers, error handling, API keys, CORS, the upload
rate limiter, the security headers and the local ``/docs``. ``main.create_app`` adds the
lifespan that opens the store and starts the runner; tests put fakes into ``app.state`` and
call the app in process.

``app.state`` holds ``settings`` (:class:`..config.Settings`), ``keyring``
(:class:`.auth.KeyRing`), ``signer`` (:class:`.signing.LinkSigner`), ``upload_limiter``,
``draining`` (set by the first SIGTERM), and, once started, ``store``
(:class:`..jobs.JobStore`), ``runner`` (:class:`.deps.RunnerControl`) and ``gpu``
(:class:`.deps.GpuView`).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Lifespan

from .. import __version__
from ..config import Settings
from . import (
    artifacts,
    metrics,
    routes_events,
    routes_jobs,
    routes_service,
    routes_uploads,
    routes_webhooks,
    ui,
)
from .auth import KeyRing, check_cors
from .docs import install_docs
from .errors import install_error_handlers, method_table
from .head import HeadAsGet
from .hygiene import SecurityHeaders
from .rate_limit import UploadRateLimiter
from .signing import LinkSigner

log = logging.getLogger("colmap_worker.auth")


def build_app(settings: Settings, lifespan: Lifespan[FastAPI] | None = None) -> FastAPI:
    """The app with every route; ``lifespan`` (if given) fills ``store``, ``runner`` and
    ``gpu`` in ``app.state``.

    Raises: :class:`.auth.ConfigError` for malformed ``API_KEYS``/``ADMIN_API_KEYS``, or CORS
    ``*`` with credentials while keys are set.
    """
    keyring = KeyRing.from_settings(settings)
    check_cors(settings, keyring)
    app = FastAPI(title="COLMAP Worker API", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False,  # a 307 built from the Host header: 404 instead
                  description="Upload a video, poll the job, download a COLMAP "
                              "reconstruction.")
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.signer = LinkSigner(settings.url_signing_secret.get_secret_value(),
                                  settings.signed_url_ttl_s)
    app.state.upload_limiter = UploadRateLimiter(settings.max_requests_per_minute,
                                                 settings.rate_limit_storage_uri)
    app.state.draining = False
    _log_auth(keyring, app.state.signer)
    install_error_handlers(app)  # before CORS, so that CORS wraps every error answer too
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                       allow_credentials=settings.cors_allow_credentials,
                       allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(HeadAsGet)  # HEAD on every GET route (FastAPI adds none)
    metrics.install_metrics(app)  # HTTP latency by route (a middleware), /metrics registry
    app.add_middleware(SecurityHeaders)  # outermost: every answer, errors and 404s included
    routers = [m.router for m in (routes_service, routes_uploads, routes_jobs, artifacts,
                                     routes_events, routes_webhooks, metrics, ui)]
    for router in routers:
        app.include_router(router)
    app.state.route_methods = method_table(routers)
    install_docs(app, public=settings.docs_public or not keyring.enabled)
    ui.mount_ui_files(app)  # /ui/... files and three.js, after every route
    return app


def _log_auth(keyring: KeyRing, signer: LinkSigner) -> None:
    """Say at start whether keys are on (by name, never the key) and how links are signed."""
    if not keyring.enabled:
        log.warning("authentication is OFF (API_KEYS is empty): anyone who reaches this port "
                    "may upload, list, download and delete every job")
        return
    log.info("API keys on: %s", ", ".join(keyring.names))
    if signer.ephemeral:
        log.warning("URL_SIGNING_SECRET is empty: signed links use a random secret made at "
                    "this start; they stop working on restart and on other replicas")
