"""GET /metrics: Prometheus' text format. Open unless `metrics_token` is set, then it needs
`Authorization: Bearer <metrics_token>`."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from salon.api.errors import error_response
from salon.observability.metrics import Metrics


def routes(metrics: Metrics, token: str | None) -> list[BaseRoute]:
    expected = token.encode() if token else None

    async def scrape(request: Request) -> Response:
        if expected is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                return error_response(401, "a valid metrics token is required", "invalid_token")
        return Response(metrics.render(), headers={"content-type": metrics.content_type})

    return [Route("/metrics", scrape, methods=["GET"])]
