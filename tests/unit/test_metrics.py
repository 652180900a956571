"""The instrumented backend against the real FakeBackend, the JSON log formatter and
request-id validation."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import aclosing

import pytest

from salon.backends.base import complete
from salon.backends.fakes import FakeBackend
from salon.backends.instrumented import InstrumentedBackend
from salon.domain import ChatMessage, CompletionRequest, SamplingParams, TextDelta
from salon.errors import BackendUnavailable, UnknownModel
from salon.observability.context import new_request_id, request_id, valid_request_id
from salon.observability.logs import JsonFormatter, TextFormatter
from salon.observability.metrics import Metrics


def ask(model: str, text: str = "hello there", max_tokens: int | None = None) -> CompletionRequest:
    return CompletionRequest(
        model, (ChatMessage("user", text),), SamplingParams(max_tokens=max_tokens)
    )


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_a_finished_stream_is_measured() -> None:
    metrics = Metrics()
    backend = InstrumentedBackend(FakeBackend(0.0), "fake", metrics)
    done = await complete(backend, ask("echo"))
    assert done.text == "You said: hello there"
    labels = {"backend": "fake", "model": "echo"}
    assert value(metrics, "salon_backend_time_to_first_token_seconds_count", **labels) == 1
    # 4 chunks: one first token, three gaps.
    assert value(metrics, "salon_backend_inter_token_latency_seconds_count", **labels) == 3
    assert value(metrics, "salon_backend_completion_tokens_total", **labels) == 4
    assert value(metrics, "salon_backend_requests_total", outcome="ok", **labels) == 1
    assert value(metrics, "salon_backend_in_flight", **labels) == 0
    assert value(metrics, "salon_backend_up", backend="fake") == 1


async def test_a_backend_failure_is_counted_by_code_and_marks_it_down() -> None:
    metrics = Metrics()
    backend = InstrumentedBackend(FakeBackend(0.0), "fake", metrics)
    with pytest.raises(BackendUnavailable):
        await complete(backend, ask("down"))
    labels = {"backend": "fake", "model": "down"}
    outcome = "backend_unavailable"
    assert value(metrics, "salon_backend_requests_total", outcome=outcome, **labels) == 1
    assert value(metrics, "salon_backend_time_to_first_token_seconds_count", **labels) == 0
    assert value(metrics, "salon_backend_up", backend="fake") == 0
    assert value(metrics, "salon_backend_last_error_timestamp_seconds", backend="fake") > 0
    assert value(metrics, "salon_backend_in_flight", **labels) == 0


async def test_a_mid_stream_failure_keeps_the_tokens_sent() -> None:
    metrics = Metrics()
    backend = InstrumentedBackend(FakeBackend(0.0), "fake", metrics)
    with pytest.raises(BackendUnavailable):
        await complete(backend, ask("fail"))
    labels = {"backend": "fake", "model": "fail"}
    assert value(metrics, "salon_backend_completion_tokens_total", **labels) == 3
    assert value(metrics, "salon_backend_time_to_first_token_seconds_count", **labels) == 1


async def test_a_caller_error_is_not_a_backend_failure() -> None:
    metrics = Metrics()
    backend = InstrumentedBackend(FakeBackend(0.0), "fake", metrics)
    with pytest.raises(UnknownModel):
        await complete(backend, ask("nope"))
    labels = {"backend": "fake", "model": "nope"}
    assert value(metrics, "salon_backend_requests_total", outcome="model_not_found", **labels) == 1
    assert metrics.registry.get_sample_value("salon_backend_up", {"backend": "fake"}) is None


async def test_closing_the_stream_early_counts_as_cancelled() -> None:
    metrics = Metrics()
    backend = InstrumentedBackend(FakeBackend(0.0), "fake", metrics)
    labels = {"backend": "fake", "model": "slow"}
    async with aclosing(backend.stream(ask("slow", max_tokens=50))) as events:
        seen = 0
        async for event in events:
            assert isinstance(event, TextDelta)
            seen += 1
            assert value(metrics, "salon_backend_in_flight", **labels) == 1
            if seen == 5:
                break
    assert value(metrics, "salon_backend_requests_total", outcome="cancelled", **labels) == 1
    assert value(metrics, "salon_backend_completion_tokens_total", **labels) == 5
    assert value(metrics, "salon_backend_in_flight", **labels) == 0


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.http("GET", "/v1/models", 200, 0.001)
    assert value(one, "salon_http_requests_total", method="GET", route="/v1/models", status="200")
    assert not value(
        two, "salon_http_requests_total", method="GET", route="/v1/models", status="200"
    )
    assert b"salon_http_request_duration_seconds_bucket" in one.render()


@pytest.mark.parametrize("good", ["abc", "4bf92f3577b34da6a3ce929d0e0e4736", "a.b:c-d_e", "x" * 64])
def test_a_safe_request_id_is_kept(good: str) -> None:
    assert valid_request_id(good) == good


@pytest.mark.parametrize("bad", [None, "", "x" * 65, "a b", "a\nb", "<script>", "ü", "a;b"])
def test_an_unsafe_request_id_is_refused(bad: str | None) -> None:
    assert valid_request_id(bad) is None


def test_new_request_ids_are_valid_and_distinct() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(valid_request_id(i) for i in ids)


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("salon.test", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_json_lines_carry_the_fields_and_the_request_id() -> None:
    token = request_id.set("req-1")
    try:
        line = JsonFormatter().format(record("%d streams", 3, route="/v1/models", status=200))
    finally:
        request_id.reset(token)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "warning"
    assert entry["logger"] == "salon.test"
    assert entry["message"] == "3 streams"
    assert entry["request_id"] == "req-1"
    assert entry["route"] == "/v1/models" and entry["status"] == 200
    assert entry["time"].endswith("+00:00")


def test_json_lines_without_a_request_have_a_null_id_and_keep_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed")
        made.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(made))
    assert entry["request_id"] is None
    assert "ValueError: boom" in entry["exception"]


def test_secrets_never_reach_the_log() -> None:
    made = record(
        "header was Bearer sk-salon-abcdef123456 and key %s",
        "sk-salon-0123456789abcdef",
        authorization="Bearer hunter2",
        headers={"cookie": "salon_session=s3cret", "accept": "text/plain"},
        password="hunter2",
    )
    for line in (JsonFormatter().format(made), TextFormatter().format(made)):
        assert "sk-salon-" not in line
        assert "hunter2" not in line
        assert "s3cret" not in line
    entry = json.loads(JsonFormatter().format(made))
    assert entry["headers"]["accept"] == "text/plain"
    assert entry["authorization"] == "[redacted]"


def test_fast_histograms_expose_cumulative_le_buckets() -> None:
    from prometheus_client import CollectorRegistry

    from salon.observability.metrics import FastHistograms

    family = FastHistograms("x_seconds", "x", ("backend",), (0.1, 1.0))
    registry = CollectorRegistry()
    registry.register(family)
    child = family.child("a")
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        child.observe(seconds)

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"backend": "a", **labels})

    assert get("x_seconds_bucket", le="0.1") == 2  # a bound is inclusive, as Prometheus has it
    assert get("x_seconds_bucket", le="1.0") == 4
    assert get("x_seconds_bucket", le="+Inf") == 5
    assert get("x_seconds_count") == 5
    assert get("x_seconds_sum") == pytest.approx(8.65)
