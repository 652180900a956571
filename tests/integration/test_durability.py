"""salon killed with SIGKILL mid-generation: after a restart the user's message is there
and the partial answer is kept, marked incomplete, and can be continued."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SALON_DATA_DIR": str(tmp_path),
        "SALON_MODELS": "fake:slow",
        "SALON_FLUSH_INTERVAL_S": "0.05",
        "SALON_LOG_LEVEL": "warning",
        # Restarted on another port, it is still the same node (store/nodes.py).
        "SALON_NODE_NAME": "node-1",
    }


class Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "salon", "serve", "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/api/auth/state", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("salon did not start within 30 s")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def servers(server_env: dict[str, str]) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


def _generate_then_kill(server_env: dict[str, str], servers: list[Server]) -> Started:
    first = Server(server_env)
    servers.append(first)
    client = httpx.Client(base_url=first.url, timeout=10)
    csrf = client.post(
        "/api/auth/signup", json={"username": "ann", "password": "correct horse"}
    ).json()["csrf_token"]
    headers = {"x-csrf-token": csrf}
    cid = client.post("/api/conversations", json={}, headers=headers).json()["id"]
    turn = client.post(
        f"/api/conversations/{cid}/messages", json={"content": "count for me"}, headers=headers
    ).json()
    time.sleep(0.6)  # a few flushes happen
    first.kill()
    return Started(client, headers, cid, turn["assistant_message"]["id"])


@dataclass
class Started:
    client: httpx.Client
    headers: dict[str, str]
    conversation_id: str
    answer_id: int

    def page(self, server: Server) -> list[dict[str, Any]]:
        self.client = httpx.Client(base_url=server.url, timeout=10, cookies=self.client.cookies)
        response = self.client.get(f"/api/conversations/{self.conversation_id}/messages")
        data: list[dict[str, Any]] = response.json()["data"]
        return data


def test_sigkill_mid_generation_loses_nothing(
    server_env: dict[str, str], servers: list[Server]
) -> None:
    started = _generate_then_kill(server_env, servers)
    second = Server(server_env)
    servers.append(second)
    page = started.page(second)
    client, headers, answer_id = started.client, started.headers, started.answer_id
    assert page[0]["content"] == "count for me"
    partial = page[1]
    assert partial["id"] == answer_id
    assert partial["status"] == "incomplete"
    words = partial["content"].split()
    assert len(words) >= 3
    assert words == [f"w{i}" for i in range(1, len(words) + 1)]

    resumed = client.post(f"/api/messages/{answer_id}/continue", headers=headers)
    assert resumed.status_code == 200, resumed.text
    with client.stream(
        "GET",
        f"/api/messages/{answer_id}/stream",
        headers={"last-event-id": str(len(partial["content"]))},
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                more = json.loads(line[6:])["text"]
                assert more.startswith(" w")  # continues right where it was cut
                break
    client.post(f"/api/messages/{answer_id}/stop", headers=headers)


def test_a_dead_nodes_generation_is_taken_over_by_another_node(
    server_env: dict[str, str], servers: list[Server]
) -> None:
    """Node 1 dies mid-answer; node 2, a different node on the same database, does not
    touch node 1's generation at start-up but sweeps it once node 1 has been silent for
    `node_timeout_s`: the text is kept, marked incomplete."""
    started = _generate_then_kill({**server_env, "SALON_NODE_TIMEOUT_S": "1"}, servers)
    other = Server({**server_env, "SALON_NODE_NAME": "node-2", "SALON_NODE_TIMEOUT_S": "1"})
    servers.append(other)
    deadline = time.monotonic() + 15
    answer = started.page(other)[1]
    while answer["status"] == "streaming" and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = started.page(other)[1]
    assert answer["status"] == "incomplete"
    words = answer["content"].split()
    assert len(words) >= 3
    assert words == [f"w{i}" for i in range(1, len(words) + 1)]
