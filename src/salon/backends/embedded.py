"""The embedded backend: GGUF models run in-process by llama.cpp, through xllamacpp.

xllamacpp embeds llama.cpp's server (its slots, prompt cache and chat templates) and exposes
`Server.handle_chat_completions(body, callback)`: a blocking call that invokes `callback` with
each OpenAI-style stream chunk and stops generating as soon as the callback returns True.

How the pieces fit:

- Each generation runs on a worker thread. Its callback hands chunks to the event loop with
  `loop.call_soon_threadsafe` into an `asyncio.Queue` (no polling), and returns True once the
  consumer has gone away (`aclose()`, a cancelled task, `close()`): llama.cpp then cancels the
  task. The callback runs after every token and, thanks to `return_progress`, after every prompt
  batch, so an abandoned stream stops burning CPU within one token or one prompt batch.
- KV reuse: `cache_prompt` makes llama.cpp keep each slot's evaluated tokens and only evaluate
  the part of a new prompt after the longest common prefix. A conversation (`session_key`) is
  pinned to one slot (`id_slot`), so turn N re-evaluates only the last reply and the new user
  message, not the whole history. Conversations that lose their slot are saved to llama.cpp's
  RAM prompt cache and restored from it when they come back.
- Models load lazily (or via `load`) on a worker thread, after `model_files` has prepared and
  verified the weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xllamacpp

from salon.backends.logprobs import openai_logprobs
from salon.backends.model_files import ModelCatalog, ProgressFn, builtin_catalog
from salon.domain import (
    CompletionRequest,
    Finished,
    FinishReason,
    StreamEvent,
    TextDelta,
    TokenLogprobs,
    Usage,
)
from salon.errors import BackendError, ContextTooLong, InvalidRequest, SalonError
from salon.settings import EmbeddedSettings

logger = logging.getLogger(__name__)
# llama.cpp's own log goes to stderr; it is switched on by DEBUG on this logger only.
runtime_logger = logging.getLogger(f"{__name__}.llama")

Chunk = dict[str, Any]

# Prompt states of conversations evicted from their slot are kept in RAM up to this size, so
# switching back to one is a restore, not a recompute. llama.cpp's own default is 8 GiB.
PROMPT_CACHE_RAM_MIB = 1024
# Prompt tokens evaluated per batch. A stop request lands between batches, so this bounds how
# long a cancelled long prompt keeps the CPU busy (256 tokens: ~3 s for Qwen 1.5B on 2 cores).
PROMPT_BATCH_TOKENS = 256
# Each running generation holds a worker thread for its whole duration, including time spent
# waiting inside llama.cpp for a busy slot; loads and shutdown use the same pool.
MAX_WORKER_THREADS = 32


def _log_progress(message: str) -> None:
    logger.info("%s", message)


class EmbeddedBackend:
    """A `TextBackend` for `embedded:<name>` models; `<name>` is a catalog key or a GGUF path."""

    def __init__(
        self,
        settings: EmbeddedSettings,
        cache_dir: Path,
        progress: ProgressFn | None = None,
        *,
        catalog: ModelCatalog | None = None,
    ) -> None:
        self._settings = settings
        self._cache_dir = cache_dir
        self._progress = progress or _log_progress
        self._catalog = catalog or builtin_catalog()
        self._models: dict[str, _LoadedModel] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._running: set[_Generation] = set()
        self._executor = ThreadPoolExecutor(MAX_WORKER_THREADS, thread_name_prefix="salon-embed")
        self._closed = False

    @property
    def threads(self) -> int:
        return resolve_threads(self._settings)

    @property
    def loaded_models(self) -> list[str]:
        return list(self._models)

    async def load(self, name: str, progress: ProgressFn | None = None) -> None:
        """Prepare and load `name` now rather than on its first request."""
        await self._model(name, progress)

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        model = await self._model(request.model)
        slot = model.slots.acquire(request.session_key)
        loop = asyncio.get_running_loop()
        generation = _Generation(loop)
        self._running.add(generation)
        try:
            body = _request_body(request, slot)
            loop.run_in_executor(self._executor, _generate, model.server, body, generation)
            async for event in generation.events():
                yield event
        finally:
            # Reached on completion, error, `aclose()` and task cancellation alike.
            generation.cancel()
            self._running.discard(generation)
            model.slots.release(slot)

    async def close(self) -> None:
        """Stop running generations and free every loaded model."""
        self._closed = True
        for generation in list(self._running):
            generation.cancel()
        models = list(self._models.values())
        self._models.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown, models)

    def _shutdown(self, models: list[_LoadedModel]) -> None:
        # Workers finish within a token of being cancelled; only then can servers be freed,
        # since a worker holds a reference to its server while it runs.
        self._executor.shutdown(wait=True)
        for model in models:
            model.free()

    async def _model(self, name: str, progress: ProgressFn | None = None) -> _LoadedModel:
        if self._closed:
            raise BackendError("the embedded backend is closed")
        if (loaded := self._models.get(name)) is not None:
            return loaded
        async with self._load_locks.setdefault(name, asyncio.Lock()):
            if (loaded := self._models.get(name)) is not None:
                return loaded
            loop = asyncio.get_running_loop()
            report = progress or self._progress
            loaded = await loop.run_in_executor(self._executor, self._load, name, report)
            if self._closed:
                loaded.free()
                raise BackendError("the embedded backend is closed")
            self._models[name] = loaded
            return loaded

    def _load(self, name: str, report: ProgressFn) -> _LoadedModel:
        path = self._catalog.resolve_model_path(name, self._cache_dir, report)
        slots, context = self._settings.slots, self._settings.context_size
        report(
            f"{name}: loading {path.stat().st_size / 1e6:,.0f} MB with {self.threads} threads, "
            f"{slots} slot(s) of {context} tokens …"
        )
        started = time.monotonic()
        socket_dir = Path(tempfile.mkdtemp(prefix="salon-llama-"))
        try:
            server = xllamacpp.Server(runtime_params(self._settings, path, socket_dir))
        except Exception as exc:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise _to_salon_error(
                exc, f"could not load embedded model {name!r} from {path}"
            ) from exc
        report(f"{name}: loaded in {time.monotonic() - started:.1f} s")
        return _LoadedModel(name, server, _SlotTable(slots), socket_dir)


def runtime_params(settings: EmbeddedSettings, model_path: Path, socket_dir: Path) -> Any:
    """xllamacpp's `CommonParams` for one model (public so benchmarks run the same runtime)."""
    threads = resolve_threads(settings)
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.n_parallel = settings.slots
    # llama.cpp splits n_ctx evenly between slots: each conversation gets context_size.
    params.n_ctx = settings.context_size * settings.slots
    params.kv_unified = False
    params.fit_params = False  # honour the configured context rather than shrinking it
    params.ctx_shift = False  # a too-long conversation is an error, not silent forgetting
    # Cancellation takes effect between prompt batches; smaller batches bound that latency.
    params.n_batch = PROMPT_BATCH_TOKENS
    params.n_ubatch = PROMPT_BATCH_TOKENS
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cache_prompt = True
    params.cache_ram_mib = PROMPT_CACHE_RAM_MIB
    params.prefill_assistant = True  # a trailing assistant message is continued
    # Keep any reasoning text in the content we relay instead of dropping it.
    params.reasoning_format = xllamacpp.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
    params.verbosity = 3 if runtime_logger.isEnabledFor(logging.DEBUG) else 0
    private_listener(params, socket_dir)
    return params


