"""``GET /docs``: Swagger UI served from this server, with its assets from the
``swagger-ui-bundle`` package (no CDN), so the docs load offline and behind a strict proxy.
ReDoc has no such package and is not served."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

#: where the Swagger UI assets (JS, CSS, icons) are served
ASSETS_PATH = "/docs-assets"
#: folder of the packaged Swagger UI distribution
ASSETS_DIR = Path(str(swagger_ui_path))


def install_docs(app: FastAPI) -> None:
    """Serve the Swagger UI assets under :data:`ASSETS_PATH` and ``GET /docs`` using them.

    The app must be built with ``docs_url=None`` (FastAPI's own page loads the CDN).
    """
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    title = f"{app.title} - docs"
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=title,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None})  # no call to validator.swagger.io
