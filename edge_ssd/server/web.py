"""The chat page: `/` and `/static/NAME`, files shipped inside the package (edge_ssd/web/).

No build step and no CDN: three plain files read with importlib.resources, so a wheel or a
zip install serves them as a source checkout does. Only the files listed in STATIC exist:
a path is never joined onto a folder, so nothing else on the disk can be asked for. The page
holds no secret (it asks for the API key and talks to the same /v1 endpoints any client
does), so it is served without the key; a strict Content-Security-Policy keeps it to its own
origin's scripts and connections.
"""
from __future__ import annotations

import functools
from importlib import resources

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    "cache-control": "no-cache",  # revalidate: a new version of the package shows at once
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
}


@functools.lru_cache(maxsize=None)
def asset(name: str) -> bytes:
    """One of the page's files, read once from the installed package."""
    return resources.files("edge_ssd.web").joinpath(name).read_bytes()


def routes() -> list:
    """Starlette routes for the page, for build_app's route list."""
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    def respond(name: str) -> Response:
        return Response(asset(name), media_type=STATIC[name], headers=HEADERS)

    async def index(request) -> Response:
        return respond("index.html")

    async def static(request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return respond(name)

    return [Route("/", index, methods=["GET"]), Route("/static/{name}", static, methods=["GET"])]
