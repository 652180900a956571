"""Personalization settings, personas, the instruction-stack preview, and memory."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from salon.api import views
from salon.api.auth import current_user
from salon.api.context import services
from salon.api.inputs import int_param, path_int, read_json
from salon.errors import InvalidRequest, NotFound
from salon.personalization.memory import Change, Found, MemoryService
from salon.personalization.profile import MAX_FREE_TEXT
from salon.personalization.stack import TurnContext
from salon.store.memories import MemoryRecord

MAX_MEMORY_CHARS = 500
MAX_QUERY_CHARS = 1000


class Preview(BaseModel):
    conversation_id: str | None = None
    content: str = Field("", max_length=100_000)
    model: str | None = None
    # For a chat not created yet: what it will be created with.
    temporary: bool = False
    settings: dict[str, Any] | None = None


class NewMemoryBody(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_MEMORY_CHARS)
    kind: Literal["fact", "preference", "instruction", "event"] = "fact"
    language: str = Field("en", max_length=8)


class MemoryEdit(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_MEMORY_CHARS)


class Anything(BaseModel):
    """A JSON object, validated further by the service (which owns the settings' shape)."""

    model_config = {"extra": "allow"}


def _memory_view(record: MemoryRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "kind": record.kind,
        "subject": record.subject,
        "text": record.text,
        "language": record.language,
        "status": record.status,
        "origin": record.origin,
        "supersedes_id": record.supersedes_id,
        "source_message_id": record.source_message_id,
        "conversation_id": record.conversation_id,
        "created_at": views.when(record.created_at),
        "updated_at": views.when(record.updated_at),
    }


def _change_view(change: Change) -> dict[str, Any]:
    return {
        "action": change.action,
        "memory": _memory_view(change.memory),
        "previous": _memory_view(change.previous) if change.previous else None,
    }


def _found_view(found: Found) -> dict[str, Any]:
    return {
        "key": found.key,
        "kind": found.kind,
        "id": found.id,
        "text": found.text,
        "score": found.score,
        "created_at": views.when(found.created_at),
        "message_ids": list(found.message_ids),
        "conversation_id": found.conversation_id,
    }


def _stack_view(context: TurnContext | None) -> list[dict[str, Any]]:
    if context is None:
        return []
    return [
        {
            "id": layer.id,
            "title": layer.title,
            "source": layer.source,
            "text": layer.text,
            "withheld": layer.withheld,
        }
        for layer in context.layers
    ]


def _memory(request: Request) -> MemoryService:
    memory = services(request).personalizer.memory
    if memory is None:
        raise NotFound("memory is not enabled on this server")
    return memory


# -- settings ------------------------------------------------------------------------------


async def settings(request: Request) -> Response:
    user = await current_user(request)
    personalizer = services(request).personalizer
    if request.method == "PUT":
        body = await read_json(request, Anything)
        await personalizer.save_profile(user.id, body.model_dump())
    profile = await personalizer.profile(user.id)
    personalities = [
        {"id": p.id, "name": p.name, "summary": p.summary, "custom": p.custom}
        for p in await personalizer.personalities(user.id)
    ]
    return JSONResponse(
        {
            "profile": profile.model_dump(),
            "personalities": personalities,
            "limits": {"free_text": MAX_FREE_TEXT, "memory": MAX_MEMORY_CHARS},
        }
    )


async def personas(request: Request) -> Response:
    user = await current_user(request)
    personalizer = services(request).personalizer
    if request.method == "POST":
        body = await read_json(request, Anything)
        persona = await personalizer.save_persona(user.id, body.model_dump())
        return JSONResponse(persona.model_dump(), 201)
    return JSONResponse({"data": [p.model_dump() for p in await personalizer.personas(user.id)]})


async def persona(request: Request) -> Response:
    user = await current_user(request)
    personalizer = services(request).personalizer
    persona_id = request.path_params["persona_id"]
    if request.method == "DELETE":
        await personalizer.delete_persona(user.id, persona_id)
        return Response(status_code=204)
    body = await read_json(request, Anything)
    saved = await personalizer.save_persona(user.id, body.model_dump(), persona_id)
    return JSONResponse(saved.model_dump())


async def preview(request: Request) -> Response:
    user = await current_user(request)
    body = await read_json(request, Preview)
    context, messages = await services(request).chat.preview(
        user.id,
        body.conversation_id,
        body.content,
        body.model,
        temporary=body.temporary,
        settings=body.settings,
    )
    return JSONResponse(
        {
            "layers": _stack_view(context),
            "rules": [
                {"rule": c.describe(), "kind": c.kind, "source": c.source}
                for c in (context.constraints if context else ())
            ],
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }
    )


# -- memory --------------------------------------------------------------------------------


async def memories(request: Request) -> Response:
    user = await current_user(request)
    memory = _memory(request)
    if request.method == "POST":
        body = await read_json(request, NewMemoryBody)
        change = await memory.add_by_hand(user.id, body.kind, body.text.strip(), body.language)
        return JSONResponse(_change_view(change), 201)
    query = (request.query_params.get("q") or "").strip()[:MAX_QUERY_CHARS] or None
    history = request.query_params.get("history") in {"1", "true"}
    found = await memory.list_memories(user.id, query=query, history=history)
    return JSONResponse({"data": [_memory_view(m) for m in found]})


async def memory_item(request: Request) -> Response:
    user = await current_user(request)
    memory = _memory(request)
    memory_id = path_int(request, "memory_id")
    if request.method == "DELETE":
        return JSONResponse(_memory_view(await memory.delete(user.id, memory_id)))
    if request.method == "PATCH":
        body = await read_json(request, MemoryEdit)
        return JSONResponse(_memory_view(await memory.edit(user.id, memory_id, body.text.strip())))
    return JSONResponse(_memory_view(await memory.store.get(user.id, memory_id)))


async def memory_history(request: Request) -> Response:
    user = await current_user(request)
    chain = await _memory(request).store.history(user.id, path_int(request, "memory_id"))
    return JSONResponse({"data": [_memory_view(m) for m in chain]})


async def memory_restore(request: Request) -> Response:
    user = await current_user(request)
    record = await _memory(request).restore(user.id, path_int(request, "memory_id"))
    return JSONResponse(_memory_view(record))


async def memory_undo(request: Request) -> Response:
    user = await current_user(request)
    previous = await _memory(request).undo(user.id, path_int(request, "memory_id"))
    return JSONResponse({"restored": _memory_view(previous) if previous else None})


async def memory_search(request: Request) -> Response:
    user = await current_user(request)
    query = (request.query_params.get("q") or "").strip()
    if not query:
        raise InvalidRequest("q must not be empty", param="q")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"q is longer than {MAX_QUERY_CHARS} characters", param="q")
    k = int_param(request, "k", 5, low=1, high=100) or 5
    kind = request.query_params.get("kind")
    if kind not in {None, "memory", "message"}:
        raise InvalidRequest("kind must be memory or message", param="kind")
    found = await _memory(request).search(user.id, query, k, kinds={kind} if kind else None)
    return JSONResponse({"data": [_found_view(f) for f in found]})


