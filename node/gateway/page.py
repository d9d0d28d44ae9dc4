"""The status page: ``GET /`` (the page) and ``GET /swarm/view`` (what it draws).

The page is one HTML file (``status.html`` beside this module: inline CSS and
plain JavaScript, nothing fetched from elsewhere) and its playground's script
(``playground.js``, ``GET /playground.js``: try a model, see where it ran). Both
hold no swarm data, so they are served without a token; everything the page
shows comes from ``/swarm/view`` and the WebSocket, both guarded. With a token
configured, open ``/?token=…``: the script keeps the token for the tab, takes it
out of the address bar, and sends it as a bearer header (and as ``?token=`` to the WebSocket, which
browsers cannot give headers).

The page's Content-Security-Policy allows its own inline script and style (by
hash), scripts of this origin (``'self'``: the playground's; nothing else here
serves script) and connections to this origin only: even if a peer's record got
markup past the page's escaping, no inline script could run nor send data elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .app import Backend, guarded
from .config import GatewayConfig
from .view import swarm_view

PAGE_FILE = "status.html"
PLAYGROUND_FILE = "playground.js"
STATIC_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}


@cache
def playground() -> str:
    """The playground's script (read once)."""
    return resources.files(__package__).joinpath(PLAYGROUND_FILE).read_text(encoding="utf-8")


@cache
def page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy (read once)."""
    html = resources.files(__package__).joinpath(PAGE_FILE).read_text(encoding="utf-8")
    return html, _policy(html)


def _policy(html: str) -> str:
    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        digests = (hashlib.sha256(text.encode()).digest() for text in found)
        return " ".join(f"'sha256-{base64.b64encode(d).decode()}'" for d in digests)

    return (
        "default-src 'none'; "
        f"script-src {hashes('script')} 'self'; style-src {hashes('style')}; "
        "connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def routes(backend: Backend, config: GatewayConfig) -> list[BaseRoute]:
    public, guard = guarded(config, public=True), guarded(config)

    @public
    async def status_page(request: HTTPRequest) -> Response:
        html, policy = page()
        headers = {
            "content-security-policy": policy,
            "cache-control": "no-store",
            "referrer-policy": "no-referrer",  # the URL may carry ?token=
            "x-content-type-options": "nosniff",
        }
        return HTMLResponse(html, headers=headers)

    @public
    async def playground_script(request: HTTPRequest) -> Response:
        media = "text/javascript; charset=utf-8"
        return Response(playground(), media_type=media, headers=STATIC_HEADERS)

    @guard
    async def view(request: HTTPRequest) -> Response:
        jobs = backend.feed.recent_jobs() if backend.feed is not None else []
        gateway = str(request.base_url).rstrip("/")
        snapshot = swarm_view(backend.status(), backend.table(), jobs, gateway=gateway)
        return JSONResponse(snapshot, headers={"cache-control": "no-store"})

    return [
        Route("/", status_page, methods=["GET"]),
        Route("/" + PLAYGROUND_FILE, playground_script, methods=["GET"]),
        Route("/swarm/view", view, methods=["GET"]),
    ]