def private_listener(params: Any, socket_dir: Path) -> None:
    """The runtime always opens an HTTP listener. Keep it off the network (a unix socket in
    a private directory) and closed even to local users (a key nobody knows, no /slots,
    which would show conversation text)."""
    params.hostnames = [str(socket_dir / "llama.sock")]
    params.api_keys = [secrets.token_urlsafe(32)]
    params.endpoint_slots = False
    params.endpoint_metrics = False
    params.endpoint_props = False
    params.ui = False
    params.n_threads_http = 1


def resolve_threads(settings: EmbeddedSettings) -> int:
    return settings.threads or os.cpu_count() or 1


@dataclass(slots=True)
class _LoadedModel:
    name: str
    server: Any  # xllamacpp.Server; untyped, the package ships no stubs
    slots: _SlotTable
    socket_dir: Path

    def free(self) -> None:
        # Dropping the last reference runs the C++ destructor, which stops llama.cpp's loop.
        self.server = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class _SlotTable:
    """Pins each conversation to one llama.cpp slot so its KV cache is still there next turn.

    A new conversation takes a slot nobody owns, else the slot of the least recently active
    conversation that is not generating right now. Only the event loop thread touches this.
    """

    def __init__(self, n_slots: int) -> None:
        self._n_slots = n_slots
        self._owners: OrderedDict[str, int] = OrderedDict()  # oldest activity first
        self._busy = [0] * n_slots

    def acquire(self, session_key: str | None) -> int:
        if session_key is None:
            return -1  # llama.cpp picks the slot whose cached prompt matches best
        slot = self._owners.get(session_key)
        if slot is None:
            slot = self._take_slot()
        self._owners[session_key] = slot
        self._owners.move_to_end(session_key)
        self._busy[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot >= 0:
            self._busy[slot] -= 1

    def _take_slot(self) -> int:
        owned = set(self._owners.values())
        for slot in range(self._n_slots):
            if slot not in owned:
                return slot
        victim = next((k for k, s in self._owners.items() if not self._busy[s]), None)
        if victim is None:
            victim = next(iter(self._owners))  # all busy: queue behind the oldest
        return self._owners.pop(victim)


@dataclass(frozen=True, slots=True)
class _End:
    failure: BaseException | None = None


class _Generation:
    """One chat completion running on a worker thread, relayed to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Chunk | _End] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    # -- worker thread side

    def on_chunk(self, chunk: Chunk) -> bool:
        """xllamacpp's callback: True tells llama.cpp to stop and cancel the task."""
        if self._cancelled.is_set():
            return True
        self._post(chunk)
        return False

    def end(self, failure: BaseException | None = None) -> None:
        self._post(_End(failure))

    def _post(self, item: Chunk | _End) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancelled.set()

    # -- event loop side

    async def events(self) -> AsyncIterator[StreamEvent]:
        reason: FinishReason | None = None
        usage = Usage()
        timings: Chunk = {}
        while not isinstance(item := await self._queue.get(), _End):
            if "error" in item:
                raise _to_salon_error(item)
            delta, chunk_reason, chunk_usage = _read_chunk(item)
            if delta is not None:
                yield delta
            reason = chunk_reason or reason
            usage = chunk_usage or usage
            timings = item.get("timings") or timings
        if item.failure is not None:
            raise _to_salon_error(item.failure)
        if reason is None:
            if self._cancelled.is_set():  # only `close()` cancels a stream still being read
                raise BackendError("the embedded backend was closed during generation")
            raise BackendError("the embedded model stopped without finishing its answer")
        _log_timings(timings)
        yield Finished(reason, usage)


def _log_timings(timings: Chunk) -> None:
    """llama.cpp's accounting of one generation; `cache_n` shows whether KV reuse worked."""
    if timings and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "prompt: %s tokens evaluated, %s reused from cache, %.0f ms; "
            "decode: %s tokens at %.1f tok/s",
            timings.get("prompt_n"),
            timings.get("cache_n"),
            timings.get("prompt_ms", 0.0),
            timings.get("predicted_n"),
            timings.get("predicted_per_second", 0.0),
            extra={"llama_timings": timings},
        )


