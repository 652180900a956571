"""Admission control and per-caller limits over real HTTP (uvicorn on loopback ports):
429 + Retry-After on /v1 and in the web app, fast 503 when a model's queue is full, the
admin's run-time limits, and counters shared through Redis (or not, when it is down)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from salon.app import create_app
from salon.settings import LimitsSettings, ModelLimits, ProviderSettings, Settings
from salon.store.counters import RedisCounters
from tests.integration.conftest_server import REDIS_URL, redis_prefix, serving_app

__all__ = ["redis_prefix"]  # a fixture


def settings(tmp_path: Path, limits: LimitsSettings, **extra: Any) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/salon.db",
        models=["fake:echo", "fake:slow"],
        flush_interval_s=0.05,
        providers={"fake": ProviderSettings(kind="fake", fake_delay_s=0.01)},
        personalization={"embedder": "hashing", "extraction": "rules"},  # type: ignore[arg-type]
        limits=limits,
        **extra,
    )


def serving(config: Settings) -> contextlib.AbstractAsyncContextManager[str]:
    return serving_app(create_app(config))


class User:
    def __init__(self, client: httpx.AsyncClient, csrf: str) -> None:
        self.client = client
        self.csrf = csrf

    async def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.client.request(
            method, path, json=body, headers={"x-csrf-token": self.csrf}
        )

    async def key(self) -> str:
        response = await self.call("POST", "/api/keys", {"name": "test"})
        assert response.status_code == 201, response.text
        return str(response.json()["key"])


async def sign_up(base_url: str, name: str) -> User:
    client = httpx.AsyncClient(base_url=base_url, timeout=20)
    response = await client.post("/api/auth/signup", json={"username": name, "password": "pw" * 5})
    assert response.status_code == 201, response.text
    return User(client, response.json()["csrf_token"])


async def sign_in(base_url: str, name: str) -> User:
    client = httpx.AsyncClient(base_url=base_url, timeout=20)
    response = await client.post("/api/auth/login", json={"username": name, "password": "pw" * 5})
    assert response.status_code == 200, response.text
    return User(client, response.json()["csrf_token"])


async def complete(base_url: str, key: str, model: str = "fake:echo") -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
        return await client.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )


def assert_limited(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert int(response.headers["retry-after"]) >= 1


async def test_v1_over_the_per_minute_limit_gets_429_with_retry_after(tmp_path: Path) -> None:
    async with serving(settings(tmp_path, LimitsSettings(user_requests_per_minute=2))) as url:
        ann = await sign_up(url, "ann")
        key = await ann.key()
        for _ in range(2):
            assert (await complete(url, key)).status_code == 200
        refused = await complete(url, key)
        assert_limited(refused, 429, "rate_limit_exceeded")
        assert "2 requests per minute" in refused.json()["error"]["message"]
        bob = await sign_up(url, "bob")
        assert (await complete(url, await bob.key())).status_code == 200  # his own limit
        await ann.client.aclose()
        await bob.client.aclose()


async def test_the_web_app_over_the_limit_gets_429_and_stores_nothing(tmp_path: Path) -> None:
    async with serving(settings(tmp_path, LimitsSettings(user_requests_per_minute=2))) as url:
        ann = await sign_up(url, "ann")
        cid = (await ann.call("POST", "/api/conversations", {"model": "fake:echo"})).json()["id"]
        path = f"/api/conversations/{cid}/messages"
        for text in ("one", "two"):
            assert (await ann.call("POST", path, {"content": text})).status_code == 201
        refused = await ann.call("POST", path, {"content": "three"})
        assert_limited(refused, 429, "rate_limit_exceeded")
        stored = (await ann.call("GET", path)).json()["data"]
        assert [m["content"] for m in stored if m["role"] == "user"] == ["one", "two"]
        await ann.client.aclose()


async def test_a_full_queue_is_refused_fast_and_the_slot_comes_back(tmp_path: Path) -> None:
    one_slot = {"fake:slow": ModelLimits(max_concurrent=1, max_queue=0)}
    async with serving(settings(tmp_path, LimitsSettings(models=one_slot))) as url:
        ann = await sign_up(url, "ann")
        key = await ann.key()
        body = {
            "model": "fake:slow",
            "stream": True,
            "max_tokens": 100_000,  # far longer than the test
            "messages": [{"role": "user", "content": "x"}],
        }
        headers = {"authorization": f"Bearer {key}"}
        async with (
            httpx.AsyncClient(base_url=url, timeout=20) as client,
            client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as held,
        ):
            assert held.status_code == 200
            lines = held.aiter_lines()  # kept: dropping it would close the stream
            await anext(lines)  # generating: the slot is taken
            # Warm the connection path once, then time a refusal.
            assert_limited(await complete(url, key, "fake:slow"), 503, "overloaded")
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                refused = await complete(url, key, "fake:slow")
                timings.append(time.perf_counter() - started)
                assert_limited(refused, 503, "overloaded")
            print("refusals over HTTP, s:", sorted(timings))
            # Refused, not queued: well under any wait (the queue timeout is 60 s). How fast
            # exactly is bench/overload.py's to measure (p99 3.7 ms); under a loaded test
            # run this shared machine takes 30-60 ms for the round trip.
            assert max(timings) < 1.0, timings
            # The web app is refused the same way, before anything is stored.
            cid = (await ann.call("POST", "/api/conversations", {"model": "fake:slow"})).json()
            post = await ann.call(
                "POST", f"/api/conversations/{cid['id']}/messages", {"content": "x"}
            )
            assert_limited(post, 503, "overloaded")
        # The client left: its generation ended and released the slot.
        deadline = time.monotonic() + 5
        while (response := await complete(url, key, "fake:slow")).status_code == 503:
            assert time.monotonic() < deadline, "the slot was not released"
            await asyncio.sleep(0.05)
        assert response.status_code == 200
        await ann.client.aclose()


async def test_a_web_app_job_waits_for_a_slot_and_releases_it(tmp_path: Path) -> None:
    one_slot = {"fake:slow": ModelLimits(max_concurrent=1, max_queue=4)}
    async with serving(settings(tmp_path, LimitsSettings(models=one_slot))) as url:
        ann = await sign_up(url, "ann")
        cid = (await ann.call("POST", "/api/conversations", {"model": "fake:slow"})).json()["id"]
        path = f"/api/conversations/{cid}/messages"
        first = (await ann.call("POST", path, {"content": "a"})).json()["assistant_message"]
        await asyncio.sleep(0.1)
        stopped = await ann.call("POST", f"/api/messages/{first['id']}/stop")
        assert stopped.json()["status"] == "stopped"
        # Stopping released the slot: the next answer generates.
        second = (await ann.call("POST", path, {"content": "b"})).json()["assistant_message"]
        await asyncio.sleep(0.2)
        seen = (await ann.call("GET", path)).json()["data"]
        assert any(m["id"] == second["id"] and m["content"] for m in seen)
        await ann.call("POST", f"/api/messages/{second['id']}/stop")
        await ann.client.aclose()


async def test_the_admin_sets_limits_at_run_time(tmp_path: Path) -> None:
    async with serving(settings(tmp_path, LimitsSettings())) as url:
        ann = await sign_up(url, "ann")  # the first account: admin
        bob = await sign_up(url, "bob")
        assert (await bob.call("PATCH", "/api/admin/limits", {})).status_code == 403
        changed = await ann.call("PATCH", "/api/admin/limits", {"user_requests_per_minute": 1})
        assert changed.status_code == 200
        assert changed.json()["user_requests_per_minute"] == 1
        key = await bob.key()
        assert (await complete(url, key)).status_code == 200
        assert_limited(await complete(url, key), 429, "rate_limit_exceeded")
        assert (await ann.call("GET", "/api/admin/limits")).json()["user_requests_per_minute"] == 1
        await ann.client.aclose()
        await bob.client.aclose()


# -- Redis -------------------------------------------------------------------------------


async def test_two_instances_share_limits_through_redis(tmp_path: Path, redis_prefix: str) -> None:
    config = settings(
        tmp_path,
        LimitsSettings(user_requests_per_minute=3),
        redis_url=REDIS_URL,
        redis_key_prefix=redis_prefix,
    )
    async with serving(config) as first, serving(config) as second:
        ann = await sign_up(first, "ann")  # one database: the account works on both
        key = await ann.key()
        for url in (first, second, first):
            assert (await complete(url, key)).status_code == 200
        assert_limited(await complete(second, key), 429, "rate_limit_exceeded")
        assert_limited(await complete(first, key), 429, "rate_limit_exceeded")
        await ann.client.aclose()


async def test_redis_counters_share_a_window(redis_prefix: str) -> None:
    one = RedisCounters(REDIS_URL, prefix=redis_prefix)
    two = RedisCounters(REDIS_URL, prefix=redis_prefix)
    try:
        await one.add("k", 2, 60, 120.0)
        window = await two.add("k", 1, 60, 130.0)
        assert (window.current, window.previous) == (3, 0)
        assert (await one.read("k", 60, 185.0)).previous == 3
        assert not one.degraded
    finally:
        await one.close()
        await two.close()


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_down_falls_back_to_this_process_without_hanging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counters = RedisCounters(f"redis://127.0.0.1:{_dead_port()}/0")
    started = time.perf_counter()
    first = await counters.add("k", 1, 60, 10.0)
    second = await counters.add("k", 1, 60, 10.0)  # in the backoff: Redis is not tried
    elapsed = time.perf_counter() - started
    assert (first.current, second.current) == (1, 2)
    assert counters.degraded
    assert elapsed < 1.0, elapsed
    assert any("counting limits in this process" in r.getMessage() for r in caplog.records)
    await counters.close()


async def test_a_server_with_redis_down_still_limits_and_answers(tmp_path: Path) -> None:
    config = settings(
        tmp_path,
        LimitsSettings(user_requests_per_minute=2),
        redis_url=f"redis://127.0.0.1:{_dead_port()}/0",
    )
    async with serving(config) as url:
        ann = await sign_up(url, "ann")
        key = await ann.key()
        started = time.perf_counter()
        assert (await complete(url, key)).status_code == 200
        assert (await complete(url, key)).status_code == 200
        assert_limited(await complete(url, key), 429, "rate_limit_exceeded")
        assert time.perf_counter() - started < 5.0
        await ann.client.aclose()
