"""PostgreSQL restarted under load: a private, throw-away cluster that tests and benchmarks
may stop and restart (the shared server on 127.0.0.1:5432 is never touched), and the load
that goes through salon's HTTP API meanwhile. Used by tests/integration/test_chaos_postgres.py
and bench/chaos_postgres.py.

It uses the server binaries of the machine's PostgreSQL (Debian's `/usr/lib/postgresql/N/bin`,
or `SALON_TEST_PG_BIN`). initdb and the server refuse to run as root, so as root every
command runs as the `postgres` OS user through `runuser`, in a temp dir that user owns.
The cluster listens on 127.0.0.1 on a free port, its unix socket lives in the temp dir,
authentication is `trust` (loopback only), and everything is removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

# pg_ctl waits for the server itself; this bounds any one command on a loaded machine.
COMMAND_TIMEOUT_S = 120.0


def find_pg_bin() -> Path | None:
    """The directory of initdb and pg_ctl, newest major version first, or None."""
    configured = os.environ.get("SALON_TEST_PG_BIN")
    candidates = [Path(configured)] if configured else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted(
            (p for p in root.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name)
        )
        candidates += [v / "bin" for v in versions]
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


def unavailable_reason() -> str | None:
    """Why a private cluster cannot be started here, or None when it can."""
    if find_pg_bin() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' OS user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to start the server as 'postgres'"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """`start()` once (initdb + start), then `restart()`, `stop()`, `start()` at will;
    `destroy()` stops it and removes every file."""

    def __init__(self, database: str = "salon") -> None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries are not installed")
        self.bin = bin_dir
        self.database = database
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="salon-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self._as_root = os.geteuid() == 0
        self._initialised = False
        self.socket_dir.mkdir()
        if self._as_root:
            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            cwd=self.root,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} exited {result.returncode}:\n{result.stdout}\n"
                f"{result.stderr}\n{self.server_log()[-2000:]}"
            )
        return result

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir}"
        self._run(
            str(self.bin / "pg_ctl"),
            action,
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",  # wait until the server accepts connections (or is down)
            "-t",
            "60",
            "-o",
            options,
            *extra,
        )

    def start(self) -> None:
        if not self._initialised:
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",  # a throw-away cluster: durability across OS crashes is moot
                "-E",
                "UTF8",
            )
            self._initialised = True
            self._pg_ctl("start")
            self._run(
                str(self.bin / "createdb"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                self.database,
            )
            return
        self._pg_ctl("start")

    def stop(self) -> None:
        """A fast shutdown: open sessions are disconnected, like an operator's restart."""
        self._pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def running(self) -> bool:
        return self._run(str(self.bin / "pg_ctl"), "status", "-D", str(self.data), check=False)\
            .returncode == 0  # fmt: skip

    def destroy(self) -> None:
        try:
            if self._initialised and self.running():
                self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m",
                          "immediate", "-w", check=False)  # fmt: skip
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def wait_accepting(self, timeout_s: float = 30.0) -> None:
        """Until a TCP connection to the port succeeds (pg_ctl -w already waits; this is
        for callers that started the server some other way)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# -- load through the HTTP API while the database goes away ---------------------------------

# What a request during the outage must get: a 503 in salon's error shape, with Retry-After.
OUTAGE_STATUS, OUTAGE_CODE = 503, "database_unavailable"


@dataclass
class Outcome:
    # "turn" (POST a message), "follow" (its SSE stream), "read" (the conversation list),
    # "write" (a new conversation), "v1" (a /v1 stream), "probe" (a read after the database
    # came back)
    kind: str
    started: float  # time.monotonic()
    seconds: float
    status: int | None  # None: no HTTP answer (a transport error or our own time bound)
    ok: bool
    detail: str = ""  # the error code, or what went wrong

    @property
    def outage_error(self) -> bool:
        """The clear refusal expected while the database is away."""
        return self.status == OUTAGE_STATUS and self.detail == OUTAGE_CODE

    @property
    def bad(self) -> bool:
        """Neither a success nor the clear refusal: a hang, a cut stream, a 500..."""
        return not self.ok and not self.outage_error


@dataclass
class ChaosLoad:
    """A few users' worth of traffic: web-app turns (POST a message, then follow its stream
    to the end, re-attaching with Last-Event-ID when the database refuses the follow), a
    reader of the conversation list, a writer of new conversations and /v1 streams (whose
    API key lookup is cached, so they need the database only now and then), each request
    bounded by `bound_s`, each loop by `stop_at` and a count.
    It records every request, every user message and conversation salon acknowledged
    (201), and the text of every answer whose stream ended with `done`."""

    base_url: str
    username: str = "chaos"
    bound_s: float = 20.0
    outcomes: list[Outcome] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)  # user text -> conversation
    started: set[int] = field(default_factory=set)  # the answers of acknowledged turns
    answers: dict[int, str] = field(default_factory=dict)  # assistant id -> streamed text
    created: list[str] = field(default_factory=list)  # conversations acknowledged (201)
    csrf: str = ""
    api_key: str = ""
    client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> ChaosLoad:
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=self.bound_s)
        response = await self.client.post(
            "/api/auth/signup",
            json={"username": self.username, "password": "correct horse battery"},
        )
        response.raise_for_status()
        self.csrf = response.json()["csrf_token"]
        response = await self.client.post(
            "/api/keys", json={"name": "chaos"}, headers={"x-csrf-token": self.csrf}
        )
        response.raise_for_status()
        self.api_key = response.json()["key"]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.client is not None
        await self.client.aclose()

    # -- one request, timed and bounded --------------------------------------------------

    async def _timed(self, kind: str, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        started = time.monotonic()
        try:
            outcome = await asyncio.wait_for(call(), self.bound_s)
        except TimeoutError:
            outcome = Outcome(kind, started, 0.0, None, False, "no answer within the bound")
        except httpx.HTTPError as exc:
            outcome = Outcome(kind, started, 0.0, None, False, f"{type(exc).__name__}: {exc}")
        outcome.started, outcome.seconds = started, time.monotonic() - started
        self.outcomes.append(outcome)
        return outcome

    @staticmethod
    def _refusal(kind: str, response: httpx.Response) -> Outcome:
        """A non-2xx answer: the clear refusal, or what was wrong with it."""
        try:
            code = str(response.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return Outcome(kind, 0, 0, response.status_code, False, "not a JSON error body")
        if response.status_code == OUTAGE_STATUS and "retry-after" not in response.headers:
            return Outcome(kind, 0, 0, response.status_code, False, f"{code} w/o Retry-After")
        return Outcome(kind, 0, 0, response.status_code, False, code)

    # -- the web app -----------------------------------------------------------------------

    async def web_user(self, worker: int, stop_at: float, max_turns: int = 500) -> None:
        assert self.client is not None
        headers = {"x-csrf-token": self.csrf}
        conversation = ""
        while not conversation and time.monotonic() < stop_at:
            response = await self.client.post("/api/conversations", json={}, headers=headers)
            if response.status_code == 201:
                conversation = response.json()["id"]
            else:
                await asyncio.sleep(0.2)
        turn = 0
        while time.monotonic() < stop_at and turn < max_turns:
            turn += 1
            text = f"worker {worker} turn {turn} {uuid.uuid4().hex[:8]}"
            answer: list[int] = []

            async def post(text: str = text, answer: list[int] = answer) -> Outcome:
                assert self.client is not None
                response = await self.client.post(
                    f"/api/conversations/{conversation}/messages",
                    json={"content": text},
                    headers=headers,
                )
                if response.status_code != 201:
                    return self._refusal("turn", response)
                self.acknowledged[text] = conversation
                answer.append(int(response.json()["assistant_message"]["id"]))
                self.started.add(answer[0])
                return Outcome("turn", 0, 0, 201, True)

            outcome = await self._timed("turn", post)
            if not outcome.ok:
                await asyncio.sleep(0.2)  # what a client does with Retry-After, sooner
                continue
            await self._follow_to_end(answer[0], stop_at + self.bound_s)

    async def _follow_to_end(self, message_id: int, give_up_at: float) -> None:
        """Follows an answer to its end, re-attaching after a refusal where it stopped."""
        text: list[str] = []
        while time.monotonic() < give_up_at:
            ended: list[bool] = []

            async def follow(ended: list[bool] = ended) -> Outcome:
                assert self.client is not None
                have = len("".join(text))
                async with self.client.stream(
                    "GET",
                    f"/api/messages/{message_id}/stream",
                    headers={"last-event-id": str(have)},
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        return self._refusal("follow", response)
                    name = ""
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: "):
                            data = json.loads(line[6:])
                            if name == "delta":
                                text.append(data["text"])
                            elif name == "done":
                                self.answers[message_id] = "".join(text)
                                ended.append(True)
                                return Outcome("follow", 0, 0, 200, True)
                            elif name == "error":
                                ended.append(True)
                                return Outcome("follow", 0, 0, 200, False, data["code"])
                    return Outcome("follow", 0, 0, 200, False, "stream cut before its end")

            outcome = await self._timed("follow", follow)
            if ended or outcome.bad:
                return
            await asyncio.sleep(0.2)

    async def reader(self, stop_at: float, max_requests: int = 5000) -> None:
        """A user browsing: the conversation list, ten times a second (reads only)."""
        done = 0
        while time.monotonic() < stop_at and done < max_requests:
            done += 1
            await self._timed("read", self._list)
            await asyncio.sleep(0.1)

    async def _list(self) -> Outcome:
        assert self.client is not None
        response = await self.client.get("/api/conversations")
        if response.status_code != 200:
            return self._refusal("read", response)
        return Outcome("read", 0, 0, 200, True)

    async def writer(self, stop_at: float, max_requests: int = 2000) -> None:
        """A user starting new chats, five times a second (a write each)."""
        done = 0
        while time.monotonic() < stop_at and done < max_requests:
            done += 1
            await self._timed("write", self._create)
            await asyncio.sleep(0.2)

    async def _create(self) -> Outcome:
        assert self.client is not None
        response = await self.client.post(
            "/api/conversations", json={"title": "chaos"}, headers={"x-csrf-token": self.csrf}
        )
        if response.status_code != 201:
            return self._refusal("write", response)
        self.created.append(response.json()["id"])
        return Outcome("write", 0, 0, 201, True)

    # -- the OpenAI-compatible API ---------------------------------------------------------

    async def v1_user(
        self, stop_at: float, max_requests: int = 5000, pause_s: float = 0.02
    ) -> None:
        done = 0
        while time.monotonic() < stop_at and done < max_requests:
            done += 1
            outcome = await self._timed("v1", self._v1_stream)
            await asyncio.sleep(pause_s if outcome.ok else 0.2)

    async def _v1_stream(self) -> Outcome:
        assert self.client is not None
        body = {
            "model": "fake:echo",
            "stream": True,
            "messages": [{"role": "user", "content": "chaos"}],
        }
        async with self.client.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {self.api_key}"},
        ) as response:
            if response.status_code != 200:
                await response.aread()
                return self._refusal("v1", response)
            async for line in response.aiter_lines():
                if line.strip() == "data: [DONE]":
                    return Outcome("v1", 0, 0, 200, True)
                if line.startswith("data: ") and '"error"' in line:
                    return Outcome("v1", 0, 0, 200, False, line[6:200])
            return Outcome("v1", 0, 0, 200, False, "stream cut before [DONE]")

    # -- recovery --------------------------------------------------------------------------

    async def recovery_s(self, since: float, give_up_s: float = 30.0) -> float:
        """Seconds from `since` (the database back) to the first successful API call that
        needs it (listing conversations), probing every 50 ms."""
        assert self.client is not None
        while time.monotonic() - since < give_up_s:
            outcome = await self._timed("probe", self._probe)
            if outcome.ok:
                return outcome.started + outcome.seconds - since
            await asyncio.sleep(0.05)
        raise AssertionError(f"salon did not recover within {give_up_s} s")

    async def _probe(self) -> Outcome:
        assert self.client is not None
        response = await self.client.get("/api/conversations")
        if response.status_code != 200:
            return self._refusal("probe", response)
        return Outcome("probe", 0, 0, 200, True)

    # -- summary ---------------------------------------------------------------------------

    def summary(self) -> dict[str, dict[str, float]]:
        """Per kind: requests, ok, refused (the clear 503), bad, max and p99 seconds."""
        table: dict[str, dict[str, float]] = {}
        for kind in sorted({o.kind for o in self.outcomes}):
            rows = [o for o in self.outcomes if o.kind == kind]
            times = sorted(o.seconds for o in rows)
            table[kind] = {
                "requests": len(rows),
                "ok": sum(o.ok for o in rows),
                "refused": sum(o.outage_error for o in rows),
                "bad": sum(o.bad for o in rows),
                "max_s": times[-1],
                "p99_s": times[min(len(times) - 1, int(0.99 * len(times)))],
            }
        return table


async def stored_messages(url: str) -> list[tuple[int, str, str, str, str | None]]:
    """(id, role, content, status, error) of every message, read straight from PostgreSQL."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text("select id, role, content, status, error from messages order by id")
            )
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
    finally:
        await engine.dispose()


async def stored_conversations(url: str) -> set[str]:
    """The ids of every conversation, read straight from PostgreSQL."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return {str(r[0]) for r in await conn.execute(sa.text("select id from conversations"))}
    finally:
        await engine.dispose()


async def settled_messages(
    url: str, within_s: float = 30.0, answers: set[int] | None = None
) -> list[tuple[int, str, str, str, str | None]]:
    """The messages once no generation (of `answers`, or any) is running any more, or after
    `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        rows = await stored_messages(url)
        running = [mid for mid, _, _, status, _ in rows if status == "streaming"]
        if not [mid for mid in running if answers is None or mid in answers]:
            return rows
        if time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)
