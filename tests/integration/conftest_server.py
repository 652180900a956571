"""Shared helpers and fixtures for tests that run a real `salon serve` subprocess.

Not a conftest (others own those): import what you need from here, e.g.

    from conftest_server import salon_server, create_user_and_key, upstream_in_thread

Everything listens on 127.0.0.1, every wait is bounded, and every process started here is
stopped by its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from salon.backends.mock_upstream import RunningUpstream, running_upstream

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 120.0


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the mock upstream, on its own event loop in a thread --------------------------------


@contextlib.contextmanager
def upstream_in_thread(**options: Any) -> Iterator[RunningUpstream]:
    """Runs `salon.backends.mock_upstream` on a private event loop in a daemon thread, so
    sync tests (and fixtures of any scope) can use it. `options` go to `running_upstream`."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mock-upstream", daemon=True)
    thread.start()
    manager = running_upstream(**options)
    try:
        upstream = asyncio.run_coroutine_threadsafe(manager.__aenter__(), loop).result(10)
        try:
            yield upstream
        finally:
            asyncio.run_coroutine_threadsafe(manager.__aexit__(None, None, None), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- salon's CLI and server as subprocesses ----------------------------------------------


def salon_env(
    data_dir: Path,
    models: list[str],
    providers: Mapping[str, Mapping[str, str]] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a salon process: this one's, minus any SALON_ settings, plus a
    data dir, the models and the providers (`{"up": {"base_url": ..., "kind": "openai"}}`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALON_")}
    env["SALON_DATA_DIR"] = str(data_dir)
    env["SALON_MODELS"] = ",".join(models)
    env["SALON_LOG_LEVEL"] = "warning"
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name, config in (providers or {}).items():
        for key, value in config.items():
            env[f"SALON_PROVIDERS__{name.upper()}__{key.upper()}"] = value
    env.update(extra or {})
    return env


def salon_cli(env: Mapping[str, str], *args: str, stdin: str | None = None) -> str:
    """Runs `python -m salon ARGS`; returns its stdout, raises with its stderr on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "salon", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=REPO,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"salon {' '.join(args)} exited {result.returncode}:\n{result.stderr[-2000:]}"
        )
    return result.stdout


def create_user_and_key(
    env: Mapping[str, str], username: str, password: str, *, admin: bool = True
) -> str:
    """Creates an account and an API key for it through the CLI; returns the key."""
    salon_cli(env, "users", "create", username, *(["--admin"] if admin else []), stdin=password)
    key = salon_cli(env, "keys", "create", username).strip().splitlines()[-1]
    assert key.startswith("sk-salon-"), key
    return key


@dataclass
class SalonServer:
    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log_path: Path
    api_key: str = ""
    username: str = ""
    password: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/api/auth/state", timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; only this process, by its PID."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)


@contextlib.contextmanager
def salon_server(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    log_path: Path | None = None,
) -> Iterator[SalonServer]:
    """`python -m salon serve` on 127.0.0.1, yielded once it answers HTTP (bounded wait)."""
    port = port or free_port()
    log_path = log_path or Path(env["SALON_DATA_DIR"]) / f"serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "salon", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=dict(env),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = SalonServer(process, port, dict(env), log_path)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _ready(server.base_url):
            if process.poll() is not None:
                raise RuntimeError(f"salon serve exited {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"salon serve not ready in {ready_timeout_s} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(process)


def http_json(
    method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    """A small blocking JSON request (status, decoded body) for setup steps."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return int(response.status), json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


# -- fixtures ----------------------------------------------------------------------------

# Every scripted behaviour of the mock, as salon model ids of provider "up".
UPSTREAM_MODELS = [
    "up:mock",
    "up:slow",
    "up:die-mid-stream",
    "up:hang",
    "up:malformed",
    "up:truncated",
    "up:error-in-stream",
    "up:context-too-long",
    "up:error-500",
]
# salon's read timeout towards the mock: `up:hang` answers 504 after this long.
UPSTREAM_READ_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def mock_upstream_thread() -> Iterator[RunningUpstream]:
    """The mock upstream (20 chunks per answer) for the whole module."""
    with upstream_in_thread(chunks=20) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def salon_with_upstream(
    mock_upstream_thread: RunningUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SalonServer]:
    """A `salon serve` subprocess whose provider `up` is the mock upstream, with an admin
    account `alice` and an API key for her (`server.api_key`)."""
    data_dir = tmp_path_factory.mktemp("salon-serve")
    env = salon_env(
        data_dir,
        UPSTREAM_MODELS,
        {
            "up": {
                "kind": "openai",
                "base_url": mock_upstream_thread.base_url,
                "read_timeout_s": str(UPSTREAM_READ_TIMEOUT_S),
            }
        },
    )
    password = "correct horse battery"
    key = create_user_and_key(env, "alice", password)
    with salon_server(env) as server:
        server.api_key, server.username, server.password = key, "alice", password
        yield server


@contextlib.asynccontextmanager
async def serving_app(app: Any) -> AsyncIterator[str]:
    """An ASGI app served by uvicorn inside this event loop on a free loopback port; its base
    URL while the block runs."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


# -- Redis (running on CI machines; tests skip here without it) ----------------------------

REDIS_URL = os.environ.get("SALON_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own in the shared Redis, deleted afterwards."""
    if not _redis_reachable():
        if os.environ.get("CI"):
            pytest.fail("Redis must be reachable in CI (127.0.0.1:6379)")
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"salon-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
