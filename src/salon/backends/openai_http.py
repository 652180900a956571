"""Adapter for any OpenAI-compatible HTTP server: vLLM, SGLang, llama.cpp server, Ollama,
OpenAI itself. The wire format lives here; endpoint and credentials come from settings.

aiohttp rather than httpx: measured on this kind of machine, an aiohttp client relays
~2.5–2.9k streaming requests/s where httpx managed ~260–400 (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp

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
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

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
            async with self._client().post(
                self._url, data=json.dumps(_body(request)), headers=self._headers
            ) as response:
                if response.status != 200:
                    raise _http_error(response.status, await response.read())
                async for event in _events(response.content):
                    yield event
        except SalonError:
            raise
        except TimeoutError as exc:
            raise BackendTimeout("the model server did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"cannot reach the model server: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _body(request: CompletionRequest) -> dict[str, Any]:
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
    if request.messages and request.messages[-1].role == "assistant":
        # Continue the last assistant message (vLLM's / llama.cpp's prefill).
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[StreamEvent]:
    reason: FinishReason | None = None
    usage = Usage()
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # SSE comments, event names, blank separators
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = _parse(data)
        if chunk.get("error"):
            raise BackendError(_message(chunk["error"]))
        if chunk.get("usage"):
            usage = Usage(
                int(chunk["usage"].get("prompt_tokens") or 0),
                int(chunk["usage"].get("completion_tokens") or 0),
            )
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield TextDelta(text)
            if choice.get("finish_reason"):
                reason = _reason(choice["finish_reason"])
    else:
        if reason is None:
            raise BackendError("the model server ended the stream early")
    yield Finished(reason or FinishReason.STOP, usage)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
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
