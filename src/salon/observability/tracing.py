"""Optional OpenTelemetry tracing: a span per HTTP request (server), per generation and per
backend call (`salon.backends.traced`), exported over OTLP/HTTP, with W3C `traceparent`
taken from callers and sent on to OpenAI-compatible backends.

Off by default, and then nothing here imports OpenTelemetry (an optional extra,
`salon[otel]`): the composition root builds a `Tracing` only when `tracing.enabled` is set,
and then a missing package is a start-up error that says what to install. Like the metrics
registry, the tracer provider is salon's own: the process-global one is left alone.

Context crosses async generators only while they run: a span is made current around each
step of the stream it wraps (attach/detach inside one `__anext__`, in one task), never
across a `yield`, where the consumer's context would leak into it or the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from salon.errors import ConfigError
from salon.observability.context import request_id
from salon.settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

INSTALL_HINT = "pip install 'salon[otel]'"
# Incoming trace context headers (W3C Trace Context), as ASGI spells them.
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})


def start_tracing(config: TracingSettings) -> Tracing | None:
    """A `Tracing` exporting to `config.endpoint` when tracing is enabled, else None."""
    if not config.enabled:
        return None
    return Tracing(config)


class Tracing:
    """salon's tracer provider, its tracer and the W3C propagator. `exporter` replaces the
    OTLP/HTTP one (tests pass the SDK's in-memory exporter)."""

    def __init__(self, config: TracingSettings, exporter: SpanExporter | None = None) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            if exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                exporter = OTLPSpanExporter(
                    endpoint=config.endpoint,
                    headers=config.headers or None,
                    timeout=config.export_timeout_s,
                )
        except ImportError as exc:
            raise ConfigError(
                f"tracing.enabled is set, but OpenTelemetry is not installed "
                f"({exc.name} is missing): {INSTALL_HINT}"
            ) from exc
        from salon import __version__

        self.config = config
        self.provider: TracerProvider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=Resource.create(
                {"service.name": config.service_name, "service.version": __version__}
            ),
            shutdown_on_exit=False,  # the app's lifespan shuts it down
        )
        # Spans are exported in batches by the processor's own thread, never on the event
        # loop; a slow or absent collector costs dropped spans, not latency.
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("salon", __version__)
        self._propagator = TraceContextTextMapPropagator()

    @property
    def propagate_to_backends(self) -> bool:
        return self.config.propagate_to_backends

    def extract(self, headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
        """The caller's trace context from ASGI headers, or None (a new trace)."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in _TRACE_HEADERS
        }
        return self._propagator.extract(carrier) if carrier else None

    def inject(self, headers: dict[str, str]) -> None:
        """Adds `traceparent` (and `tracestate`) of the current span to outgoing headers."""
        self._propagator.inject(headers)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Exports what is left (bounded by the exporter's timeout) and stops."""
        self.provider.shutdown()


class TracingMiddleware:
    """A server span per HTTP request, from the request to the end of its response body
    (for a stream, its last chunk), named `METHOD /route/{template}`. Pure ASGI: nothing per
    chunk. Placed inside `ObservabilityMiddleware`, so the request id is known."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        from opentelemetry import context, trace

        self.app = app
        self.tracing = tracing
        self._attach, self._detach = context.attach, context.detach
        self._in_context = trace.set_span_in_context
        self._server = trace.SpanKind.SERVER
        self._error = trace.StatusCode.ERROR

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        parent = self.tracing.extract(scope["headers"])
        span = self.tracing.tracer.start_span(
            method,
            context=parent,
            kind=self._server,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        token = self._attach(self._in_context(span, parent))
        status = 500  # unless a response starts

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            self._detach(token)
            self._end(span, scope, method, status)

    def _end(self, span: Span, scope: Scope, method: str, status: int) -> None:
        route = getattr(scope.get("route"), "path", None)
        if route:
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        rid = request_id.get()
        if rid:
            span.set_attribute("salon.request_id", rid)
        if status >= 500:
            span.set_status(self._error)
        span.end()
