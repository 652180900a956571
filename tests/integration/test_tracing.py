"""OpenTelemetry tracing through the real app over real HTTP (uvicorn on loopback):

- the spans of a /v1 stream and of a web-app turn, taken by the SDK's in-memory exporter:
  a server span per request (joining a caller's traceparent), a generation span and a
  backend-call span under it, with model, backend, tokens, time to first token, outcome;
- a failed generation's spans carry the error code and an error status;
- the OTLP/HTTP exporter really POSTs the spans to a collector (a fake one on loopback,
  decoded with the OTLP protobuf), and the backend call's traceparent reaches an
  OpenAI-compatible upstream (a fake one on loopback that records headers);
- off (the default), nothing of OpenTelemetry is imported; on without the packages,
  `salon serve` refuses to start and says what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

pytest.importorskip("opentelemetry.sdk", reason="tracing tests need salon[otel]")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from salon.app import create_app
from salon.observability.tracing import Tracing
from salon.settings import ProviderSettings, RouteSettings, Settings, TracingSettings
from tests.integration.conftest_server import serving_app as serving

REPO = Path(__file__).resolve().parents[2]
# A caller's trace: salon's server span must join it.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def settings(tmp_path: Path, **extra: Any) -> Settings:
    providers = {"fake": ProviderSettings(kind="fake", fake_delay_s=0.001)}
    providers.update(extra.pop("providers", {}))
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/salon.db",
        "models": ["fake:echo", "fake:down"],
        "providers": providers,
        "personalization": {"embedder": "hashing", "extraction": "off"},
        "flush_interval_s": 0.05,
    }
    return Settings(**(values | extra))


@contextlib.asynccontextmanager
async def loopback(app: web.Application) -> AsyncIterator[str]:
    """A small aiohttp app on a free loopback port (the fake upstream, the fake collector)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def signed_up(client: httpx.AsyncClient) -> tuple[str, str]:
    """(csrf token, API key) of a new account."""
    response = await client.post("/api/auth/signup", json={"username": "ann", "password": "pw" * 6})
    assert response.status_code == 201, response.text
    csrf = response.json()["csrf_token"]
    response = await client.post("/api/keys", json={"name": "t"}, headers={"x-csrf-token": csrf})
    assert response.status_code == 201, response.text
    return csrf, response.json()["key"]


async def v1_stream(
    client: httpx.AsyncClient, key: str, model: str, user: str | None = None, **headers: str
) -> tuple[int, str]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "hi there"}],
    }
    if user is not None:
        body["user"] = user  # a route's session key: which target it tries first
    async with client.stream(
        "POST",
        "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
    ) as response:
        return response.status_code, "".join([line async for line in response.aiter_lines()])


async def finished(
    tracing: Tracing, exporter: InMemorySpanExporter, *names: str
) -> tuple[ReadableSpan, ...]:
    """The finished spans once those named are among them: a server span ends after the
    last byte of its response is sent, so a moment after the client has read it."""
    for _ in range(100):
        tracing.force_flush()
        spans = exporter.get_finished_spans()
        if set(names) <= {span.name for span in spans}:
            return spans
        await asyncio.sleep(0.05)
    raise AssertionError(f"spans {names} not finished in 5 s: {[s.name for s in spans]}")


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_v1_stream_makes_server_generation_and_backend_spans(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(enabled=True), exporter)
    app = create_app(settings(tmp_path), tracing=tracing)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        _, key = await signed_up(client)
        status, text = await v1_stream(client, key, "fake:echo", traceparent=TRACEPARENT)
        assert (status, "You" in text) == (200, True)
        spans = await finished(tracing, exporter, "POST /v1/chat/completions", "chat echo")

    [server] = by_name(spans, "POST /v1/chat/completions")
    assert server.kind is SpanKind.SERVER
    assert server.context is not None
    assert format(server.context.trace_id, "032x") == CALLER_TRACE  # joined the caller's trace
    assert parent_of(server) == int(CALLER_SPAN, 16)
    attributes = dict(server.attributes or {})
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["http.response.status_code"] == 200
    assert attributes["salon.request_id"]

    [generation] = by_name(spans, "generation fake:echo")
    assert parent_of(generation) == server.context.span_id
    g = dict(generation.attributes or {})
    assert g["salon.model"] == "fake:echo"
    assert g["gen_ai.request.model"] == "echo"
    assert g["salon.backend"] == "fake"
    assert g["salon.outcome"] == "ok"
    assert g["gen_ai.usage.output_tokens"] > 0
    assert g["gen_ai.response.finish_reasons"] == ("stop",)
    assert 0 < g["salon.time_to_first_token_s"] < 5

    [call] = by_name(spans, "chat echo")
    assert call.kind is SpanKind.CLIENT
    assert generation.context is not None
    assert parent_of(call) == generation.context.span_id
    assert dict(call.attributes or {})["salon.outcome"] == "ok"
    # The spans nest in time too: a generation ends within its request's span.
    assert server.start_time is not None and server.end_time is not None
    assert generation.end_time is not None
    assert server.start_time <= generation.start_time <= generation.end_time <= server.end_time


