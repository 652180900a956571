"""A mock OpenAI-compatible upstream: the fake at the network boundary.

It speaks the wire protocol `OpenAIHttpBackend` speaks (`POST /v1/chat/completions`,
streaming and not, `GET /v1/models`), fast enough to be the baseline of the gateway
benchmark: every chunk of a normal answer is encoded once per model name and reused.

The model name picks a scripted behaviour, so a test (or `salon serve` pointed at it) can
provoke every failure an upstream can show:

    any other name     a normal answer of `chunks` content chunks (one "token" each)
    slow               ten times as many chunks, at least 10 ms apart (to stop mid-way)
    fragmented         a normal answer, but CRLF line ends, a comment line, every event
                       split across two writes, and a last line without its newline
    die-mid-stream     a few chunks, then the connection is cut
    hang               never sends a byte (not even headers) until the client goes away
    hang-mid-stream    a few chunks, then silence until the client goes away
    malformed          a few chunks, then a chunk that is not JSON
    truncated          the chunks, then a clean end without finish_reason or [DONE]
    error-in-stream    a few chunks, then an OpenAI-style `{"error": ...}` chunk
    context-too-long   400, code context_length_exceeded
    error-NNN          HTTP status NNN with an OpenAI error body (error-500, error-429, ...)

`max_tokens` / `max_completion_tokens` caps the answer (finish_reason "length"), `stop`
cuts it (finish_reason "stop"), `stream_options.include_usage` adds the usage chunk.

    python -m salon.backends.mock_upstream --port 9001 [--chunks 20] [--delay-ms 0] [--ttft-ms 0]

prints `mock upstream listening on http://127.0.0.1:PORT/v1` once it accepts connections
(`--port 0` picks a free port). In tests: `async with running_upstream() as upstream:` and
point a backend at `upstream.base_url`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WORDS = (
    "Sure", ",", " here", " is", " a", " short", " answer", " about", " the", " topic",
    " you", " asked", " for", ".", " It", " has", " several", " plain", " words", " only",
)  # fmt: skip
# How many content chunks the scripted failures send before failing.
FAIL_AFTER = 3
# A hanging answer gives up by itself after this long, so nothing runs forever.
HANG_LIMIT_S = 600.0
FAILURE_MODES = (
    "slow",
    "fragmented",
    "die-mid-stream",
    "hang",
    "hang-mid-stream",
    "malformed",
    "truncated",
    "error-in-stream",
    "context-too-long",
    "error-500",
)
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class MockConfig:
    chunks: int = 20  # content chunks in a normal answer
    delay_ms: float = 0.0  # between two content chunks
    ttft_ms: float = 0.0  # before the first content chunk
    api_key: str | None = None  # when set, requests must carry `Authorization: Bearer <key>`


@dataclass(slots=True)
class MockState:
    """What the mock saw, for tests: the last request bodies and a few counters."""

    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))
    started: int = 0  # chat completion requests accepted
    completed: int = 0  # answers sent to the end
    disconnected: int = 0  # streams the client left before the end


CONFIG = web.AppKey("mock_config", MockConfig)
STATE = web.AppKey("mock_state", MockState)


@dataclass(frozen=True, slots=True)
class _Script:
    """The pre-encoded SSE chunks of one model's normal answer."""

    role: bytes
    content: tuple[bytes, ...]
    texts: tuple[str, ...]
    finish: dict[str, bytes]
    head: str  # the chunk object's common fields, without the closing brace


def _token(i: int) -> str:
    return WORDS[i % len(WORDS)]


