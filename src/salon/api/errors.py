"""Errors become responses here and only here, always in OpenAI's error shape."""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from salon.errors import SalonError
from salon.store.db import DATABASE_ERRORS, database_unavailable

log = logging.getLogger(__name__)

# A database that is restarting is back within seconds (pool_pre_ping reconnects).
DATABASE_RETRY_AFTER_S = 2.0

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, object]:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    retry_after_s: float | None = None,
) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)


async def salon_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SalonError)
    # A refusal with a known wait (overload, an open circuit) is the system working as
    # designed; under load it would be one warning per request.
    if exc.status >= 500:
        level = logging.INFO if exc.retry_after_s is not None else logging.WARNING
        log.log(level, "%s: %s", exc.code, exc.message)
    return error_response(exc.status, exc.message, exc.code, exc.param, exc.retry_after_s)


async def http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), code)


async def unexpected_error(_request: Request, exc: Exception) -> Response:
    # The traceback goes to the log, never to the client.
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal error", "internal_error")


async def database_error(request: Request, exc: Exception) -> Response:
    """The database down or restarting is not a bug: a 503 with Retry-After, one log line,
    no traceback. Registered by class, so Starlette's ExceptionMiddleware answers it and the
    connection stays usable (the catch-all `Exception` handler re-raises to the server, which
    then drops the keep-alive connection). Anything else from the database is a 500."""
    if not database_unavailable(exc):
        return await unexpected_error(request, exc)
    first_line = next(iter(str(exc).splitlines()), "")
    log.warning("database unavailable: %s: %s", type(exc).__name__, first_line)
    return error_response(
        503,
        "the database is unavailable; try again shortly",
        "database_unavailable",
        retry_after_s=DATABASE_RETRY_AFTER_S,
    )


HANDLERS = {
    SalonError: salon_error,
    HTTPException: http_error,
    **dict.fromkeys(DATABASE_ERRORS, database_error),
    Exception: unexpected_error,
}