async def test_a_failed_generation_carries_its_error(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(enabled=True), exporter)
    app = create_app(settings(tmp_path), tracing=tracing)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        _, key = await signed_up(client)
        status, text = await v1_stream(client, key, "fake:down")
        assert status == 503  # failed before its first token: an HTTP error
        assert "backend_unavailable" in text
        spans = await finished(tracing, exporter, "POST /v1/chat/completions", "chat down")

    [generation] = by_name(spans, "generation fake:down")
    assert dict(generation.attributes or {})["salon.outcome"] == "backend_unavailable"
    assert generation.status.status_code is StatusCode.ERROR
    assert [e.name for e in generation.events] == ["exception"]
    [call] = by_name(spans, "chat down")
    assert dict(call.attributes or {})["salon.outcome"] == "backend_unavailable"


async def test_a_routes_failover_is_one_generation_over_two_backend_calls(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(enabled=True), exporter)
    config = settings(
        tmp_path,
        models=["pool:chat"],
        routes={"pool:chat": RouteSettings(targets=["fake:down", "fake:echo"])},
    )
    app = create_app(config, tracing=tracing)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        _, key = await signed_up(client)
        # Sessions stick to a target by hashing: users until one starts on the dead target
        # (each does with probability 1/2; its breaker opens only after 3 failures).
        for attempt in range(20):
            exporter.clear()
            status, _ = await v1_stream(client, key, "pool:chat", user=f"user-{attempt}")
            assert status == 200
            spans = await finished(tracing, exporter, "POST /v1/chat/completions")
            if by_name(spans, "chat down"):
                break

    [generation] = by_name(spans, "generation pool:chat")
    assert generation.context is not None
    assert dict(generation.attributes or {})["salon.outcome"] == "ok"
    calls = [s for s in spans if parent_of(s) == generation.context.span_id]
    outcomes = [(s.name, dict(s.attributes or {})["salon.outcome"]) for s in calls]
    assert outcomes == [("chat down", "backend_unavailable"), ("chat echo", "ok")]


async def test_a_web_app_turn_is_traced_from_its_request(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(enabled=True), exporter)
    app = create_app(settings(tmp_path), tracing=tracing)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        csrf, _ = await signed_up(client)
        headers = {"x-csrf-token": csrf}
        conversation = (await client.post("/api/conversations", json={}, headers=headers)).json()
        turn = await client.post(
            f"/api/conversations/{conversation['id']}/messages",
            json={"content": "hello"},
            headers=headers,
        )
        assert turn.status_code == 201, turn.text
        answer = turn.json()["assistant_message"]["id"]
        async with client.stream("GET", f"/api/messages/{answer}/stream") as response:
            assert "event: done" in "".join([line async for line in response.aiter_lines()])
        spans = await finished(
            tracing,
            exporter,
            "POST /api/conversations/{conversation_id}/messages",
            "GET /api/messages/{message_id}/stream",
        )

    [post] = by_name(spans, "POST /api/conversations/{conversation_id}/messages")
    [generation] = by_name(spans, "generation fake:echo")
    # The generation job is a task the request started: its span is the request's child,
    # though it may outlive it.
    assert post.context is not None
    assert parent_of(generation) == post.context.span_id
    assert dict(generation.attributes or {})["salon.outcome"] == "ok"
    assert by_name(spans, "GET /api/messages/{message_id}/stream")