async def message_memories(request: Request) -> Response:
    user = await current_user(request)
    changes = await services(request).chat.memory_changes(user.id, path_int(request, "message_id"))
    return JSONResponse({"data": [_change_view(c) for c in changes]})


async def export(request: Request) -> Response:
    """Everything personalization keeps about the user, as one JSON document."""
    user = await current_user(request)
    personalizer = services(request).personalizer
    memory = personalizer.memory
    saved = await memory.list_memories(user.id, history=True) if memory else []
    body = {
        "user": user.username,
        "profile": (await personalizer.profile(user.id)).model_dump(),
        "personas": [p.model_dump() for p in await personalizer.personas(user.id)],
        "memories": [_memory_view(m) for m in saved],
    }
    return JSONResponse(
        body,
        headers={"Content-Disposition": 'attachment; filename="salon-personalization.json"'},
    )


def routes() -> list[BaseRoute]:
    item = "/api/memory/{memory_id:int}"
    return [
        Route("/api/personalization", settings, methods=["GET", "PUT"]),
        Route("/api/personalization/export", export),
        Route("/api/personalization/preview", preview, methods=["POST"]),
        Route("/api/personas", personas, methods=["GET", "POST"]),
        Route("/api/personas/{persona_id}", persona, methods=["PUT", "DELETE"]),
        Route("/api/memory", memories, methods=["GET", "POST"]),
        Route("/api/memory/search", memory_search),
        Route(item, memory_item, methods=["GET", "PATCH", "DELETE"]),
        Route(item + "/history", memory_history),
        Route(item + "/restore", memory_restore, methods=["POST"]),
        Route(item + "/undo", memory_undo, methods=["POST"]),
        Route("/api/messages/{message_id}/memories", message_memories),
    ]
