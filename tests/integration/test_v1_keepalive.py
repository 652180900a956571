"""Keep-alive comments on /v1 streams over real HTTP (uvicorn on loopback, the mock
upstream on another port): a stream that waits — for a slow first token, for a slot in the
admission queue, between slow chunks — gets `: keep-alive` lines, its chunks still arrive
one for one, and the official `openai` client parses it as if they were not there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from salon.api import openai as openai_api
from salon.app import create_app
from salon.backends.mock_upstream import WORDS, RunningUpstream, running_upstream
from salon.settings import LimitsSettings, ModelLimits, ProviderSettings, Settings
from tests.integration.conftest_server import serving_app

KEEP_ALIVE_S = 0.15
CHUNKS = 4
TTFT_MS = 500.0  # the upstream's wait before the first token: several keep-alive intervals
DELAY_MS = 350.0  # between two chunks: at least one keep-alive interval
ANSWER = "".join(WORDS[:CHUNKS])
HI = [{"role": "user", "content": "Say hi"}]


def serving(config: Settings) -> contextlib.AbstractAsyncContextManager[str]:
    return serving_app(create_app(config))


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    async with running_upstream(chunks=CHUNKS, ttft_ms=TTFT_MS, delay_ms=DELAY_MS) as running:
        yield running


@pytest.fixture
async def salon(
    upstream: RunningUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, str]]:
    """(base URL, API key) of a salon whose `up` provider is the slow mock; `up:mock` has
    one slot, so a second stream waits in the queue."""
    monkeypatch.setattr(openai_api, "KEEP_ALIVE_S", KEEP_ALIVE_S)
    config = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/salon.db",
        models=["up:mock", "up:hang"],
        providers={
            "up": ProviderSettings(kind="openai", base_url=upstream.base_url, read_timeout_s=1.0)
        },
        personalization={"embedder": "hashing", "extraction": "rules"},  # type: ignore[arg-type]
        limits=LimitsSettings(models={"up:mock": ModelLimits(max_concurrent=1, max_queue=4)}),
    )
    async with serving(config) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        signup = await client.post(
            "/api/auth/signup", json={"username": "ann", "password": "correct horse"}
        )
        assert signup.status_code == 201, signup.text
        csrf = {"x-csrf-token": signup.json()["csrf_token"]}
        made = await client.post("/api/keys", json={"name": "test"}, headers=csrf)
        assert made.status_code == 201, made.text
        yield url, str(made.json()["key"])


async def raw_lines(url: str, key: str, model: str = "up:mock") -> list[tuple[float, str]]:
    """The non-empty SSE lines of one stream, each with its arrival time (s from the start)."""
    body = {"model": model, "messages": HI, "stream": True}
    found: list[tuple[float, str]] = []
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=url, timeout=20) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line:
                found.append((time.monotonic() - started, line))
    return found


def contents(lines: list[tuple[float, str]]) -> list[str]:
    texts = []
    for _, line in lines:
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                if choice["delta"].get("content"):
                    texts.append(choice["delta"]["content"])
    return texts


async def test_a_slow_first_token_gets_keep_alives_and_chunks_one_for_one(
    salon: tuple[str, str],
) -> None:
    url, key = salon
    lines = await raw_lines(url, key)
    kinds = [line if line.startswith(":") else line[:6] for _, line in lines]
    first_data = kinds.index("data: ")
    # Before the first token: the upstream waits 0.5 s, a keep-alive goes out every 0.15 s.
    assert first_data >= 2 and set(kinds[:first_data]) == {": keep-alive"}, kinds
    assert lines[0][0] < TTFT_MS / 1000  # the first keep-alive came before the token
    # Between chunks (0.35 s apart), keep-alives too; the chunks are relayed one for one.
    data = [line for _, line in lines if line.startswith("data: ")]
    assert contents(lines) == list(WORDS[:CHUNKS])
    assert len(data) == 1 + CHUNKS + 1 + 1  # role, contents, finish, [DONE]
    assert data[-1] == "data: [DONE]"
    between = kinds[first_data:].count(": keep-alive")
    assert between >= CHUNKS - 2, kinds


async def test_a_stream_queued_for_a_slot_gets_keep_alives(salon: tuple[str, str]) -> None:
    url, key = salon
    # Two streams, one slot: the second waits in the queue for the whole first answer.
    first, second = await asyncio.gather(raw_lines(url, key), raw_lines(url, key))
    waited = max(first, second, key=lambda lines: lines[-1][0])
    kinds = [line for _, line in waited if line.startswith(":")]
    assert len(kinds) >= 8, kinds  # ≥ 0.5 + 3 × 0.35 s of queue, then its own wait
    assert contents(first) == contents(second) == list(WORDS[:CHUNKS])


async def test_the_openai_client_ignores_the_comments(salon: tuple[str, str]) -> None:
    url, key = salon
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="up:mock",
            messages=[{"role": "user", "content": "Say hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        texts: list[str] = []
        reasons: list[str] = []
        usage = None
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    texts.append(choice.delta.content)
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
            usage = chunk.usage or usage
    assert "".join(texts) == ANSWER and len(texts) == CHUNKS
    assert reasons == ["stop"]
    assert usage is not None and usage.completion_tokens == CHUNKS


async def test_a_failure_after_the_keep_alives_is_an_error_event(salon: tuple[str, str]) -> None:
    url, key = salon
    # `hang` sends nothing; salon's read timeout (1 s) ends it after the stream has started.
    lines = await raw_lines(url, key, "up:hang")
    kinds = [line if line.startswith(":") else line[:6] for _, line in lines]
    assert kinds[0] == ": keep-alive" and kinds[-1] == "data: "
    error = json.loads(lines[-2][1][6:])["error"]
    assert error["message"] and lines[-1][1] == "data: [DONE]"
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="up:hang", messages=[{"role": "user", "content": "Say hi"}], stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
