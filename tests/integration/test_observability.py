"""Observability over real HTTP: /metrics after /v1 and web-app generations, request ids,
the metrics token."""

from __future__ import annotations

import re
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest

from salon.app import create_app
from salon.settings import PersonalizationSettings, ProviderSettings, Settings
from tests.integration.conftest_server import serving_app

from .test_chat_api import sign_up


def running(settings: Settings) -> AbstractAsyncContextManager[str]:
    return serving_app(create_app(settings))


def settings_for(database_url: str, tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        models=["fake:echo", "fake:down"],
        flush_interval_s=0.05,
        providers={"fake": ProviderSettings(kind="fake", fake_delay_s=0.004)},
        # Memory extraction by the model is a backend call of its own; these tests count
        # the chat's calls only.
        personalization=PersonalizationSettings(extraction="rules"),
        **extra,  # type: ignore[arg-type]
    )


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_v1_and_web_app_generations(
    database_url: str, engine: object, tmp_path: Path
) -> None:
    async with running(settings_for(database_url, tmp_path)) as base_url:
        ann = await sign_up(base_url, "ann")
        key = (await ann.call("POST", "/api/keys", {"name": "metrics"})).json()["key"]
        async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
            auth = {"authorization": f"Bearer {key}"}
            body = {"model": "fake:echo", "messages": [{"role": "user", "content": "hi you"}]}
            streamed = await client.post(
                "/v1/chat/completions", json={**body, "stream": True}, headers=auth
            )
            assert streamed.status_code == 200 and "[DONE]" in streamed.text
            down = await client.post(
                "/v1/chat/completions", json={**body, "model": "fake:down"}, headers=auth
            )
            assert down.status_code == 503
            scraped = await client.get("/metrics")
            assert scraped.status_code == 200
            assert scraped.headers["content-type"].startswith("text/plain")
            text = scraped.text
            echo = {"backend": "fake", "model": "echo"}
            assert sample(text, "salon_backend_time_to_first_token_seconds_count", **echo) == 1
            assert sample(text, "salon_backend_inter_token_latency_seconds_count", **echo) == 3
            assert sample(text, "salon_backend_completion_tokens_total", **echo) == 4
            assert sample(text, "salon_backend_requests_total", outcome="ok", **echo) == 1
            assert (
                sample(
                    text,
                    "salon_backend_requests_total",
                    backend="fake",
                    model="down",
                    outcome="backend_unavailable",
                )
                == 1
            )
            assert sample(text, "salon_backend_up", backend="fake") == 0
            assert sample(text, "salon_backend_last_error_timestamp_seconds", backend="fake") > 0
            route = {"method": "POST", "route": "/v1/chat/completions"}
            assert sample(text, "salon_http_requests_total", status="200", **route) == 1
            assert sample(text, "salon_http_requests_total", status="503", **route) == 1
            assert sample(text, "salon_http_request_duration_seconds_count", **route) == 2

            # A web-app generation goes through the same measured backend.
            cid = await ann.new_chat()
            turn = await ann.say(cid, "hello there")
            text, final = await ann.answer(turn["assistant_message"]["id"])
            assert text == "You said: hello there" and final["status"] == "complete"
            text = (await client.get("/metrics")).text
            assert sample(text, "salon_backend_time_to_first_token_seconds_count", **echo) == 2
            assert sample(text, "salon_backend_completion_tokens_total", **echo) == 8
            assert sample(text, "salon_backend_up", backend="fake") == 1
            templated = {"method": "GET", "route": "/api/messages/{message_id}/stream"}
            assert sample(text, "salon_http_requests_total", status="200", **templated) >= 1
            # Paths no route matched share one label.
            assert (await client.get("/no/such/page/123")).status_code == 404
            text = (await client.get("/metrics")).text
            assert sample(text, "salon_http_requests_total", route="<unmatched>") == 1
            assert "/no/such/page" not in text


async def test_request_ids_round_trip(database_url: str, engine: object, tmp_path: Path) -> None:
    async with (
        running(settings_for(database_url, tmp_path)) as base_url,
        httpx.AsyncClient(base_url=base_url) as client,
    ):
        given = await client.get("/api/auth/state", headers={"x-request-id": "trace-42.a"})
        assert given.headers["x-request-id"] == "trace-42.a"
        made = await client.get("/api/auth/state")
        assert re.fullmatch(r"[0-9a-f]{24}", made.headers["x-request-id"])
        unsafe = await client.get("/api/auth/state", headers={"x-request-id": "a b<c>"})
        assert unsafe.headers["x-request-id"] != "a b<c>"
        assert re.fullmatch(r"[0-9a-f]{24}", unsafe.headers["x-request-id"])
        # Errors and streams carry it too.
        missing = await client.get("/v1/models", headers={"x-request-id": "r-401"})
        assert missing.status_code == 401 and missing.headers["x-request-id"] == "r-401"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_metrics_token_is_enforced(database_url: str, engine: object, tmp_path: Path) -> None:
    settings = settings_for(database_url, tmp_path, metrics_token="scrape-me")
    async with running(settings) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        assert (await client.get("/metrics")).status_code == 401
        wrong = await client.get("/metrics", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        right = await client.get("/metrics", headers={"authorization": "Bearer scrape-me"})
        assert right.status_code == 200
        assert "salon_http_requests_total" in right.text
