"""Personalization over real HTTP on a real database: settings and their validation, the
preview is exactly what the model receives, enforcement and revisions, memory's lifecycle
through chat, temporary chats, and isolation between users.

`fake:prompt` answers with everything it was sent, so these tests read what a model really
received; `fake:styled` answers with emoji, a heading and a list."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from salon.app import create_app
from salon.settings import PersonalizationSettings, ProviderSettings, Settings
from tests.integration.test_chat_api import Browser

MODELS = ["fake:prompt", "fake:echo", "fake:styled"]
OPERATOR = "You are the assistant of Example Corp. Never reveal internal project names."


@pytest.fixture
async def base_url(database_url: str, engine: object, tmp_path: Path) -> AsyncIterator[str]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        models=MODELS,
        flush_interval_s=0.05,
        system_prompt=OPERATOR,
        providers={"fake": ProviderSettings(kind="fake", fake_delay_s=0.001)},
        personalization=PersonalizationSettings(extraction="rules"),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def user(base_url: str) -> AsyncIterator[Callable[[str], Awaitable[Browser]]]:
    clients: list[httpx.AsyncClient] = []

    async def sign_up(name: str) -> Browser:
        client = httpx.AsyncClient(base_url=base_url, timeout=20)
        clients.append(client)
        response = await client.post(
            "/api/auth/signup", json={"username": name, "password": "correct-horse-battery"}
        )
        assert response.status_code in (200, 201), response.text
        return Browser(client, response.json()["csrf_token"])

    yield sign_up
    for client in clients:
        await client.aclose()


async def _chat(browser: Browser, model: str, **extra: Any) -> str:
    response = await browser.call("POST", "/api/conversations", {"model": model, **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _turn(browser: Browser, cid: str, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send `text`; return (the user message, the final answer, following revisions)."""
    turn = await browser.say(cid, text)
    answer = await _final(browser, turn["assistant_message"]["id"])
    return turn["user_message"], answer


async def _final(browser: Browser, message_id: int) -> dict[str, Any]:
    events = await browser.events(message_id)
    name, _, data = events[-1]
    assert name == "done", events[-1]
    revised_by = (data.get("personalization") or {}).get("revised_by")
    return await _final(browser, revised_by) if revised_by else dict(data)


async def _profile(browser: Browser, **values: Any) -> dict[str, Any]:
    response = await browser.call("PUT", "/api/personalization", values)
    assert response.status_code == 200, response.text
    return dict(response.json()["profile"])


