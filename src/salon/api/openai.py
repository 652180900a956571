"""The OpenAI-compatible surface: /v1/models and /v1/chat/completions.

The hot path of the gateway: parsing is one pydantic validation, chunks are relayed one
for one as the backend yields them, and nothing here touches the store.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from salon.api import sse
from salon.api.auth import api_key_user
from salon.api.context import services
from salon.api.errors import error_body
from salon.api.inputs import read_json
from salon.domain import (
    ChatMessage,
    Finished,
    FinishReason,
    SamplingParams,
    StreamEvent,
    TextDelta,
    Usage,
)
from salon.errors import InvalidRequest, SalonError

DONE = b"data: [DONE]\n\n"


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class InMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[InMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    def params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise InvalidRequest("stop takes at most 4 sequences", param="stop")
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stop),
        )

    def chat_messages(self) -> list[ChatMessage]:
        converted = []
        for message in self.messages:
            role = {"developer": "system", "tool": "user"}.get(message.role, message.role)
            converted.append(ChatMessage(role, message.text()))  # type: ignore[arg-type]
        return converted


async def models(request: Request) -> Response:
    await api_key_user(request)
    created = int(time.time())
    data = [
        {"id": m, "object": "model", "created": created, "owned_by": m.partition(":")[0]}
        for m in services(request).gateway.models()
    ]
    return JSONResponse({"object": "list", "data": data})


async def chat_completions(request: Request) -> Response:
    user = await api_key_user(request)
    body = await read_json(request, ChatCompletionInput)
    events = services(request).gateway.stream(
        body.model, body.chat_messages(), body.params(), session_key=body.user or user.id
    )
    # The first event is awaited before answering, so that a backend that is down or a
    # prompt that is too long gets a proper HTTP error instead of a broken stream.
    first = await _first(events)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(first, events, completion_id, body.model, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=sse.HEADERS)
    return JSONResponse(await _collect(first, events, completion_id, body.model))


async def _first(events: AsyncGenerator[StreamEvent, None]) -> StreamEvent:
    try:
        return await anext(events)
    except StopAsyncIteration as exc:
        raise SalonError("the backend sent nothing") from exc


async def _collect(
    first: StreamEvent, events: AsyncGenerator[StreamEvent, None], completion_id: str, model: str
) -> dict[str, Any]:
    parts: list[str] = []
    finished: Finished | None = None
    async with aclosing(events):
        event: StreamEvent | None = first
        while event is not None:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                finished = event
            event = await anext(events, None)
    reason = finished.reason if finished else FinishReason.STOP
    usage = finished.usage if finished else Usage()
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "finish_reason": reason.value,
            }
        ],
        "usage": _usage(usage),
    }


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


async def _chunks(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    completion_id: str,
    model: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    # Every chunk shares this prefix; only the choice differs. Pre-encoding it keeps the
    # per-chunk cost to one small json.dumps.
    head = json.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
    )[:-1]
    yield _chunk(head, {"role": "assistant", "content": ""}, None)
    async with aclosing(events):
        event: StreamEvent | None = first
        try:
            while event is not None:
                if isinstance(event, TextDelta):
                    yield _chunk(head, {"content": event.text}, None)
                else:
                    yield _chunk(head, {}, event.reason.value)
                    if include_usage:
                        usage = json.dumps(_usage(event.usage))
                        yield f'data: {head}, "choices": [], "usage": {usage}}}\n\n'.encode()
                event = await anext(events, None)
        except SalonError as exc:
            # Mid-stream failure: the text already sent stands; the stream ends with an
            # error event rather than silently.
            error = json.dumps(error_body(exc.status, exc.message, exc.code))
            yield f"data: {error}\n\n".encode()
    yield DONE


def _chunk(head: str, delta: dict[str, Any], reason: str | None) -> bytes:
    choice = json.dumps([{"index": 0, "delta": delta, "finish_reason": reason}])
    return f'data: {head}, "choices": {choice}}}\n\n'.encode()


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
