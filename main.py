"""Composition root: ``create_app(settings) -> FastAPI``; ``python main.py`` serves on PORT.

``uvicorn --factory main:create_app`` works too (settings then come from the environment).
The lifespan opens the job store, probes the GPU once (in a child), and starts/stops the runner.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from colmap_pipeline import __version__
from colmap_pipeline.api import build_router, install_error_handlers, make_limiter
from colmap_pipeline.config import Settings
from colmap_pipeline.gpu import probe_gpu
from colmap_pipeline.runner import JobRunner
from database import JobStore

log = logging.getLogger("colmap_worker")


def sweep_partial_uploads(upload_dir: Path) -> int:
    """Remove files left in ``upload_dir`` by a server that died mid-upload.

    Only requests in flight own files there, and none are in flight at start-up.
    Returns the number of files removed.
    """
    n = 0
    for p in upload_dir.iterdir():
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Settings are read from the environment when not given."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        data_dir = Path(settings.data_dir)
        for sub in ("uploads", "jobs"):
            (data_dir / sub).mkdir(parents=True, exist_ok=True)
        swept = await asyncio.to_thread(sweep_partial_uploads, data_dir / "uploads")
        if swept:
            log.warning("removed %d partial upload(s) left by a previous run", swept)
        app.state.draining = False
        app.state.store = await JobStore.open(Path(settings.database_path))
        app.state.gpu = await probe_gpu(cpu_only=settings.colmap_cpu_only)
        app.state.runner = JobRunner(app.state.store, settings, gpu_enabled=app.state.gpu.enabled)
        await app.state.runner.start()
        log.info("COLMAP worker %s ready: data_dir=%s gpu=%s", __version__, data_dir.resolve(),
                 app.state.gpu.enabled)
        try:
            yield
        finally:
            app.state.draining = True
            await app.state.runner.stop()
            await app.state.store.close()

    app = FastAPI(title="COLMAP Worker API", version=__version__, lifespan=lifespan,
                  description="Upload a video, poll the job, download a COLMAP reconstruction.")
    app.state.settings = settings
    app.state.limiter = make_limiter()
    app.state.draining = False
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                       allow_methods=["*"], allow_headers=["*"])
    install_error_handlers(app)
    app.include_router(build_router(settings, app.state.limiter))
    return app


def main() -> None:
    """Serve on ``HOST:PORT`` with uvicorn."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