def _script(model: str, chunks: int, created: int) -> _Script:
    head = json.dumps(
        {
            "id": f"chatcmpl-mock-{model}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
    )[:-1]
    texts = tuple(_token(i) for i in range(chunks))
    return _Script(
        role=_chunk(head, {"role": "assistant", "content": ""}, None),
        content=tuple(_chunk(head, {"content": text}, None) for text in texts),
        texts=texts,
        finish={reason: _chunk(head, {}, reason) for reason in ("stop", "length")},
        head=head,
    )


def _chunk(head: str, delta: dict[str, Any], reason: str | None) -> bytes:
    choices = json.dumps([{"index": 0, "delta": delta, "finish_reason": reason}])
    return f'data: {head}, "choices": {choices}}}\n\n'.encode()


def _error(status: int, message: str, code: str, kind: str | None = None) -> web.Response:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        prompt += 4 + len(content if isinstance(content, str) else json.dumps(content)) // 4
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one request gets: how many content chunks, which texts, which finish reason."""

    texts: tuple[str, ...]
    reason: str
    precoded: bool  # whether the script's pre-encoded chunks can be sent as they are


def _plan(script: _Script, body: dict[str, Any]) -> _Plan:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    texts = script.texts
    reason = "stop"
    if isinstance(limit, int) and 0 < limit < len(texts):
        texts, reason = texts[:limit], "length"
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if isinstance(s, str)]
    if stops and any(stops):
        text = "".join(texts)
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
        if cut >= 0:
            kept: list[str] = []
            length = 0
            for piece in texts:
                if length + len(piece) > cut:
                    if cut > length:
                        kept.append(piece[: cut - length])
                    break
                kept.append(piece)
                length += len(piece)
            return _Plan(tuple(kept), "stop", False)
    return _Plan(texts, reason, True)


class _Handler:
    def __init__(self, app: web.Application) -> None:
        self.config = app[CONFIG]
        self.state = app[STATE]
        self.scripts: dict[str, _Script] = {}
        self.created = int(time.time())

    def script(self, model: str) -> _Script:
        found = self.scripts.get(model)
        if found is None:
            if len(self.scripts) > 256:
                self.scripts.clear()
            count = self.config.chunks * (10 if model == "slow" else 1)
            found = self.scripts[model] = _script(model, count, self.created)
        return found

    async def models(self, request: web.Request) -> web.StreamResponse:
        if denied := self.check_key(request):
            return denied
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "mock"}
            for name in ("mock", *FAILURE_MODES)
        ]
        return web.json_response({"object": "list", "data": data})

    def check_key(self, request: web.Request) -> web.Response | None:
        if self.config.api_key is None:
            return None
        if request.headers.get("Authorization") == f"Bearer {self.config.api_key}":
            return None
        return _error(401, "Incorrect API key provided", "invalid_api_key", "authentication_error")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if denied := self.check_key(request):
            return denied
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "model is required", "invalid_request_error")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages must be a non-empty list", "invalid_request_error")
        self.state.requests.append(body)
        self.state.started += 1
        model: str = body["model"]
        if failed := _scripted_error(model):
            return failed
        if model == "hang":
            await _wait_for_disconnect(request)
            self.state.disconnected += 1
            return web.Response(status=499)
        if not body.get("stream"):
            return await self.whole(request, body, model)
        return await self.stream(request, body, model)

    async def whole(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        if model == "die-mid-stream" and request.transport is not None:
            request.transport.abort()
            self.state.disconnected += 1
            return web.Response(status=499)
        if model == "malformed":
            return web.Response(
                body=b'{"id": "chatcmpl-mock", "choices": [', content_type="application/json"
            )
        plan = _plan(self.script(model), body)
        if self.config.ttft_ms:
            await asyncio.sleep(self.config.ttft_ms / 1000)
        self.state.completed += 1
        answer = {
            "id": f"chatcmpl-mock-{model}",
            "object": "chat.completion",
            "created": self.created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(plan.texts)},
                    "finish_reason": plan.reason,
                }
            ],
            "usage": _usage(body, len(plan.texts)),
        }
        return web.json_response(answer)

    async def stream(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        script = self.script(model)
        plan = _plan(script, body)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            await response.write(script.role)
            if self.config.ttft_ms:
                await asyncio.sleep(self.config.ttft_ms / 1000)
            if model in _MID_STREAM:
                return await _MID_STREAM[model](self, request, response, script)
            delay = self.config.delay_ms / 1000
            if model == "slow":
                delay = max(delay, 0.01)
            if plan.precoded:
                content: Sequence[bytes] = script.content[: len(plan.texts)]
            else:
                content = [_chunk(script.head, {"content": t}, None) for t in plan.texts]
            for i, chunk in enumerate(content):
                if delay and i:
                    await asyncio.sleep(delay)
                await response.write(chunk)
            await response.write(script.finish[plan.reason])
            if include_usage:
                usage = json.dumps(_usage(body, len(plan.texts)))
                await response.write(
                    f'data: {script.head}, "choices": [], "usage": {usage}}}\n\n'.encode()
                )
            await response.write(DONE)
            await response.write_eof()
        except ConnectionError:
            self.state.disconnected += 1
            return response
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            self.state.disconnected += 1
            raise
        self.state.completed += 1
        return response

    async def fragmented(
        self, request: web.Request, response: web.StreamResponse, script: _Script
    ) -> web.StreamResponse:
        await response.write(b": keep-alive\r\n\r\n")
        events = [*script.content, script.finish["stop"]]
        for event in events:
            event = event.replace(b"\n", b"\r\n")
            half = len(event) // 2
            await response.write(event[:half])
            await asyncio.sleep(0.002)  # so the halves arrive in separate reads
            await response.write(event[half:])
        await response.write(b"data: [DONE]")  # no newline before the end
        await response.write_eof()
        self.state.completed += 1
        return response

    async def first_chunks(self, response: web.StreamResponse, script: _Script) -> None:
        for chunk in script.content[:FAIL_AFTER]:
            await response.write(chunk)

    async def die(
        self, request: web.Request, response: web.StreamResponse, script: _Script
    ) -> web.StreamResponse:
        await self.first_chunks(response, script)
        # Cut the connection without ending the chunked body: the client sees a payload error.
        if request.transport is not None:
            request.transport.abort()
        self.state.disconnected += 1
        return response

    async def stall(
        self, request: web.Request, response: web.StreamResponse, script: _Script
    ) -> web.StreamResponse:
        await self.first_chunks(response, script)
        await _wait_for_disconnect(request)
        self.state.disconnected += 1
        return response

    async def malformed(
        self, request: web.Request, response: web.StreamResponse, script: _Script
    ) -> web.StreamResponse:
        await self.first_chunks(response, script)
        await response.write(b'data: {"id": "chatcmpl-mock", "choices": [{"delta": {"cont\n\n')
        await response.write(DONE)
        await response.write_eof()
        self.state.completed += 1
        return response

    async def truncated(
        self, request: web.Request, response: web.StreamResponse, script: _Script
    ) -> web.StreamResponse:
        for chunk in script.content:
            await response.write(chunk)
        await response.write_eof()  # a clean end of the body, but no finish_reason, no [DONE]
        self.state.completed += 1
        return response

    async def error_in_stream(
        self, request: web.Request, response: web.StreamResponse, script: _Script
    ) -> web.StreamResponse:
        await self.first_chunks(response, script)
        error = {"error": {"message": "the engine failed", "type": "server_error", "code": None}}
        await response.write(f"data: {json.dumps(error)}\n\n".encode())
        await response.write(DONE)
        await response.write_eof()
        self.state.completed += 1
        return response


_MID_STREAM = {
    "fragmented": _Handler.fragmented,
    "die-mid-stream": _Handler.die,
    "hang-mid-stream": _Handler.stall,
    "malformed": _Handler.malformed,
    "truncated": _Handler.truncated,
    "error-in-stream": _Handler.error_in_stream,
}


def _scripted_error(model: str) -> web.Response | None:
    if model == "context-too-long":
        return _error(
            400,
            "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 9000 tokens.",
            "context_length_exceeded",
        )
    prefix, _, status = model.partition("error-")
    if not prefix and status.isdigit() and 400 <= int(status) <= 599:
        code = int(status)
        return _error(code, f"scripted failure {code}", "mock_error")
    return None


async def _wait_for_disconnect(request: web.Request) -> None:
    """Idles until the client closes the connection (bounded by HANG_LIMIT_S)."""
    deadline = time.monotonic() + HANG_LIMIT_S
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.02)


def build_app(
    chunks: int = 20, delay_ms: float = 0.0, ttft_ms: float = 0.0, api_key: str | None = None
) -> web.Application:
    """The mock as an aiohttp application. `app[STATE]` holds what it saw."""
    app = web.Application()
    app[CONFIG] = MockConfig(chunks, delay_ms, ttft_ms, api_key)
    app[STATE] = MockState()
    handler = _Handler(app)
    app.router.add_post("/v1/chat/completions", handler.chat)
    app.router.add_get("/v1/models", handler.models)
    return app


@dataclass(frozen=True, slots=True)
class RunningUpstream:
    app: web.Application
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def state(self) -> MockState:
        return self.app[STATE]


@asynccontextmanager
async def running_upstream(
    chunks: int = 20,
    delay_ms: float = 0.0,
    ttft_ms: float = 0.0,
    api_key: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[RunningUpstream]:
    """Serves the mock on `host:port` (a free port by default) for the block's duration."""
    app = build_app(chunks, delay_ms, ttft_ms, api_key)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    sock = _listen(host, port)
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        yield RunningUpstream(app, host, sock.getsockname()[1])
    finally:
        await runner.cleanup()
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve(args: argparse.Namespace) -> None:
    async with running_upstream(
        args.chunks, args.delay_ms, args.ttft_ms, args.api_key, host=args.host, port=args.port
    ) as upstream:
        print(f"mock upstream listening on {upstream.base_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m salon.backends.mock_upstream",
        description="A mock OpenAI-compatible streaming server (failure modes by model name).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per answer")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="between content chunks")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="before the first content")
    parser.add_argument("--api-key", help="require this bearer key")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
