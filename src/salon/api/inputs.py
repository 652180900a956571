"""Reading request bodies and parameters: bounded, validated, errors with a message."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from salon.api.context import services
from salon.errors import InvalidRequest, PayloadTooLarge

Model = TypeVar("Model", bound=BaseModel)


async def read_json(request: Request, model: type[Model]) -> Model:
    # Requiring a JSON content type also keeps cross-site HTML forms out: a browser
    # cannot send one without a CORS preflight, which salon never grants.
    if "json" not in request.headers.get("content-type", ""):
        raise InvalidRequest("send the body as JSON with 'Content-Type: application/json'")
    raw = await _read_body(request, services(request).max_body_bytes)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        raise InvalidRequest(message, param=where) from exc


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    return bytes(body)


def int_param(
    request: Request, name: str, default: int | None = None, low: int = 1, high: int = 200
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be an integer", param=name) from exc
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", param=name)
    return value


def path_int(request: Request, name: str) -> int:
    try:
        return int(request.path_params[name])
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be an integer", param=name) from exc
