"""Adapter for any OpenAI-compatible HTTP server: vLLM, SGLang, llama.cpp server, Ollama,
OpenAI itself. The wire format lives here; endpoint and credentials come from settings.

aiohttp rather than httpx: measured on this kind of machine, an aiohttp client relays
~2.5–2.9k streaming requests/s where httpx managed ~260–400 (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp

from salon.backends.logprobs import openai_logprobs
from salon.domain import (
    CompletionRequest,
    Finished,
    FinishReason,
    StreamEvent,
    TextDelta,
    Usage,
)
from salon.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextTooLong,
    InvalidRequest,
    SalonError,
    UnknownModel,
)


class OpenAIHttpBackend:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        inject: Callable[[dict[str, str]], None] | None = None,
        continues: bool = True,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # With tracing: adds the current span's `traceparent` to each request's headers.
        self._inject = inject
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        # Does the server take `continue_final_message`? A hosted API may reject a field it
        # does not know (OpenAI answers 400), so it is sent only where the operator said so.
        self._continues = continues

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running event loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False
            )
        return self._session

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        try:
            headers = self._headers
            if self._inject is not None:
                headers = dict(headers)
                self._inject(headers)
            async with self._client().post(
                self._url, data=json.dumps(_body(request, self._continues)), headers=headers
            ) as response:
                if response.status != 200:
                    raise _http_error(response.status, await response.read())
                # Whole network reads, split here: one await per read rather than per line.
                parser = _SSEParser()
                async for block in response.content.iter_any():
                    for event in parser.feed(block):
                        yield event
                    if parser.done:
                        break
                else:
                    for event in parser.feed(b"\n"):  # a last line without its newline
                        yield event
                yield parser.finish()
        except SalonError:
            raise
        except TimeoutError as exc:
            raise BackendTimeout("the model server did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"cannot reach the model server: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _body(request: CompletionRequest, continues: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    params = request.params
    optional = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
        "stop": list(params.stop) or None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if params.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = params.top_logprobs
    if continues and request.messages and request.messages[-1].role == "assistant":
        # Continue the last assistant message (vLLM's / llama.cpp's prefill).
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


class _SSEParser:
    """OpenAI's SSE stream, fed as it arrives: `feed` returns the text deltas of the
    complete lines so far (and notes the finish reason, usage and [DONE]); `finish` gives
    the final event, or the error of a stream that ended early."""

    __slots__ = ("_error", "_pending", "_reason", "_usage", "done")

    def __init__(self) -> None:
        self.done = False  # [DONE] was seen, or an error
        self._error: BackendError | None = None  # raised once the text before it is out
        self._pending = b""  # an incomplete last line
        self._reason: FinishReason | None = None
        self._usage = Usage()

    def feed(self, block: bytes) -> list[TextDelta]:
        lines = (self._pending + block).split(b"\n") if self._pending else block.split(b"\n")
        self._pending = lines.pop()
        deltas: list[TextDelta] = []
        for raw in lines:
            if not raw.startswith(b"data:"):
                continue  # SSE comments, event names, blank separators
            data = raw[5:].strip()
            if data == b"[DONE]":
                self.done = True
                break
            try:
                self._chunk(_parse(data), deltas)
            except BackendError as exc:
                self._error, self.done = exc, True
                break
        return deltas

    def _chunk(self, chunk: dict[str, Any], deltas: list[TextDelta]) -> None:
        if chunk.get("error"):
            raise BackendError(_message(chunk["error"]))
        usage = chunk.get("usage")
        if usage:
            self._usage = Usage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                logprobs = choice.get("logprobs")  # only when asked for: off the hot path
                deltas.append(TextDelta(text, openai_logprobs(logprobs) if logprobs else ()))
            if choice.get("finish_reason"):
                self._reason = _reason(choice["finish_reason"])

    def finish(self) -> Finished:
        if self._error is not None:
            raise self._error
        if not self.done and self._reason is None:
            raise BackendError("the model server ended the stream early")
        return Finished(self._reason or FinishReason.STOP, self._usage)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        chunk = json.loads(data.decode())  # a str skips json's encoding detection
    except ValueError as exc:
        raise BackendError("the model server sent a malformed chunk") from exc
    if not isinstance(chunk, dict):
        raise BackendError("the model server sent a malformed chunk")
    return chunk


def _reason(value: str) -> FinishReason:
    return FinishReason.LENGTH if value == "length" else FinishReason.STOP


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _http_error(status: int, body: bytes) -> SalonError:
    """Every non-200 answer of an upstream becomes one of our errors, here and only here."""
    try:
        error = json.loads(body).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = str(error.get("message") or body[:200].decode(errors="replace") or status)
    code = str(error.get("code") or "")
    if code == "context_length_exceeded" or "maximum context length" in message:
        return ContextTooLong(message)
    if status == 404:
        return UnknownModel(f"the model server does not know this model: {message}")
    if status in (401, 403):
        return BackendError(f"the model server rejected salon's credentials ({status})")
    if status == 429 or status >= 500:
        return BackendUnavailable(f"the model server is unavailable ({status}): {message}")
    return InvalidRequest(f"the model server rejected the request: {message}")
