"""colmap_pipeline.web.docs: ``/docs`` loads Swagger UI from this server only (issue 10 item
11: it loaded it from a CDN, so it was blank offline)."""
from __future__ import annotations

import re

import pytest

from colmap_pipeline.web.docs import ASSETS_PATH

pytestmark = pytest.mark.asyncio


async def test_docs_reference_only_this_server_and_the_assets_load(api):
    r = await api.client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert not re.findall(r"https?://", html), re.findall(r"https?://\S+", html)
    refs = re.findall(r"""(?:href|src)=["']([^"']+)["']""", html)
    assert sorted(refs) == sorted(f"{ASSETS_PATH}/{n}" for n in (
        "swagger-ui.css", "favicon-32x32.png", "swagger-ui-bundle.js"))
    assert "url: '/openapi.json'" in html
    assert '"validatorUrl": null' in html  # the UI must not call validator.swagger.io either
    for ref in refs:
        asset = await api.client.get(ref)
        assert asset.status_code == 200, ref
        assert len(asset.content) > 500, ref
    js = await api.client.get(f"{ASSETS_PATH}/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in js.text
    spec = await api.client.get("/openapi.json")
    assert spec.status_code == 200 and "/upload-video" in spec.json()["paths"]


async def test_redoc_is_not_served_and_unknown_assets_are_404(api):
    assert (await api.client.get("/redoc")).status_code == 404
    r = await api.client.get(f"{ASSETS_PATH}/nope.js")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
