"""The router over real HTTP: `OpenAIHttpBackend` targets against two mock upstreams (one
scripted to fail by its model name), probes against a real `/v1/models`, and a route built
by the registry from settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from salon.backends.base import complete
from salon.backends.mock_upstream import FAIL_AFTER, WORDS, RunningUpstream, running_upstream
from salon.backends.openai_http import OpenAIHttpBackend
from salon.backends.registry import BackendRegistry
from salon.backends.router import BreakerState, CircuitOpen, Router, Target, models_probe
from salon.domain import ChatMessage, CompletionRequest, TextDelta
from salon.errors import BackendUnavailable
from salon.settings import RoutePolicy, Settings
from tests.integration.conftest_server import free_port

ANSWER = "".join(WORDS[i % len(WORDS)] for i in range(20))
HI = (ChatMessage("user", "Hello there"),)
FIRST_TOKEN_TIMEOUT_S = 0.3


def ask(session_key: str | None = None) -> CompletionRequest:
    return CompletionRequest("pool", HI, session_key=session_key)


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningUpstream, RunningUpstream]]:
    async with running_upstream(chunks=20) as a, running_upstream(chunks=20) as b:
        yield a, b


@pytest.fixture
async def clients() -> AsyncIterator[list[OpenAIHttpBackend]]:
    made: list[OpenAIHttpBackend] = []
    yield made
    for client in made:
        await client.close()


def target(clients: list[OpenAIHttpBackend], base_url: str, model: str) -> Target:
    client = OpenAIHttpBackend(base_url, connect_timeout_s=1, read_timeout_s=5)
    clients.append(client)
    return Target(f"{base_url}:{model}", client, model, models_probe(base_url))


async def timed(r: Router) -> tuple[str, float]:
    start = time.perf_counter()
    text = (await complete(r, ask())).text
    return text, time.perf_counter() - start


@pytest.mark.parametrize("failure", ["hang", "error-500", "error-429"])
async def test_a_failing_upstream_fails_over_then_is_skipped(
    upstreams: tuple[RunningUpstream, RunningUpstream],
    clients: list[OpenAIHttpBackend],
    failure: str,
) -> None:
    a, b = upstreams
    policy = RoutePolicy(
        first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S, failures_to_open=1, probe_interval_s=0
    )
    r = Router(
        "pool", [target(clients, a.base_url, failure), target(clients, b.base_url, "x")], policy
    )
    text, first = await timed(r)
    assert text == ANSWER
    assert a.state.started == 1 and b.state.started == 1
    text, second = await timed(r)  # the breaker is open: straight to b
    assert text == ANSWER
    assert a.state.started == 1 and b.state.started == 2
    print(f"\n{failure}: failover {first * 1000:.1f} ms, then {second * 1000:.1f} ms (open)")
    if failure == "hang":
        assert first >= FIRST_TOKEN_TIMEOUT_S
    assert second < 0.05
    await r.close()


async def test_an_upstream_dying_mid_stream_ends_the_stream_without_failover(
    upstreams: tuple[RunningUpstream, RunningUpstream], clients: list[OpenAIHttpBackend]
) -> None:
    a, b = upstreams
    targets = [target(clients, a.base_url, "die-mid-stream"), target(clients, b.base_url, "x")]
    r = Router("pool", targets, RoutePolicy(probe_interval_s=0))
    received: list[str] = []
    with pytest.raises(BackendUnavailable):
        async with aclosing(r.stream(ask())) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    received.append(event.text)
    assert "".join(received) == "".join(WORDS[:FAIL_AFTER])  # kept, and not repeated
    assert b.state.started == 0
    await r.close()


async def test_a_single_dead_upstream_fails_fast_once_its_breaker_opens(
    clients: list[OpenAIHttpBackend],
) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    r = Router(
        "pool", [target(clients, dead_url, "m")], RoutePolicy(failures_to_open=3, cooldown_s=30)
    )
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="cannot reach"):
            await complete(r, ask())
    start = time.perf_counter()
    with pytest.raises(CircuitOpen, match="circuit open, retry after"):
        await complete(r, ask())
    took = time.perf_counter() - start
    print(f"\nsingle dead upstream, breaker open: failed in {took * 1000:.2f} ms")
    assert took < 0.05
    await r.close()


async def test_a_recovered_upstream_comes_back_through_the_probe(
    clients: list[OpenAIHttpBackend],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    policy = RoutePolicy(failures_to_open=1, cooldown_s=30, probe_interval_s=0.05)
    r = Router("pool", [target(clients, url, "m")], policy)
    with pytest.raises(BackendUnavailable):
        await complete(r, ask())
    assert r.states()[f"{url}:m"] is BreakerState.OPEN
    async with running_upstream(chunks=20, port=port) as upstream:
        deadline = time.monotonic() + 2
        while r.states()[f"{url}:m"] is not BreakerState.CLOSED:
            assert time.monotonic() < deadline, "the probe did not close the breaker"
            await asyncio.sleep(0.02)
        assert upstream.state.started == 0  # back without a user request spent on it
        assert (await complete(r, ask())).text == ANSWER
    await r.close()


async def test_a_route_from_settings_fails_over_through_the_registry(
    upstreams: tuple[RunningUpstream, RunningUpstream],
) -> None:
    a, b = upstreams
    settings = Settings(
        models=["pool:qwen"],
        providers={
            "vllm-a": {"kind": "openai", "base_url": a.base_url, "personal_data": True},
            "vllm-b": {"kind": "openai", "base_url": b.base_url},
        },
        routes={
            "pool:qwen": {
                "targets": ["vllm-a:error-500", "vllm-b:qwen2.5-7b"],
                "failures_to_open": 1,
            }
        },
    )
    registry = BackendRegistry(settings)
    route = registry.resolve("pool:qwen")
    assert isinstance(route.backend, Router)
    assert not route.personal_data  # vllm-b may not receive it, so the route may not
    done = await complete(route.backend, CompletionRequest(route.name, HI, session_key="c1"))
    assert done.text == ANSWER
    assert b.state.requests[-1]["model"] == "qwen2.5-7b"
    assert route.backend.states()["vllm-a:error-500"] is BreakerState.OPEN
    await registry.close()


async def test_a_late_upstream_is_hedged_over_http(
    upstreams: tuple[RunningUpstream, RunningUpstream], clients: list[OpenAIHttpBackend]
) -> None:
    _, quick = upstreams
    async with running_upstream(chunks=20, ttft_ms=2000) as late:
        targets = [target(clients, late.base_url, "x"), target(clients, quick.base_url, "x")]
        r = Router("pool", targets, RoutePolicy(hedge_after_s=0.05, probe_interval_s=0))
        text, took = await timed(r)
        assert text == ANSWER  # the quick one's answer, relayed alone and whole
        assert 0.05 <= took < 1.0
        assert late.state.started == 1 and quick.state.started == 1
        deadline = time.monotonic() + 2
        while not late.state.disconnected:  # the loser's request was cancelled
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert late.state.completed == 0
        await r.close()