def _generate(server: Any, body: Chunk, generation: _Generation) -> None:
    """Worker thread: run one chat completion; every outcome ends in `generation.end`."""
    try:
        server.handle_chat_completions(body, generation.on_chunk)
    except Exception as exc:
        generation.end(exc)
    else:
        generation.end()


def _request_body(request: CompletionRequest, slot: int) -> Chunk:
    params = request.params
    body: Chunk = {
        # Passed verbatim every turn: the template then renders earlier turns to the same
        # tokens, which is what lets the slot's cached prefix match.
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_prompt": True,
        "id_slot": slot,
        # A progress chunk after every prompt batch gives our callback the chance to cancel
        # while a long prompt is still being evaluated, not only once tokens flow.
        "return_progress": True,
    }
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
    return body


def _read_chunk(chunk: Chunk) -> tuple[TextDelta | None, FinishReason | None, Usage | None]:
    """Text (with log-probabilities when asked for), finish reason and usage carried by one
    OpenAI-style stream chunk."""
    text = ""
    logprobs: tuple[TokenLogprobs, ...] = ()
    reason: FinishReason | None = None
    for choice in chunk.get("choices") or ():
        text += (choice.get("delta") or {}).get("content") or ""
        if raw_logprobs := choice.get("logprobs"):
            logprobs += openai_logprobs(raw_logprobs)
        if finish := choice.get("finish_reason"):
            reason = FinishReason.LENGTH if finish == "length" else FinishReason.STOP
    usage = None
    if raw := chunk.get("usage"):
        usage = Usage(int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0)))
    return (TextDelta(text, logprobs) if text else None), reason, usage


def _to_salon_error(failure: Mapping[str, Any] | BaseException, context: str = "") -> SalonError:
    """The one place where xllamacpp's failures (exceptions or error chunks) become ours."""
    prefix = f"{context}: " if context else "embedded model failed: "
    if isinstance(failure, SalonError):
        return failure
    if isinstance(failure, BaseException):
        return BackendError(f"{prefix}{failure}")
    error = failure.get("error", failure)
    if not isinstance(error, Mapping):
        return BackendError(f"{prefix}{error}")
    kind = error.get("type")
    message = str(error.get("message", "unknown error"))
    if kind == "exceed_context_size_error":
        return ContextTooLong(
            f"The conversation is too long for this model: it needs {error.get('n_prompt_tokens')}"
            f" tokens but the context holds {error.get('n_ctx')}. Start a new conversation or "
            "shorten the messages.",
            param="messages",
        )
    if kind == "invalid_request_error":
        return InvalidRequest(f"the embedded model rejected the request: {message}")
    return BackendError(f"{prefix}{message}")
