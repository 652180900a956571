"""Errors become OpenAI-shaped responses in one place; a wait the server knows about is sent
as Retry-After (a dead backend behind an open circuit breaker, for one)."""

from __future__ import annotations

import json

from salon.api.errors import salon_error
from salon.backends.router import CircuitOpen
from salon.errors import InvalidRequest


async def test_an_open_circuit_is_a_503_with_retry_after() -> None:
    response = await salon_error(None, CircuitOpen("pool: circuit open", retry_after_s=12.2))  # type: ignore[arg-type]
    assert response.status_code == 503
    assert response.headers["retry-after"] == "13"
    body = json.loads(bytes(response.body))
    assert body["error"]["type"] == "server_error"


async def test_errors_without_a_known_wait_have_no_retry_after() -> None:
    response = await salon_error(None, InvalidRequest("bad", param="x"))  # type: ignore[arg-type]
    assert response.status_code == 400
    assert "retry-after" not in response.headers
