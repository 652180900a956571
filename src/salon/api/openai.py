"""The OpenAI-compatible surface: /v1/models and /v1/chat/completions.

The hot path of the gateway: parsing is one pydantic validation, chunks are relayed one
for one as the backend yields them, and nothing here touches the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from salon.api import sse
from salon.api.auth import api_key_user, bearer
from salon.api.context import services
from salon.api.errors import error_body
from salon.api.inputs import read_json
from salon.chat.admission import Caller
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
# A stream silent this long gets an SSE comment (`: keep-alive`), so that proxies and load
# balancers with an idle timeout do not cut it: before the first token (queued for a slot,
# a slow upstream) and between chunks. Clients ignore comments.
KEEP_ALIVE_S = 15.0


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
        body.model,
        body.chat_messages(),
        body.params(),
        session_key=body.user or user.id,
        caller=Caller(user.id, _key_id(request)),
    )
    completion_id = f"chatcmpl-{os.urandom(16).hex()}"  # what uuid4().hex gives, faster
    if not body.stream:
        first = await _first(events)
        return JSONResponse(await _collect(first, events, completion_id, body.model))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = _Chunks(completion_id, body.model)
    keep_alive_s = KEEP_ALIVE_S
    # The first event is awaited before answering, so that a backend that is down, a full
    # queue or a prompt that is too long gets a proper HTTP error instead of a broken
    # stream — for up to one keep-alive interval. A longer wait (queued for a slot, a slow
    # upstream) starts the stream with a keep-alive comment; a failure after that is an
    # error event in the stream.
    pending = asyncio.ensure_future(_first(events))
    try:
        await asyncio.wait({pending}, timeout=keep_alive_s)
    except asyncio.CancelledError:
        pending.cancel()
        raise
    if not pending.done():
        return EventStream(
            sse.KEEP_ALIVE, _late(pending, events, chunks, include_usage), keep_alive_s
        )
    head = chunks.role() + _encode(pending.result(), chunks, include_usage)
    return EventStream(head, _rest(events, chunks, include_usage), keep_alive_s)


def _key_id(request: Request) -> str | None:
    """The API key's identity for per-key limits: a short digest, never the key itself."""
    token = bearer(request)
    return hashlib.sha256(token.encode()).hexdigest()[:24] if token else None


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


class _Chunks:
    """The SSE chunks of one completion. Every chunk shares the head (id, created, model);
    a content chunk costs one string quote, not a json.dumps. Byte for byte what
    `json.dumps` would write."""

    __slots__ = ("_content", "head")

    def __init__(self, completion_id: str, model: str) -> None:
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self.head = json.dumps(head)[:-1]
        self._content = f'data: {self.head}, "choices": [{{"index": 0, "delta": {{"content": '

    def role(self) -> bytes:
        return (
            f'data: {self.head}, "choices": [{{"index": 0, "delta": {{"role": "assistant", '
            f'"content": ""}}, "finish_reason": null}}]}}\n\n'.encode()
        )

    def content(self, text: str) -> bytes:
        return f'{self._content}{_quote(text)}}}, "finish_reason": null}}]}}\n\n'.encode()

    def finish(self, reason: FinishReason) -> bytes:
        return (
            f'data: {self.head}, "choices": [{{"index": 0, "delta": {{}}, '
            f'"finish_reason": "{reason.value}"}}]}}\n\n'.encode()
        )

    def usage(self, usage: Usage) -> bytes:
        return (
            f'data: {self.head}, "choices": [], "usage": {{"prompt_tokens": '
            f'{int(usage.prompt_tokens)}, "completion_tokens": {int(usage.completion_tokens)}, '
            f'"total_tokens": {int(usage.total_tokens)}}}}}\n\n'.encode()
        )


def _encode(event: StreamEvent, chunks: _Chunks, include_usage: bool) -> bytes:
    if isinstance(event, TextDelta):
        return chunks.content(event.text)
    finish = chunks.finish(event.reason)
    return finish + chunks.usage(event.usage) if include_usage else finish