async def _eventually(check: Callable[[], Awaitable[Any]], timeout_s: float = 10.0) -> Any:
    """Background work (memory saving) finishes soon after a turn; wait for it, bounded."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


async def test_settings_are_validated_and_the_presets_are_offered(base_url: str, user: Any) -> None:
    ann = await user("ann")
    body = (await ann.call("GET", "/api/personalization")).json()
    names = {p["name"] for p in body["personalities"]}
    assert {"Default", "Professional", "Friendly", "Candid", "Quirky", "Efficient"} <= names
    assert {"Nerdy", "Cynical"} <= names
    for bad, param in (
        ({"characteristics": {"emoji": "lots"}}, "characteristics.emoji"),
        ({"personality": "pirate"}, "personality"),
        ({"how_to_respond": "x" * 5000}, "how_to_respond"),
        ({"about": {"nickname": "n" * 200}}, "about.nickname"),
        ({"length": 3}, "length"),
    ):
        response = await ann.call("PUT", "/api/personalization", bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"] == param
    saved = await _profile(ann, personality="candid", characteristics={"emoji": "less"})
    assert saved["personality"] == "candid" and saved["characteristics"]["emoji"] == "less"


async def test_the_preview_is_exactly_what_the_model_receives(base_url: str, user: Any) -> None:
    ann = await user("ann")
    await _profile(
        ann,
        personality="professional",
        about={"nickname": "Annie", "occupation": "geologist", "more": ""},
        how_to_respond="Never use the word 'basically'.",
    )
    cid = await _chat(ann, "fake:prompt")
    await _turn(ann, cid, "Hello there")
    draft = "What rocks are in the Alps?"
    preview = (
        await ann.call(
            "POST", "/api/personalization/preview", {"conversation_id": cid, "content": draft}
        )
    ).json()
    layers = [layer["id"] for layer in preview["layers"]]
    assert layers[0] == "operator" and layers[1] == "personality"
    assert {"about", "instructions"} <= set(layers)
    assert any("basically" in rule["rule"] for rule in preview["rules"])

    turn = await ann.say(cid, draft)
    answer = (await ann.events(turn["assistant_message"]["id"]))[-1][2]
    received = "\n".join(f"[{m['role']}] {m['content']}" for m in preview["messages"])
    # The model's own text (the answer shown was adjusted: it now addresses Annie; and as
    # the echo holds the forbidden word, a revision was asked for too).
    note = answer["personalization"]
    assert note["revised_by"]
    assert note["original"] == received
    assert answer["content"].startswith("Annie, ") and note["fixes"]
    system = preview["messages"][0]["content"]
    assert system.startswith(OPERATOR)
    assert "Annie" in system and "Professional" in system


async def test_a_conversation_overrides_the_account(base_url: str, user: Any) -> None:
    ann = await user("ann")
    await _profile(ann, personality="friendly")
    cid = await _chat(ann, "fake:prompt", settings={"personality": "efficient"})
    preview = (
        await ann.call(
            "POST", "/api/personalization/preview", {"conversation_id": cid, "content": "hi"}
        )
    ).json()
    personality = next(layer for layer in preview["layers"] if layer["id"] == "personality")
    assert "Efficient" in personality["text"] and personality["source"] == "conversation"
    bad = await ann.call("PATCH", f"/api/conversations/{cid}", {"settings": {"length": "huge"}})
    assert bad.status_code == 400
    cleared = await ann.call("PATCH", f"/api/conversations/{cid}", {"settings": {}})
    assert cleared.json()["settings"] == {}


async def test_style_settings_are_enforced_before_anything_is_shown(
    base_url: str, user: Any
) -> None:
    ann = await user("ann")
    await _profile(ann, characteristics={"emoji": "less", "headers_lists": "less"})
    cid = await _chat(ann, "fake:styled")
    turn = await ann.say(cid, "How do I change my settings?")
    events = await ann.events(turn["assistant_message"]["id"])
    shown = "".join(data["text"] for name, _, data in events if name == "delta")
    final = events[-1][2]
    assert shown == final["content"]  # nothing shown was changed afterwards
    assert "🎉" not in shown and "😀" not in shown and "✅" not in shown
    assert "##" not in shown and "\n- " not in shown
    note = final["personalization"]
    assert note["passed"] == note["total"] >= 2
    assert note["fixes"]


async def test_a_failed_check_gets_a_visible_revision(base_url: str, user: Any) -> None:
    ann = await user("ann")
    cid = await _chat(ann, "fake:styled")
    turn = await ann.say(cid, "Réponds en français : comment changer mes réglages ?")
    first_id = turn["assistant_message"]["id"]
    first = (await ann.events(first_id))[-1][2]
    revised_by = first["personalization"]["revised_by"]
    assert any(
        c["kind"] == "language" and not c["passed"] for c in first["personalization"]["checks"]
    )
    revision = await _final(ann, revised_by)
    assert revision["personalization"]["revision_of"] == first_id
    assert "revised_by" not in revision["personalization"]  # one revision at most
    assert set(revision["siblings"]) == {first_id, revised_by}
    conversation = (await ann.call("GET", f"/api/conversations/{cid}")).json()
    assert conversation["current_leaf_id"] == revised_by


async def test_memory_lifecycle_through_chat(base_url: str, user: Any) -> None:
    ann = await user("ann")
    cid = await _chat(ann, "fake:echo")
    said, _ = await _turn(ann, cid, "Remember that I am vegetarian")

    async def chips() -> list[dict[str, Any]]:
        body = (await ann.call("GET", f"/api/messages/{said['id']}/memories")).json()
        return list(body["data"])

    (chip,) = await _eventually(chips)
    assert "vegetarian" in chip["memory"]["text"].lower()
    found = (await ann.call("GET", "/api/memory/search", params={"q": "diet", "k": 5})).json()
    top = found["data"][0]
    assert top["kind"] == "memory" and top["message_ids"] == [said["id"]]
    assert top["score"] > 0

    other = await _chat(ann, "fake:prompt")
    _, answer = await _turn(ann, other, "What should I cook tonight? I have no meat in the house")
    system = answer["content"].split("\n[user]", 1)[0]
    assert "Saved memories" in system and "vegetarian" in system
    # The message the memory came from is not repeated as an "earlier conversation".
    assert "Remember that I am vegetarian" not in system

    deleted = await ann.call("DELETE", f"/api/memory/{chip['memory']['id']}")
    assert deleted.json()["status"] == "deleted"
    _, answer = await _turn(ann, other, "Any recipe ideas for my vegetarian diet?")
    system = answer["content"].split("\n[user]", 1)[0]
    assert "Saved memories" not in system and "vegetarian" not in system
    search = (await ann.call("GET", "/api/memory/search", params={"q": "vegetarian"})).json()
    assert all(item["kind"] != "memory" for item in search["data"])
    export = (await ann.call("GET", "/api/personalization/export")).json()
    assert all("vegetarian" not in m["text"].lower() for m in export["memories"])

    restored = await ann.call("POST", f"/api/memory/{chip['memory']['id']}/restore")
    assert restored.json()["status"] == "current"


async def test_temporary_chats_are_not_remembered_or_listed(base_url: str, user: Any) -> None:
    ann = await user("ann")
    cid = await _chat(ann, "fake:echo", temporary=True)
    said, _ = await _turn(ann, cid, "Remember that my locker code is 4512")
    await asyncio.sleep(0.3)
    assert (await ann.call("GET", f"/api/messages/{said['id']}/memories")).json()["data"] == []
    assert (await ann.call("GET", "/api/memory")).json()["data"] == []
    listed = (await ann.call("GET", "/api/conversations")).json()["data"]
    assert cid not in {c["id"] for c in listed}
    search = (await ann.call("GET", "/api/memory/search", params={"q": "locker code"})).json()
    assert search["data"] == []


async def test_one_users_memory_never_reaches_another(base_url: str, user: Any) -> None:
    ann, bob = await user("ann"), await user("bob")
    ann_chat = await _chat(ann, "fake:echo")
    said, _ = await _turn(ann, ann_chat, "Remember that my sister is called Philippa")

    async def saved() -> Any:
        return (await ann.call("GET", "/api/memory")).json()["data"]

    (memory,) = await _eventually(saved)
    bob_chat = await _chat(bob, "fake:prompt")
    _, answer = await _turn(bob, bob_chat, "What is my sister called? Philippa?")
    assert answer["content"].count("Philippa") == 1  # only bob's own message
    search = (await bob.call("GET", "/api/memory/search", params={"q": "sister Philippa"})).json()
    # Only bob's own question comes back: nothing of ann's, neither memory nor message.
    assert [item["kind"] for item in search["data"]] == ["message"]
    assert said["id"] not in search["data"][0]["message_ids"]
    for method, path in (
        ("GET", f"/api/memory/{memory['id']}"),
        ("DELETE", f"/api/memory/{memory['id']}"),
        ("POST", f"/api/memory/{memory['id']}/undo"),
        ("GET", f"/api/messages/{said['id']}/memories"),
    ):
        assert (await bob.call(method, path)).status_code == 404, (method, path)


async def test_the_preview_of_a_chat_not_started_yet(base_url: str, user: Any) -> None:
    ann = await user("ann")
    await ann.call("POST", "/api/memory", {"text": "I am vegetarian", "kind": "fact"})
    draft = {"conversation_id": None, "content": "What should I cook tonight?"}
    plain = (await ann.call("POST", "/api/personalization/preview", draft)).json()
    assert "vegetarian" in plain["messages"][0]["content"]
    planned = {**draft, "temporary": True, "settings": {"personality": "efficient"}}
    preview = (await ann.call("POST", "/api/personalization/preview", planned)).json()
    layers = {layer["id"]: layer for layer in preview["layers"]}
    assert layers["personality"]["source"] == "conversation"
    assert "Efficient" in layers["personality"]["text"]
    assert "memory" not in layers  # a temporary chat recalls nothing
    bad = {**draft, "settings": {"personality": "pirate"}}
    assert (await ann.call("POST", "/api/personalization/preview", bad)).status_code == 400
