"""The web app's API over real HTTP (uvicorn on a loopback port) and a real database."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from salon.app import create_app
from salon.settings import ProviderSettings, Settings

MODELS = "fake:echo,fake:slow,fake:fail,fake:down,fake:markdown,fake:loop"


@pytest.fixture
async def base_url(database_url: str, engine: object, tmp_path: Path) -> AsyncIterator[str]:
    """A running salon on a clean database (`engine` empties it first)."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        models=MODELS.split(","),
        max_body_bytes=50_000,
        flush_interval_s=0.05,
        providers={"fake": ProviderSettings(kind="fake", fake_delay_s=0.004)},
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


class Browser:
    """A signed-in user as the web app is: cookie + CSRF header."""

    def __init__(self, client: httpx.AsyncClient, csrf: str) -> None:
        self.client = client
        self.csrf = csrf

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        headers = {"x-csrf-token": self.csrf}
        if body is not None:
            kw["content"] = json.dumps(body)
            headers["content-type"] = "application/json"
        return await self.client.request(method, path, headers=headers, **kw)

    async def new_chat(self, model: str = "fake:echo") -> str:
        response = await self.call("POST", "/api/conversations", {"model": model})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def say(self, cid: str, text: str, **extra: Any) -> dict[str, Any]:
        response = await self.call(
            "POST", f"/api/conversations/{cid}/messages", {"content": text, **extra}
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def events(
        self, message_id: int, last_id: int | None = None, limit: int | None = None
    ) -> list[tuple[str, int, Any]]:
        """SSE events (name, id, data) of a generation; stop after `limit` deltas."""
        headers = {"last-event-id": str(last_id)} if last_id is not None else {}
        found: list[tuple[str, int, Any]] = []
        async with self.client.stream(
            "GET", f"/api/messages/{message_id}/stream", headers=headers
        ) as response:
            assert response.status_code == 200
            name, event_id = "", 0
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    found.append((name, event_id, json.loads(line[6:])))
                    if name != "delta" or (limit and len(found) >= limit):
                        break
        return found

    async def answer(self, message_id: int) -> tuple[str, dict[str, Any]]:
        events = await self.events(message_id)
        text = "".join(data["text"] for name, _, data in events if name == "delta")
        return text, events[-1][2]


async def sign_up(base_url: str, name: str) -> Browser:
    client = httpx.AsyncClient(base_url=base_url, timeout=20)
    response = await client.post(
        "/api/auth/signup", json={"username": name, "password": "correct horse"}
    )
    assert response.status_code == 201, response.text
    return Browser(client, response.json()["csrf_token"])


async def test_first_account_is_admin_and_admin_can_close_signup(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as anonymous:
        assert (await anonymous.get("/api/auth/state")).json() == {
            "has_users": False,
            "signup_open": True,
        }
    ann = await sign_up(base_url, "ann")
    me = (await ann.client.get("/api/auth/me")).json()
    assert me["user"]["role"] == "admin"
    bob = await sign_up(base_url, "bob")
    assert (await bob.client.get("/api/auth/me")).json()["user"]["role"] == "user"
    assert (
        await bob.call("PATCH", "/api/admin/settings", {"signup_open": False})
    ).status_code == 403
    closed = await ann.call("PATCH", "/api/admin/settings", {"signup_open": False})
    assert closed.json() == {"signup_open": False}
    async with httpx.AsyncClient(base_url=base_url) as anonymous:
        refused = await anonymous.post(
            "/api/auth/signup", json={"username": "eve", "password": "correct horse"}
        )
        assert refused.status_code == 403
        assert "closed" in refused.json()["error"]["message"]
        wrong = await anonymous.post(
            "/api/auth/login", json={"username": "ann", "password": "wrong password"}
        )
        assert wrong.status_code == 401
        right = await anonymous.post(
            "/api/auth/login", json={"username": "ann", "password": "correct horse"}
        )
        assert right.status_code == 200
        assert "salon_session" in right.cookies


async def test_cookie_requests_need_the_csrf_token(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    response = await ann.client.post("/api/conversations", json={})
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]["message"]
    logout = await ann.call("POST", "/api/auth/logout")
    assert logout.status_code == 204
    assert (await ann.client.get("/api/conversations")).status_code == 401


async def test_chat_streams_and_persists(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    cid = await ann.new_chat()
    turn = await ann.say(cid, "hello there")
    assert turn["assistant_message"]["status"] in ("streaming", "complete")
    text, final = await ann.answer(turn["assistant_message"]["id"])
    assert text == "You said: hello there"
    assert final["status"] == "complete"
    assert final["usage"]["completion_tokens"] == 4
    page = (await ann.call("GET", f"/api/conversations/{cid}/messages")).json()
    assert [m["content"] for m in page["data"]] == ["hello there", "You said: hello there"]
    listed = (await ann.call("GET", "/api/conversations")).json()["data"]
    assert listed[0]["title"] == "hello there"


async def test_regenerate_edit_and_switch_branches(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    cid = await ann.new_chat()
    first = await ann.say(cid, "one")
    await ann.answer(first["assistant_message"]["id"])
    second = await ann.say(cid, "two")
    await ann.answer(second["assistant_message"]["id"])

    again = (
        await ann.call("POST", f"/api/messages/{second['assistant_message']['id']}/regenerate")
    ).json()
    await ann.answer(again["id"])
    page = (await ann.call("GET", f"/api/conversations/{cid}/messages")).json()["data"]
    assert page[-1]["id"] == again["id"]
    assert page[-1]["siblings"] == [second["assistant_message"]["id"], again["id"]]

    edited = await ann.say(cid, "two, edited", parent_id=first["assistant_message"]["id"])
    await ann.answer(edited["assistant_message"]["id"])
    page = (await ann.call("GET", f"/api/conversations/{cid}/messages")).json()["data"]
    assert [m["content"] for m in page] == [
        "one",
        "You said: one",
        "two, edited",
        "You said: two, edited",
    ]
    assert page[2]["siblings"] == [second["user_message"]["id"], edited["user_message"]["id"]]

    switched = await ann.call(
        "POST", f"/api/conversations/{cid}/branch", {"message_id": second["user_message"]["id"]}
    )
    assert switched.json()["current_leaf_id"] == again["id"]
    page = (await ann.call("GET", f"/api/conversations/{cid}/messages")).json()["data"]
    assert [m["content"] for m in page][2] == "two"


async def test_stop_keeps_the_text_and_continue_finishes_it(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    cid = await ann.new_chat("fake:slow")
    turn = await ann.say(cid, "count", model="fake:slow")
    message_id = turn["assistant_message"]["id"]
    await ann.events(message_id, limit=5)
    stopped = (await ann.call("POST", f"/api/messages/{message_id}/stop")).json()
    assert stopped["status"] == "stopped"
    words = stopped["content"].split()
    assert len(words) >= 5
    assert words == [f"w{i}" for i in range(1, len(words) + 1)]

    resumed = await ann.call("POST", f"/api/messages/{message_id}/continue")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["status"] == "streaming"
    again = await ann.call("POST", f"/api/messages/{message_id}/continue")
    assert again.status_code == 409
    await ann.call("POST", f"/api/messages/{message_id}/stop")


async def test_reattach_with_last_event_id_has_no_gaps_or_duplicates(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    cid = await ann.new_chat("fake:slow")
    turn = await ann.say(cid, "count", model="fake:slow")
    message_id = turn["assistant_message"]["id"]
    head = await ann.events(message_id, limit=3)  # then the client goes away
    await asyncio.sleep(0.2)  # the job goes on meanwhile
    tail = await ann.events(message_id, last_id=head[-1][1])
    text = "".join(d["text"] for n, _, d in head + tail if n == "delta")
    assert tail[-1][0] == "done"
    assert text == " ".join(f"w{i}" for i in range(1, 401))
    # Re-attaching after the end gives the rest from the store.
    late = await ann.events(message_id, last_id=head[-1][1])
    assert "".join(d["text"] for n, _, d in late if n == "delta") == text[head[-1][1] :]


async def test_backend_failures_end_with_an_error_and_keep_the_text(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    cid = await ann.new_chat()
    down = await ann.say(cid, "anyone there?", model="fake:down")
    events = await ann.events(down["assistant_message"]["id"])
    assert events[-1][0] == "error"
    assert "unreachable" in events[-1][2]["message"]
    failed = await ann.say(cid, "tell me more", model="fake:fail")
    text, final = await ann.answer(failed["assistant_message"]["id"])
    assert text == "You said: tell"
    assert final["partial"]["status"] == "error"
    assert final["partial"]["content"] == "You said: tell"


async def test_a_model_caught_in_a_loop_is_stopped_and_its_answer_kept(base_url: str) -> None:
    """fake:loop writes one sentence 300 times (~13,000 characters); salon stops it once the
    loop is certain, keeps what was shown, and says why."""
    lou = await sign_up(base_url, "lou")
    cid = await lou.new_chat()
    sent = await lou.say(cid, "tell me a story", model="fake:loop")
    message_id = sent["assistant_message"]["id"]
    text, final = await lou.answer(message_id)
    response = await lou.call("GET", f"/api/conversations/{cid}/messages")
    stored = next(m for m in response.json()["data"] if m["id"] == message_id)
    assert stored["status"] == "stopped"
    assert "repeating itself" in stored["error"]
    assert stored["content"] == text  # what was streamed is what is kept
    assert text.startswith("Here is my answer: All work and no play makes Jack a dull boy.")
    assert 1_200 <= len(text) < 2_000, len(text)  # stopped soon after the loop is certain
    # the stream's last event says so too, for a client that is watching
    assert final["partial"]["status"] == "stopped" and final["message"] == stored["error"]


async def test_bad_input_gets_a_clear_4xx(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    cid = await ann.new_chat()
    csrf = {"x-csrf-token": ann.csrf, "content-type": "application/json"}
    cases = [
        await ann.client.post(f"/api/conversations/{cid}/messages", content="{nope", headers=csrf),
        await ann.call("POST", f"/api/conversations/{cid}/messages", {"content": "   "}),
        await ann.call("POST", f"/api/conversations/{cid}/messages", {"content": 5}),
        await ann.call("POST", f"/api/conversations/{cid}/messages", {"content": "x" * 60_000}),
        await ann.call(
            "POST", f"/api/conversations/{cid}/messages", {"content": "hi", "model": "fake:nope"}
        ),
        await ann.call(
            "POST", f"/api/conversations/{cid}/messages", {"content": "hi", "parent_id": 999999}
        ),
        await ann.call("GET", f"/api/conversations/{cid}/messages?limit=abc"),
        await ann.call("GET", "/api/messages/abc/stream"),
        await ann.client.post(
            "/api/auth/signup",
            content="username=a",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
    ]
    assert [c.status_code for c in cases] == [400, 400, 400, 413, 404, 400, 400, 400, 400]
    for case in cases:
        assert case.json()["error"]["message"]


async def test_another_user_gets_404_everywhere(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    cid = await ann.new_chat()
    turn = await ann.say(cid, "my secret")
    await ann.answer(turn["assistant_message"]["id"])
    mid = turn["assistant_message"]["id"]
    bob = await sign_up(base_url, "bob")
    attempts = [
        await bob.call("GET", f"/api/conversations/{cid}"),
        await bob.call("PATCH", f"/api/conversations/{cid}", {"title": "mine"}),
        await bob.call("GET", f"/api/conversations/{cid}/messages"),
        await bob.call("POST", f"/api/conversations/{cid}/messages", {"content": "hi"}),
        await bob.call("POST", f"/api/conversations/{cid}/branch", {"message_id": mid}),
        await bob.call("GET", f"/api/messages/{mid}/stream"),
        await bob.call("POST", f"/api/messages/{mid}/stop"),
        await bob.call("POST", f"/api/messages/{mid}/regenerate"),
        await bob.call("POST", f"/api/messages/{mid}/continue"),
        await bob.call("DELETE", f"/api/conversations/{cid}"),
    ]
    assert [a.status_code for a in attempts] == [404] * len(attempts)
    assert (await bob.call("GET", "/api/conversations?q=secret")).json()["data"] == []
    assert (await ann.call("GET", f"/api/conversations/{cid}")).status_code == 200


async def test_api_keys_are_shown_once_and_work_on_v1(base_url: str) -> None:
    ann = await sign_up(base_url, "ann")
    created = (await ann.call("POST", "/api/keys", {"name": "laptop"})).json()
    key = created["key"]
    assert key.startswith("sk-salon-")
    listed = (await ann.call("GET", "/api/keys")).json()["data"]
    assert "key" not in listed[0] and listed[0]["prefix"] == key[:13]
    async with httpx.AsyncClient(base_url=base_url) as client:
        auth = {"authorization": f"Bearer {key}"}
        models = await client.get("/v1/models", headers=auth)
        assert next(m["id"] for m in models.json()["data"]) == "fake:echo"
        assert (
            await client.get("/v1/models", headers={"authorization": "Bearer sk-salon-x"})
        ).status_code == 401
        assert (await client.get("/v1/models")).status_code == 401
        await ann.call("DELETE", f"/api/keys/{created['id']}")
        assert (await client.get("/v1/models", headers=auth)).status_code == 401
