"""Composition root: ``create_app(settings) -> FastAPI``; ``python main.py`` serves on PORT.

``uvicorn --factory main:create_app`` works too (settings then come from the environment; add
``--http colmap_pipeline.web.http11:JsonErrorH11Protocol`` to keep JSON answers to malformed
requests, which ``python main.py`` sets up in :func:`server_config`).
The lifespan opens the job store, sweeps orphans, probes the GPU once (in a child), and
starts/stops the runner (which first kills children a crashed server left and resumes its jobs).
With ``DATABASE_URL`` set the runner is ``runner.worker.QueueRunner``: this replica's share of
a procrastinate queue in PostgreSQL (every replica runs one; a dead replica's jobs resume on
another after ``QUEUE_STALL_TIMEOUT_S``).

Graceful shutdown (SIGTERM, what Northflank sends): :class:`DrainingServer` marks the app as
draining at once (``/readiness`` 503, uploads 503 + ``Retry-After``) while it keeps serving HTTP,
gives running stages ``SHUTDOWN_GRACE_S`` to finish, and only then lets uvicorn exit; the
lifespan shutdown then stops what still runs, leaving those jobs ``pending`` and resumable.
A second SIGTERM/SIGINT exits at once (jobs still resume at the next start).
"""
from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any
from urllib.parse import unquote_plus

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from colmap_pipeline import __version__
from colmap_pipeline.config import Settings
from colmap_pipeline.layout import DataDir
from colmap_pipeline.runner.gpu import probe_gpu
from colmap_pipeline.runner.housekeeping import sweep_partial_uploads
from colmap_pipeline.runner.metrics import MeteredStore
from colmap_pipeline.runner.scheduler import JobRunner
from colmap_pipeline.runner.webhooks import WebhookDispatcher
from colmap_pipeline.web.app import build_app
from colmap_pipeline.web.http11 import JsonErrorH11Protocol
from colmap_pipeline.web.routes_webhooks import webhook_renderer
from database import open_store

log = logging.getLogger("colmap_worker")


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains the app before exiting.

    uvicorn's own handler closes the listening socket at once, so a readiness probe would see
    a refused connection rather than a 503; here the socket stays open during the drain.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._drain_task: asyncio.Task | bool | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._app.state
        if self._drain_task is not None or getattr(state, "runner", None) is None:
            return super().handle_exit(sig, frame)  # second signal, or not started: exit now
        state.draining = True  # visible to the very next request
        log.warning("received %s: draining for up to %.0f s", signal.Signals(sig).name,
                    state.settings.shutdown_grace_s)
        loop = asyncio.get_running_loop()  # a Python signal handler runs in the loop's thread

        def begin() -> None:
            self._drain_task = loop.create_task(self._drain(sig, frame))
        self._drain_task = True  # a second signal exits at once
        loop.call_soon_threadsafe(begin)  # wakes the loop; never touch it from the handler

    async def _drain(self, sig: int, frame: FrameType | None) -> None:
        try:
            await self._app.state.runner.drain(self._app.state.settings.shutdown_grace_s)
        finally:
            super().handle_exit(sig, frame)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app (:func:`colmap_pipeline.web.app.build_app`) with the lifespan that opens
    the job store, probes the GPU and runs the job runner. Settings are read from the
    environment when not given."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        data = DataDir(settings.data_dir)
        await asyncio.to_thread(data.make_dirs)
        swept = await asyncio.to_thread(sweep_partial_uploads, data.uploads)
        if swept:
            log.warning("removed %d partial upload(s) left by a previous run", swept)
        app.state.draining = False
        # the GPU probe (a child, ~0.6 s) runs while the store opens
        gpu_probe = asyncio.create_task(probe_gpu(cpu_only=settings.colmap_cpu_only))
        try:
            app.state.store = MeteredStore(  # metrics: jobs finished, stage times (issue 16)
                await open_store(settings))  # PostgreSQL when DATABASE_URL is set
        except BaseException:
            gpu_probe.cancel()
            raise
        app.state.gpu = await gpu_probe
        if settings.database_url:  # PostgreSQL mode: procrastinate queue shared by replicas
            from colmap_pipeline.runner.worker import open_queue_mode  # this mode only
            app.state.store, app.state.runner = await open_queue_mode(
                app.state.store, settings, gpu_enabled=app.state.gpu.enabled)
        else:
            app.state.runner = JobRunner(app.state.store, settings,
                                         gpu_enabled=app.state.gpu.enabled)
        # signed webhooks from the store's outbox (issue 16): PostgreSQL mode runs its passes
        # through the queue (a periodic procrastinate task), embedded mode in its own loop
        webhooks = WebhookDispatcher(app.state.store, settings, webhook_renderer(app))
        if settings.database_url:
            app.state.runner.deliver_webhooks(webhooks)
        else:
            webhooks.start()
        await app.state.runner.start()  # kills recorded child groups, requeues, schedules
        await app.state.runner.housekeeping(startup=True)  # retention, orphan workspaces
        app.state.runner.start_housekeeping()
        log.info("COLMAP worker %s ready: data_dir=%s gpu=%s", __version__, data.root.resolve(),
                 app.state.gpu.enabled)
        try:
            yield
        finally:
            app.state.draining = True
            await app.state.runner.stop(grace_s=settings.shutdown_grace_s)
            await webhooks.stop(settings.webhook_timeout_s)  # unsent tries stay in the outbox
            await app.state.store.close()

    return build_app(settings, lifespan)


