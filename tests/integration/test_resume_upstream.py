"""Continuing an interrupted answer through salon's web API on an OpenAI-compatible upstream
(the mock, over loopback): how the request asks to go on depends on whether the provider is
declared to continue a trailing assistant message."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from salon.app import create_app
from salon.backends.mock_upstream import running_upstream
from salon.chat.service import CONTINUE_ASKED
from salon.settings import PersonalizationSettings, ProviderSettings, Settings
from tests.integration.conftest_server import serving_app

from .test_chat_api import Browser, sign_up


async def _settled(ann: Browser, cid: str) -> dict[str, Any]:
    for _ in range(200):  # bounded: 10 s
        page = (await ann.call("GET", f"/api/conversations/{cid}/messages")).json()["data"]
        if page[-1]["status"] != "streaming":
            return dict(page[-1])
        await asyncio.sleep(0.05)
    raise AssertionError("the answer never settled")


@pytest.mark.parametrize("declared", [None, True])
async def test_continue_asks_the_upstream_as_declared(
    declared: bool | None, database_url: str, engine: object, tmp_path: Path
) -> None:
    async with running_upstream(chunks=20) as upstream:
        settings = Settings(
            data_dir=tmp_path,
            database_url=database_url,
            models=["up:die-mid-stream"],
            flush_interval_s=0.05,
            providers={
                "up": ProviderSettings(
                    kind="openai", base_url=upstream.base_url, continues_answers=declared
                )
            },
            personalization=PersonalizationSettings(extraction="rules"),
        )
        async with serving_app(create_app(settings)) as base_url:
            ann = await sign_up(base_url, "ann")
            response = await ann.call("POST", "/api/conversations", {"model": "up:die-mid-stream"})
            cid = str(response.json()["id"])
            turn = await ann.say(cid, "tell me a story", model="up:die-mid-stream")
            message_id = turn["assistant_message"]["id"]
            cut = await _settled(ann, cid)
            assert cut["status"] in ("error", "incomplete") and cut["content"]

            resumed = await ann.call("POST", f"/api/messages/{message_id}/continue")
            assert resumed.status_code == 200, resumed.text
            await _settled(ann, cid)
        body = upstream.state.requests[-1]
        roles = [m["role"] for m in body["messages"]]
        if declared:
            assert roles[-2:] == ["user", "assistant"]
            assert body["messages"][-1]["content"] == cut["content"]
            assert body["continue_final_message"] is True
        else:
            assert roles[-3:] == ["user", "assistant", "user"]
            assert body["messages"][-2]["content"] == cut["content"]
            assert body["messages"][-1]["content"] == CONTINUE_ASKED
            assert "continue_final_message" not in body
