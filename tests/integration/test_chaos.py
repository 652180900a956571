"""Chaos through a real `salon serve` process and the mock upstream, for what the other
suites do not cover already:

- a slow client: a /v1 stream whose reader stalls for seconds neither blocks other streams
  nor the server, and completes (or is dropped cleanly when the client gives up);
- malformed chunks mid-stream seen from the web app: the message keeps the partial text
  with status error (the /v1 side is test_openai_http_backend's mid-stream test);
- an upstream that hangs before the first token seen from the web app: an error after the
  provider's read timeout, never a hang (the /v1 side: test_openai_http_backend, 504).

Covered elsewhere (not repeated): a backend killed mid-stream (test_openai_http_backend,
test_router_failover), salon SIGKILLed mid-stream (test_durability), Redis down for the
limits (test_limits).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from salon.backends.mock_upstream import FAIL_AFTER, WORDS, RunningUpstream
from tests.integration.conftest_server import (
    SalonServer,
    create_user_and_key,
    salon_env,
    salon_server,
    upstream_in_thread,
)

# A long answer, so that a reader that stalls fills every buffer on the way (client and
# server sockets, salon's outbox) and salon has to hold back.
BIG = 40_000
READ_TIMEOUT_S = 1.0
PASSWORD = "correct horse battery"
HI = [{"role": "user", "content": "Say hi"}]
CONTENT = re.compile(r'"content":\s?"(?!")')


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with upstream_in_thread(chunks=BIG) as running:
        yield running


@pytest.fixture(scope="module")
def server(
    upstream: RunningUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SalonServer]:
    data_dir: Path = tmp_path_factory.mktemp("salon-chaos")
    env = salon_env(
        data_dir,
        ["up:mock", "up:malformed", "up:hang"],
        {
            "up": {
                "kind": "openai",
                "base_url": upstream.base_url,
                "read_timeout_s": str(READ_TIMEOUT_S),
            }
        },
        {"SALON_LIMITS__MAX_CONCURRENT": "16"},
    )
    key = create_user_and_key(env, "alice", PASSWORD)
    with salon_server(env) as running:
        running.api_key, running.username, running.password = key, "alice", PASSWORD
        yield running


def v1(server: SalonServer, **body: Any) -> dict[str, Any]:
    return {
        "url": f"{server.base_url}/v1/chat/completions",
        "json": {"model": "up:mock", "messages": HI, "stream": True, **body},
        "headers": {"authorization": f"Bearer {server.api_key}"},
    }


async def short_stream(client: httpx.AsyncClient, server: SalonServer) -> tuple[int, float]:
    """A 20-chunk stream: (content chunks, seconds)."""
    started = time.monotonic()
    count = 0
    async with client.stream("POST", **v1(server, max_tokens=20)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            count += bool(CONTENT.search(line))
    return count, time.monotonic() - started


async def test_a_stalled_reader_blocks_nothing_and_then_completes(server: SalonServer) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", **v1(server)) as slow:
            assert slow.status_code == 200
            lines = slow.aiter_lines()
            assert CONTENT.search(await anext(lines)) is None  # the role chunk
            # The reader stalls; meanwhile other streams run at full speed.
            stalled_at = time.monotonic()
            others = await asyncio.gather(*(short_stream(client, server) for _ in range(4)))
            assert [count for count, _ in others] == [20] * 4
            assert max(seconds for _, seconds in others) < 2.0, others
            await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - stalled_at)))
            count, done = 0, False
            async for line in lines:
                count += bool(CONTENT.search(line))
                done = done or line == "data: [DONE]"
        assert (count, done) == (BIG, True)
        assert (await short_stream(client, server))[0] == 20


async def test_a_stalled_reader_that_gives_up_is_dropped_cleanly(
    server: SalonServer, upstream: RunningUpstream
) -> None:
    disconnected = upstream.state.disconnected
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", **v1(server)) as slow:
            assert slow.status_code == 200
            await anext(slow.aiter_lines())
            await asyncio.sleep(1.0)
        # The client closed its connection mid-answer: salon stops the upstream stream.
        deadline = time.monotonic() + 5
        while upstream.state.disconnected == disconnected:
            assert time.monotonic() < deadline, "salon kept reading from the upstream"
            await asyncio.sleep(0.05)
        assert (await short_stream(client, server))[0] == 20


async def sign_in(client: httpx.AsyncClient, server: SalonServer) -> dict[str, str]:
    response = await client.post(
        f"{server.base_url}/api/auth/login",
        json={"username": server.username, "password": server.password},
    )
    assert response.status_code == 200, response.text
    return {"x-csrf-token": response.json()["csrf_token"]}


@pytest.mark.parametrize(
    ("model", "partial"),
    [("up:malformed", "".join(WORDS[:FAIL_AFTER])), ("up:hang", "")],
)
async def test_a_failing_upstream_leaves_the_web_app_message_partial_with_an_error(
    server: SalonServer, model: str, partial: str
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        csrf = await sign_in(client, server)
        made = await client.post("/api/conversations", json={"model": model}, headers=csrf)
        assert made.status_code == 201, made.text
        cid = made.json()["id"]
        posted = await client.post(
            f"/api/conversations/{cid}/messages", json={"content": "hi"}, headers=csrf
        )
        assert posted.status_code == 201, posted.text
        message_id = posted.json()["assistant_message"]["id"]
        started = time.monotonic()
        events: list[tuple[str, Any]] = []
        async with client.stream("GET", f"/api/messages/{message_id}/stream") as response:
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if name != "delta":
                        break
        elapsed = time.monotonic() - started
        text = "".join(data["text"] for name, data in events if name == "delta")
        assert text == partial
        name, final = events[-1]
        assert name == "error" and final["message"]
        assert final["partial"]["status"] == "error"
        assert final["partial"]["content"] == partial
        assert elapsed < READ_TIMEOUT_S + 5  # a hang ends by the read timeout
        # Stored as such: what a reload shows.
        stored = (await client.get(f"/api/conversations/{cid}/messages")).json()["data"]
        mine = next(m for m in stored if m["id"] == message_id)
        assert (mine["status"], mine["content"]) == ("error", partial)