async def _rest(
    events: AsyncGenerator[StreamEvent, None], chunks: _Chunks, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """The chunks after the first event, then [DONE]."""
    async with aclosing(events):
        try:
            async for event in events:
                yield _encode(event, chunks, include_usage)
        except SalonError as exc:
            # Mid-stream failure: the text already sent stands; the stream ends with an
            # error event rather than silently.
            yield _error_event(exc)
    yield DONE


async def _late(
    first: asyncio.Future[StreamEvent],
    events: AsyncGenerator[StreamEvent, None],
    chunks: _Chunks,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """The whole stream when its first event came late: the response has started (with a
    keep-alive), so a failure before the first token is an error event too."""
    try:
        try:
            event = await first
        except SalonError as exc:
            yield _error_event(exc)
            yield DONE
            return
        yield chunks.role() + _encode(event, chunks, include_usage)
        async for part in _rest(events, chunks, include_usage):
            yield part
    finally:
        if not first.done():  # the client left while waiting
            first.cancel()
        # The first read must have ended before the generator can be closed.
        await asyncio.wait({first})
        await events.aclose()


def _error_event(exc: SalonError) -> bytes:
    error = json.dumps(error_body(exc.status, exc.message, exc.code))
    return f"data: {error}\n\n".encode()


class _Outbox:
    """Chunks on their way to the client. The producer puts them one by one; the consumer
    takes everything that is there in one piece, so a burst from the backend goes out
    in one write instead of one per chunk (every chunk is still its own SSE event)."""

    LIMIT = 64 * 1024  # bytes waiting before the producer pauses (backpressure)

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._closed = False
        self._puts = 0  # parts put so far
        self._puts_seen = 0  # ... at the last keep-alive tick
        self._ready: asyncio.Future[None] | None = None  # the consumer waits for parts
        self._room: asyncio.Future[None] | None = None  # the producer waits for room

    async def put(self, part: bytes) -> None:
        self._parts.append(part)
        self._size += len(part)
        self._puts += 1
        _wake(self._ready)
        if self._size > self.LIMIT:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def close(self) -> None:
        self._closed = True
        _wake(self._ready)

    def keep_alive(self) -> None:
        """A keep-alive comment, if nothing was put since the last call and nothing waits
        to go out (a stream that is busy, or blocked on a slow client, needs none)."""
        idle = self._puts == self._puts_seen
        self._puts_seen = self._puts
        if idle and not self._parts and not self._closed:
            self._parts.append(sse.KEEP_ALIVE)
            _wake(self._ready)

    @property
    def drained(self) -> bool:
        """Closed, and everything taken."""
        return self._closed and not self._parts

    async def take(self) -> bytes:
        """Everything put so far; b"" once closed and empty."""
        while not self._parts and not self._closed:
            self._ready = asyncio.get_running_loop().create_future()
            await self._ready
        taken = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        _wake(self._room)
        return taken


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class EventStream(Response):
    """A text/event-stream response: `first` at once, then what `rest` yields, coalesced
    into as few writes as the client's pace allows. When the client goes away, `rest` is
    closed (closing the backend stream stops the generation).

    Lighter than starlette's StreamingResponse (no anyio task group, one send per burst
    rather than per chunk); a relay of N chunks costs two small tasks, not N writes.
    While `rest` is silent, a keep-alive comment goes out every `keep_alive_s` (one timer
    per stream, not one per chunk)."""

    media_type = "text/event-stream"

    def __init__(
        self, first: bytes, rest: AsyncGenerator[bytes, None], keep_alive_s: float = KEEP_ALIVE_S
    ) -> None:
        self.first = first
        self.rest = rest
        self.keep_alive_s = keep_alive_s
        self.status_code = 200
        self.background = None
        self.init_headers(sse.HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outbox = _Outbox()
        producer = asyncio.ensure_future(self._produce(outbox))
        # Even a producer cancelled before it ran must not leave the consumer waiting.
        producer.add_done_callback(lambda _: outbox.close())
        watcher = asyncio.ensure_future(_client_gone(receive))
        watcher.add_done_callback(lambda _: producer.cancel())
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal timer
            outbox.keep_alive()
            timer = loop.call_later(self.keep_alive_s, tick)

        if self.keep_alive_s > 0:
            timer = loop.call_later(self.keep_alive_s, tick)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
            while True:
                part = await outbox.take()
                if not outbox.drained:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
                    continue
                if not producer.done():
                    await asyncio.wait({producer})
                if producer.cancelled():
                    return  # the client left
                producer.result()  # the producer's own failure, if any
                # The last part and the end of the body in one write.
                await send({"type": "http.response.body", "body": part, "more_body": False})
                return
        finally:
            if timer is not None:
                timer.cancel()
            watcher.cancel()
            producer.cancel()

    async def _produce(self, outbox: _Outbox) -> None:
        try:
            async with aclosing(self.rest) as rest:
                async for part in rest:
                    await outbox.put(part)
        finally:
            outbox.close()


async def _client_gone(receive: Receive) -> None:
    """Returns once the client has closed the connection (or the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
