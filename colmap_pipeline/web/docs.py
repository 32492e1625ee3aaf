"""``GET /docs`` and ``GET /openapi.json``: Swagger UI served from this server, with its assets
from the ``swagger-ui-bundle`` package (no CDN), so the docs load offline and behind a strict
proxy. ReDoc has no such package and is not served. Both answer without a key unless
``DOCS_PUBLIC=false`` while API keys are set."""
from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from .auth import caller

#: where the Swagger UI assets (JS, CSS, icons) are served
ASSETS_PATH = "/docs-assets"
#: folder of the packaged Swagger UI distribution
ASSETS_DIR = Path(str(swagger_ui_path))
#: where the OpenAPI document is served
OPENAPI_PATH = "/openapi.json"


def install_docs(app: FastAPI, *, public: bool) -> None:
    """Serve the Swagger UI assets under :data:`ASSETS_PATH`, ``GET /docs`` using them and the
    OpenAPI document at :data:`OPENAPI_PATH`; unless ``public``, both need an API key.

    The app must be built with ``docs_url=None`` (FastAPI's own page loads the CDN) and
    ``openapi_url=None`` (served here, so that it can need a key).
    """
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    title = f"{app.title} - docs"
    guard = [] if public else [Depends(caller)]

    @app.get(OPENAPI_PATH, include_in_schema=False, dependencies=guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_PATH, title=title,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None})  # no call to validator.swagger.io