#: a query parameter whose value never goes to the access log (signed links' HMAC token)
#: query parameter names whose values never reach a log: signed-link tokens, and anything a
#: client may have put a key in by mistake (compared lower-case, after percent-decoding)
_SECRET_QUERY_WORDS = ("token", "key", "secret", "password", "auth")
_QUERY_PAIR = re.compile(r"([?&;])([^=&;#\s]*)=([^&;#\s\"]*)")


def redact_query_tokens(text: str) -> str:
    """``text`` with the value of every query parameter whose name holds one of
    :data:`_SECRET_QUERY_WORDS` (``token``, ``api_key``, ``apiKey``, ``password`` …) replaced
    by ``***`` (the name compared case-insensitively after percent-decoding, as a server would
    read it): ``/a?x=1&token=abc`` -> ``/a?x=1&token=***``."""
    def repl(m: re.Match[str]) -> str:
        name = unquote_plus(m[2]).lower()
        if not any(word in name for word in _SECRET_QUERY_WORDS):
            return m[0]
        return f"{m[1]}{m[2]}=***"
    return _QUERY_PAIR.sub(repl, text) if "=" in text else text


def redact_access_log(record: logging.LogRecord) -> bool:
    """``logging`` filter of ``uvicorn.access``: signed links' tokens become ``***`` in the
    request line (the record's string arguments and message); never drops a record."""
    if isinstance(record.args, tuple):
        record.args = tuple(redact_query_tokens(a) if isinstance(a, str) else a
                            for a in record.args)
    if isinstance(record.msg, str):
        record.msg = redact_query_tokens(record.msg)
    return True


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for ``app``: ``HOST:PORT``, the log level, the h11 protocol that
    answers unparsable requests with the JSON error shape (:mod:`colmap_pipeline.web.http11`),
    and the proxy headers: ``X-Forwarded-For``/``-Proto`` are believed only from the
    addresses/networks of ``FORWARDED_ALLOW_IPS`` (the client address the upload limiter
    counts). Installs :func:`redact_access_log` on the ``uvicorn.access`` logger (once).
    """
    options: dict[str, Any] = {"host": settings.host, "port": settings.port,
                               "log_level": settings.log_level.lower(),
                               "http": JsonErrorH11Protocol, "proxy_headers": True,
                               "forwarded_allow_ips": settings.forwarded_allow_ips, **overrides}
    config = uvicorn.Config(app, **options)  # configures uvicorn's loggers
    access = logging.getLogger("uvicorn.access")
    if redact_access_log not in access.filters:
        access.addFilter(redact_access_log)
    return config


def main() -> None:
    """Serve on ``HOST:PORT`` with uvicorn. A malformed setting (``API_KEYS``, CORS ``*`` with
    credentials while keys are set, ``RATE_LIMIT_STORAGE_URI``) stops the start with one log
    line saying what to change, and exit status 2; so does a setting out of its range (named
    with its rule, never its value)."""
    try:
        settings = Settings()
    except ValidationError as exc:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        rules = "; ".join(f"{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                          for e in exc.errors(include_input=False))
        log.error("refusing to start: %s", rules)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except ValueError as exc:  # ConfigError and the limiter's URI check; never holds a key
        log.error("refusing to start: %s", exc)
        sys.exit(2)
    DrainingServer(server_config(app, settings), app).run()


if __name__ == "__main__":
    main()
