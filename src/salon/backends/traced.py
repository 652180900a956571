"""A TextBackend that traces the one it wraps (only built when tracing is enabled).

The registry wraps twice: each model id's backend in a generation span (what a user asked
of a model: for a route, its failovers and hedges included), and each provider's backend in
a backend-call span (one per attempt, a CLIENT span). A backend call runs with its span
current, so the OpenAI-compatible adapter sends its `traceparent` upstream.

Attributes follow OpenTelemetry's GenAI conventions where they have one (`gen_ai.*`), and
salon's own otherwise: the outcome (`ok`, `cancelled` or the error code, as in the
metrics), time to first token, chunks. Per chunk: one counter increment. The cost is the
SDK's, per span (creation, then OTLP encoding in the export thread): measured in
docs/benchmarks.md ("Tracing overhead"); `tracing.sample_ratio` bounds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from time import perf_counter
from typing import TYPE_CHECKING

from salon.backends.base import TextBackend
from salon.domain import CompletionRequest, Finished, StreamEvent, TextDelta
from salon.errors import SalonError
from salon.observability.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class TracedBackend:
    """`generation=True`: the span of a generation of model id `model_id`; otherwise the
    span of a call to provider `provider`."""

    def __init__(
        self,
        inner: TextBackend,
        tracing: Tracing,
        *,
        provider: str,
        model_id: str | None = None,
    ) -> None:
        from opentelemetry import context, trace

        self.inner = inner
        self._tracer = tracing.tracer
        self._provider = provider
        self._model_id = model_id
        self._kind = trace.SpanKind.INTERNAL if model_id else trace.SpanKind.CLIENT
        self._attach, self._detach = context.attach, context.detach
        self._in_context = trace.set_span_in_context
        self._error = trace.StatusCode.ERROR

    def _start(self, request: CompletionRequest) -> Span:
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": request.model,
            "salon.backend": self._provider,
        }
        if request.params.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = request.params.max_tokens
        if self._model_id:
            attributes["salon.model"] = self._model_id
            name = f"generation {self._model_id}"
        else:
            name = f"chat {request.model}"
        return self._tracer.start_span(name, kind=self._kind, attributes=attributes)

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        span = self._start(request)
        current = self._in_context(span)
        outcome = "cancelled"  # unless it finishes or fails
        chunks = 0
        ended = False  # at the Finished event: callers need not close the stream
        start = perf_counter()
        try:
            async with aclosing(self.inner.stream(request)) as events:
                # The span is current while the wrapped stream starts: everything it calls
                # out to (the upstream request with its traceparent, a route's failovers and
                # hedges) happens before its first event. Not after: nothing calls out then,
                # and a chunk costs no context switch.
                token = self._attach(current)
                try:
                    event = await anext(events, None)
                finally:
                    self._detach(token)
                while event is not None:
                    if isinstance(event, TextDelta):
                        if not chunks:
                            ttft = perf_counter() - start
                            span.set_attribute("salon.time_to_first_token_s", round(ttft, 6))
                        chunks += 1
                    elif isinstance(event, Finished) and not ended:
                        ended = True
                        self._finished(span, event, chunks)
                    yield event
                    event = await anext(events, None)
        except SalonError as exc:
            outcome = exc.code
            self._failed(span, exc, ended)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            outcome = "internal_error"
            self._failed(span, exc, ended)
            raise
        finally:
            if not ended:
                span.set_attributes({"salon.outcome": outcome, "salon.chunks": chunks})
                span.end()

    def _finished(self, span: Span, event: Finished, chunks: int) -> None:
        usage = event.usage
        span.set_attributes(
            {
                "salon.outcome": "ok",
                "salon.chunks": chunks,
                "gen_ai.response.finish_reasons": [event.reason.value],
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens or chunks,
            }
        )
        span.end()

    def _failed(self, span: Span, exc: BaseException, ended: bool) -> None:
        if not ended:  # an ended span takes nothing more
            span.set_status(self._error, str(exc)[:200])
            span.record_exception(exc)

    async def close(self) -> None:
        await self.inner.close()