# -- the real exporter and propagation, against fakes on loopback ----------------------------


def fake_upstream(seen: list[dict[str, str]]) -> web.Application:
    """An OpenAI-compatible upstream that records each request's headers."""

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in (
            {"choices": [{"index": 0, "delta": {"content": "traced"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


def fake_collector(exports: list[ExportTraceServiceRequest]) -> web.Application:
    """An OTLP/HTTP traces endpoint: decodes and keeps each export."""

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        exports.append(export)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    return app


async def test_otlp_export_reaches_a_collector_and_traceparent_reaches_the_upstream(
    tmp_path: Path,
) -> None:
    seen: list[dict[str, str]] = []
    exports: list[ExportTraceServiceRequest] = []
    async with (
        loopback(fake_upstream(seen)) as upstream,
        loopback(fake_collector(exports)) as collector,
    ):
        config = settings(
            tmp_path,
            models=["up:model-a"],
            providers={"up": ProviderSettings(kind="openai", base_url=f"{upstream}/v1")},
            tracing=TracingSettings(
                enabled=True, endpoint=f"{collector}/v1/traces", service_name="salon-test"
            ),
        )
        app = create_app(config)  # the real OTLP/HTTP exporter, from settings
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            _, key = await signed_up(client)
            status, text = await v1_stream(client, key, "up:model-a")
            assert (status, "traced" in text) == (200, True)
        # Stopping the app flushed the batch to the collector.

    spans = {
        span.name: span
        for export in exports
        for resource_spans in export.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    }
    resources = {
        attribute.value.string_value
        for export in exports
        for resource_spans in export.resource_spans
        for attribute in resource_spans.resource.attributes
        if attribute.key == "service.name"
    }
    assert resources == {"salon-test"}
    assert {"POST /v1/chat/completions", "generation up:model-a", "chat model-a"} <= set(spans)

    [headers] = seen
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    call = spans["chat model-a"]
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert trace_id == call.trace_id.hex()  # the upstream joins salon's trace ...
    assert parent_id == call.span_id.hex()  # ... under the backend call's span
    assert spans["generation up:model-a"].trace_id == call.trace_id


async def test_a_collector_that_is_down_costs_spans_not_requests(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    config = settings(
        tmp_path,
        tracing=TracingSettings(
            enabled=True, endpoint=f"http://127.0.0.1:{dead}/v1/traces", export_timeout_s=1
        ),
    )
    started = asyncio.get_running_loop().time()
    async with serving(create_app(config)) as url, httpx.AsyncClient(base_url=url) as client:
        _, key = await signed_up(client)
        for _ in range(3):
            status, text = await v1_stream(client, key, "fake:echo")
            assert (status, "[DONE]" in text) == (200, True)
    # Stopping flushed to nowhere, bounded by the export timeout.
    assert asyncio.get_running_loop().time() - started < 15


# -- off by default; on without the packages --------------------------------------------------


def run_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "SALON_DATA_DIR": str(tmp_path), **env},
    )


def test_tracing_off_imports_nothing_of_opentelemetry(tmp_path: Path) -> None:
    # The whole app, started and stopped (its services built: registry, backends, store).
    code = (
        "import asyncio, sys\n"
        "from salon.app import create_app\n"
        "from salon.settings import Settings\n"
        "app = create_app(Settings(models=['fake:echo'],"
        " personalization={'embedder': 'hashing'}))\n"
        "async def run():\n"
        "    async with app.router.lifespan_context(app):\n"
        "        pass\n"
        "asyncio.run(run())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tracing_on_without_the_packages_refuses_to_start(tmp_path: Path) -> None:
    # None in sys.modules makes `import opentelemetry...` fail as if it were not installed.
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "from salon.cli import main\n"
        "sys.exit(main(['serve', '--port', '1']))\n"
    )
    result = run_python(code, tmp_path, SALON_MODELS="fake:echo", SALON_TRACING__ENABLED="true")
    assert result.returncode == 2
    assert "OpenTelemetry is not installed" in result.stderr
    assert "pip install 'salon[otel]'" in result.stderr
