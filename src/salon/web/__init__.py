"""The browser app: static files served as they are (no build step)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# The UI renders model output: scripts only from our own origin, no inline script,
# nothing framed, so sanitised markdown stays harmless even if a sanitiser bug slips by.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


async def index(_request: Request) -> Response:
    return FileResponse(
        STATIC / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/", index),
        Route("/c/{conversation_id}", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
