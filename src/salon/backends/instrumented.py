"""A TextBackend that measures the one it wraps: time to first token, inter-token latency,
completion tokens, outcomes, streams in flight and passive health. The registry wraps every
backend in one, so the OpenAI gateway and the web app's generation jobs are both measured.

Per chunk: one monotonic clock read and one histogram observation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from time import perf_counter

from salon.backends.base import TextBackend
from salon.domain import CompletionRequest, Finished, StreamEvent, TextDelta
from salon.errors import BackendError, SalonError
from salon.observability.metrics import Metrics


class InstrumentedBackend:
    def __init__(self, inner: TextBackend, name: str, metrics: Metrics) -> None:
        self.inner = inner
        self.name = name
        self._metrics = metrics

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        m = self._metrics.model(self.name, request.model)
        m.in_flight.inc()
        outcome = "cancelled"
        chunks = 0
        ended = False  # recorded at the Finished event: callers need not close the stream
        start = last = perf_counter()
        try:
            async with aclosing(self.inner.stream(request)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        now = perf_counter()
                        if chunks:
                            m.itl.observe(now - last)
                        else:
                            m.ttft.observe(now - start)
                            m.healthy()
                        last = now
                        chunks += 1
                    elif isinstance(event, Finished) and not ended:
                        ended = True
                        m.completion_tokens.inc(event.usage.completion_tokens or chunks)
                        m.in_flight.dec()
                        m.outcome("ok")
                        m.healthy()
                    yield event
        except BackendError as exc:
            outcome = exc.code
            m.failed()
            raise
        except SalonError as exc:
            outcome = exc.code
            raise
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except Exception:
            outcome = "internal_error"
            raise
        finally:
            if not ended:
                if chunks:  # ended without a Finished: count what was sent
                    m.completion_tokens.inc(chunks)
                m.in_flight.dec()
                m.outcome(outcome)

    async def close(self) -> None:
        await self.inner.close()
