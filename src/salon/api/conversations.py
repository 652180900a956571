"""The web app's conversations, messages and generations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from salon.api import sse, views
from salon.api.auth import current_user
from salon.api.context import services
from salon.api.inputs import int_param, path_int, read_json
from salon.chat.jobs import Delta, JobEvent
from salon.errors import InvalidRequest

KEEP_ALIVE_S = 15.0


class NewConversation(BaseModel):
    title: str | None = Field(default=None, max_length=500)
    model: str | None = None
    # Nothing from a temporary chat is remembered, and it stays out of the history.
    temporary: bool = False
    # Personalization overrides for this conversation (see /api/personalization).
    settings: dict[str, Any] | None = None


class ConversationChange(BaseModel):
    title: str | None = Field(default=None, max_length=500)
    model: str | None = None
    settings: dict[str, Any] | None = None


class NewMessage(BaseModel):
    content: str
    parent_id: int | None = None
    model: str | None = None


class BranchChoice(BaseModel):
    message_id: int


async def list_models(request: Request) -> Response:
    await current_user(request)
    gateway = services(request).gateway
    data = [{"id": m, "default": m == gateway.default_model} for m in gateway.models()]
    return JSONResponse({"data": data})


def _cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    stamp, _, conversation_id = raw.partition("|")
    try:
        return datetime.fromisoformat(stamp), conversation_id
    except ValueError as exc:
        raise InvalidRequest("before is not a cursor from a previous page", param="before") from exc


async def list_conversations(request: Request) -> Response:
    user = await current_user(request)
    limit = int_param(request, "limit", 50) or 50
    query = (request.query_params.get("q") or "").strip() or None
    found = await services(request).chat.conversations(
        user.id, query=query, limit=limit, before=_cursor(request.query_params.get("before"))
    )
    next_cursor = None
    if len(found) == limit:
        last = found[-1]
        next_cursor = f"{views.when(last.updated_at)}|{last.id}"
    return JSONResponse({"data": [views.conversation(c) for c in found], "next": next_cursor})


async def create_conversation(request: Request) -> Response:
    user = await current_user(request)
    body = await read_json(request, NewConversation)
    record = await services(request).chat.create_conversation(
        user.id, body.title, body.model, temporary=body.temporary, settings=body.settings
    )
    return JSONResponse(views.conversation(record), 201)


async def conversation(request: Request) -> Response:
    user = await current_user(request)
    chat = services(request).chat
    conversation_id = request.path_params["conversation_id"]
    if request.method == "DELETE":
        await chat.delete_conversation(user.id, conversation_id)
        return Response(status_code=204)
    if request.method == "PATCH":
        body = await read_json(request, ConversationChange)
        if body.settings is not None:
            await chat.set_conversation_settings(user.id, conversation_id, body.settings)
        record = await chat.rename_or_switch_model(user.id, conversation_id, body.title, body.model)
    else:
        record = await chat.conversation(user.id, conversation_id)
    return JSONResponse(views.conversation(record))


async def list_messages(request: Request) -> Response:
    user = await current_user(request)
    before = int_param(request, "before", None, low=1, high=2**62)
    limit = int_param(request, "limit", 50) or 50
    page, has_more = await services(request).chat.page(
        user.id, request.path_params["conversation_id"], before, limit
    )
    return JSONResponse({"data": [views.message(m) for m in page], "has_more": has_more})


async def post_message(request: Request) -> Response:
    user = await current_user(request)
    body = await read_json(request, NewMessage)
    turn = await services(request).chat.post(
        user.id,
        request.path_params["conversation_id"],
        body.content,
        parent_id=body.parent_id,
        use_leaf="parent_id" not in body.model_fields_set,
        model=body.model,
    )
    return JSONResponse(
        {
            "user_message": views.message(turn.user_message),
            "assistant_message": views.message(turn.assistant_message),
        },
        201,
    )


async def branch(request: Request) -> Response:
    user = await current_user(request)
    body = await read_json(request, BranchChoice)
    record = await services(request).chat.branch(
        user.id, request.path_params["conversation_id"], body.message_id
    )
    return JSONResponse(views.conversation(record))


async def stop(request: Request) -> Response:
    user = await current_user(request)
    record = await services(request).chat.stop(user.id, path_int(request, "message_id"))
    return JSONResponse(views.message(record))


async def regenerate(request: Request) -> Response:
    user = await current_user(request)
    record = await services(request).chat.regenerate(user.id, path_int(request, "message_id"))
    return JSONResponse(views.message(record), 201)


async def resume(request: Request) -> Response:
    user = await current_user(request)
    record = await services(request).chat.resume(user.id, path_int(request, "message_id"))
    return JSONResponse(views.message(record))


def _offset(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        return max(0, int(raw))
    except ValueError as exc:
        raise InvalidRequest("Last-Event-ID must be an offset from this stream") from exc


async def stream(request: Request) -> Response:
    user = await current_user(request)
    message_id = path_int(request, "message_id")
    chat = services(request).chat
    events = await chat.follow(user.id, message_id, _offset(request))

    async def body() -> AsyncIterator[bytes]:
        async for item in sse.with_keep_alive(events, KEEP_ALIVE_S):
            if item is None:
                yield sse.KEEP_ALIVE
            else:
                yield await _encode(item)

    async def _encode(item: JobEvent) -> bytes:
        if isinstance(item, Delta):
            return sse.event("delta", {"text": item.text}, item.offset)
        final = views.message(await chat.message(user.id, message_id))
        if item.error is not None:
            data = {"message": item.error, "code": item.code, "partial": final}
            return sse.event("error", data, item.offset)
        return sse.event("done", final, item.offset)

    return StreamingResponse(body(), media_type="text/event-stream", headers=sse.HEADERS)


def routes() -> list[BaseRoute]:
    conv = "/api/conversations/{conversation_id}"
    msg = "/api/messages/{message_id}"
    return [
        Route("/api/models", list_models),
        Route("/api/conversations", list_conversations),
        Route("/api/conversations", create_conversation, methods=["POST"]),
        Route(conv, conversation, methods=["GET", "PATCH", "DELETE"]),
        Route(conv + "/messages", list_messages),
        Route(conv + "/messages", post_message, methods=["POST"]),
        Route(conv + "/branch", branch, methods=["POST"]),
        Route(msg + "/stream", stream),
        Route(msg + "/stop", stop, methods=["POST"]),
        Route(msg + "/regenerate", regenerate, methods=["POST"]),
        Route(msg + "/continue", resume, methods=["POST"]),
    ]
