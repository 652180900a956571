"""Long chats stay fast: a 10,000-message conversation, paged over HTTP and opened in a
browser.

1. Seeds one conversation of N messages (one branch, user/assistant alternating,
   ~200–800 characters each, some markdown) for a user, with a bulk insert through
   SQLAlchemy Core (`seed_long_conversation`, reusable by tests).
2. Starts `salon serve` on that data dir and measures `GET /api/conversations/{id}/messages`
   latency: the newest page (limit=50), older pages walked back with `before=`, and the
   oldest page; with an API key and with the browser's session cookie.
3. With Playwright and Debian's Chromium: signs in through the UI, opens `/c/<id>`, and
   times (from navigation start) until the composer is editable and the last message is
   on screen. Skips with a message when Playwright, Chromium or the UI is not there.

Writes its section between `<!-- bench:long-chat -->` markers in docs/benchmarks.md.

    python bench/long_chat.py                 # 10,000 messages
    python bench/long_chat.py --messages 2000 --no-write --no-browser

From a test:

    from bench.long_chat import seed_long_conversation
    conversation_id = seed_long_conversation(database_url, "alice", 10_000)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from harness import admin_key, serve_salon
from salon.store.db import create_engine, migrate
from salon.store.tables import conversations, messages, users

USERNAME = "longchat"
PASSWORD = "long-chat-password"
CHROMIUM = os.environ.get("SALON_E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-gpu",
]
AIM_PAGE_MS, AIM_UI_MS = 50.0, 1000.0
BATCH = 1000

# -- seeding ---------------------------------------------------------------------------

_VOCABULARY = (
    "the a of to and in that is for it with as on be this are by not or from at have an "
    "model context message answer question salon stream token branch memory latency page "
    "server client database index query request response python rust sqlite postgres cache "
    "quickly slowly carefully simply really often always never maybe perhaps indeed"
)
WORDS = tuple(_VOCABULARY.split())


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".?!.")


def _text(rng: random.Random, low: int, high: int) -> str:
    """Prose of `low`–`high` characters."""
    target = rng.randint(low, high)
    parts: list[str] = []
    length = 0
    while length < target:
        sentence = _sentence(rng)
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:high]


def _assistant_text(rng: random.Random, index: int) -> str:
    """Mostly prose; every few answers a list, now and then a code block."""
    if index % 7 == 3:
        items = "\n".join(f"- {_sentence(rng)}" for _ in range(rng.randint(3, 5)))
        return f"{_text(rng, 100, 250)}\n\n{items}"
    if index % 11 == 5:
        code = "\n".join(f"    value_{i} = compute({i}, cache=True)" for i in range(4))
        body = f"def handler(request):\n{code}\n    return value_0"
        return f"{_text(rng, 100, 300)}\n\n```python\n{body}\n```"
    return _text(rng, 200, 800)


async def seed_long_conversation_async(
    database_url: str,
    username: str,
    n: int = 10_000,
    *,
    title: str = "A very long chat",
    model: str | None = None,
    seed: int = 1,
) -> str:
    """Creates a conversation of `n` messages (one branch, alternating user/assistant, the
    last one an assistant answer when `n` is even) for the existing user `username`, and
    makes its last message the active leaf. Migrates the database first. Returns the
    conversation id. Message ids are assigned here (after the current maximum), so do not
    run it while something else writes messages to the same database."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        rng = random.Random(seed)
        conversation_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        start = now - timedelta(seconds=30 * n)
        async with engine.begin() as conn:
            user_id = await conn.scalar(sa.select(users.c.id).where(users.c.username == username))
            if user_id is None:
                raise LookupError(f"no user named {username!r}")
            first_id = int(await conn.scalar(sa.select(sa.func.max(messages.c.id))) or 0) + 1
            await conn.execute(
                conversations.insert().values(
                    id=conversation_id,
                    user_id=user_id,
                    title=title,
                    model=model,
                    current_leaf_id=None,
                    created_at=start,
                    updated_at=start,
                )
            )
            rows: list[dict[str, Any]] = []
            for i in range(n):
                message_id = first_id + i
                created = start + timedelta(seconds=30 * i)
                user_turn = i % 2 == 0
                content = _text(rng, 200, 600) if user_turn else _assistant_text(rng, i)
                rows.append(
                    {
                        "id": message_id,
                        "conversation_id": conversation_id,
                        "user_id": user_id,
                        "parent_id": message_id - 1 if i else None,
                        "role": "user" if user_turn else "assistant",
                        "content": content,
                        "status": "complete",
                        "error": None,
                        "model": None if user_turn else model,
                        "prompt_tokens": None if user_turn else 40 + i // 2,
                        "completion_tokens": None if user_turn else len(content) // 4,
                        "created_at": created,
                        "updated_at": created,
                    }
                )
                if len(rows) == BATCH:
                    await conn.execute(messages.insert(), rows)
                    rows = []
            if rows:
                await conn.execute(messages.insert(), rows)
            last = first_id + n - 1 if n else None
            await conn.execute(
                conversations.update()
                .where(conversations.c.id == conversation_id)
                .values(current_leaf_id=last, updated_at=start + timedelta(seconds=30 * n))
            )
            if conn.dialect.name == "postgresql" and n:
                # Explicit ids do not move the id sequence; move it past them.
                await conn.execute(
                    sa.text(
                        "SELECT setval(pg_get_serial_sequence('messages', 'id'), "
                        "(SELECT max(id) FROM messages))"
                    )
                )
        return conversation_id
    finally:
        await engine.dispose()


def seed_long_conversation(
    database_url: str,
    username: str,
    n: int = 10_000,
    *,
    title: str = "A very long chat",
    model: str | None = None,
    seed: int = 1,
) -> str:
    """`seed_long_conversation_async` for synchronous callers (no running event loop)."""
    return asyncio.run(
        seed_long_conversation_async(database_url, username, n, title=title, model=model, seed=seed)
    )


# -- processes -------------------------------------------------------------------------


def salon_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALON_")}
    env.update(
        {
            "SALON_DATA_DIR": str(data_dir),
            "SALON_MODELS": "fake:echo",
            "SALON_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@contextlib.contextmanager
def salon_serve(env: dict[str, str], workdir: Path) -> Iterator[tuple[str, float]]:
    """`salon serve` on a free port (its output in WORKDIR/serve.log), stopped on leaving;
    yields (base URL, seconds until it answered)."""
    proc, base, ready_s = serve_salon(env, workdir, name="serve")
    try:
        yield base, ready_s
    finally:
        proc.stop()


# -- HTTP latency ------------------------------------------------------------------------


@dataclass
class Timings:
    name: str
    ms: list[float]
    size: int = 0  # bytes of the last answer

    def q(self, percent: float) -> float:
        ordered = sorted(self.ms)
        index = min(len(ordered) - 1, max(0, round(percent / 100 * (len(ordered) - 1))))
        return ordered[index]


class Client:
    """One keep-alive HTTP/1.1 connection, so each timing is one request, not a connect."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        host, port = base.removeprefix("http://").split(":")
        self._connection = http.client.HTTPConnection(host, int(port), timeout=30)
        self._headers = headers

    def get(self, path: str) -> tuple[float, dict[str, Any], int]:
        started = time.perf_counter()
        self._connection.request("GET", path, headers=self._headers)
        response = self._connection.getresponse()
        raw = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {raw[:300]!r}")
        return elapsed, json.loads(raw), len(raw)

    def close(self) -> None:
        self._connection.close()


def login_cookie(base: str) -> str:
    request = urllib.request.Request(
        f"{base}/api/auth/login",
        data=json.dumps({"username": USERNAME, "password": PASSWORD}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        cookie = response.headers["Set-Cookie"]
    return str(cookie).split(";", 1)[0]


def measure_pages(
    base: str,
    headers: dict[str, str],
    conversation_id: str,
    first_id: int,
    label: str,
    requests: int,
) -> list[Timings]:
    client = Client(base, headers)
    path = f"/api/conversations/{conversation_id}/messages"
    try:
        for _ in range(5):  # warm-up
            client.get(f"{path}?limit=50")
        newest = Timings(f"newest page ({label})", [])
        for _ in range(requests):
            ms, page, size = client.get(f"{path}?limit=50")
            newest.ms.append(ms)
            newest.size = size
        assert len(page["data"]) == 50 and page["has_more"], page.get("has_more")
        older = Timings(f"older pages, walking back ({label})", [])
        before = page["data"][0]["id"]
        for _ in range(requests):
            ms, page, size = client.get(f"{path}?limit=50&before={before}")
            older.ms.append(ms)
            older.size = size
            if not page["has_more"]:
                break
            before = page["data"][0]["id"]
        oldest = Timings(f"oldest page ({label})", [])
        # `before` = the 51st message: the answer is the first 50 of the conversation.
        for _ in range(max(requests // 2, 10)):
            ms, page, size = client.get(f"{path}?limit=50&before={first_id + 50}")
            oldest.ms.append(ms)
            oldest.size = size
        assert not page["has_more"] and page["data"][0]["id"] == first_id
        assert page["data"][0]["parent_id"] is None
        return [newest, older, oldest]
    finally:
        client.close()


# -- the browser -------------------------------------------------------------------------

READY_JS = """
([lastId]) => {
  const composer = document.querySelector('[data-testid=composer]');
  if (!composer || composer.disabled || composer.readOnly) return false;
  const box = composer.getBoundingClientRect();
  if (box.width === 0 || box.height === 0) return false;
  const last = document.querySelector(`[data-testid=message][data-id="${lastId}"]`);
  if (!last) return false;
  const rect = last.getBoundingClientRect();
  if (rect.height === 0 || rect.bottom <= 0 || rect.top >= window.innerHeight) return false;
  if (window.__salonReadyAt === undefined) window.__salonReadyAt = performance.now();
  return true;
}
"""


def measure_ui(base: str, conversation_id: str, last_id: int, runs: int) -> tuple[list[float], str]:
    """Milliseconds from navigation start to 'composer editable and last message on
    screen', per run; or ([], why) when it cannot be measured."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        return [], "skipped: playwright is not installed"
    if not Path(CHROMIUM).exists():
        return [], f"skipped: no Chromium at {CHROMIUM}"
    times: list[float] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(20_000)
            try:
                page.goto(f"{base}/")
                page.fill("[data-testid=auth-username]", USERNAME)
                page.fill("[data-testid=auth-password]", PASSWORD)
                page.click("[data-testid=auth-submit]")
                page.wait_for_selector("[data-testid=app]", state="visible")
            except PlaywrightError as exc:
                return [], f"skipped: the web UI could not sign in ({str(exc).splitlines()[0]})"
            url = f"{base}/c/{conversation_id}"
            for _ in range(runs):
                try:
                    page.goto(url, wait_until="commit")
                    page.wait_for_function(READY_JS, arg=[last_id], polling="raf")
                except PlaywrightError as exc:
                    why = str(exc).splitlines()[0]
                    return times, f"skipped: the UI did not show the conversation ({why})"
                times.append(float(page.evaluate("window.__salonReadyAt")))
        finally:
            browser.close()
    return times, ""


# -- report ------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} × {cpu}, Python {platform.python_version()}, load average {load}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per kind")
    parser.add_argument("--ui-runs", type=int, default=5, help="timed page opens")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="salon-bench-long-chat-"))
    try:
        data_dir = workdir / "data"
        env = salon_env(data_dir)
        key = admin_key(env, USERNAME, PASSWORD)
        database_url = f"sqlite+aiosqlite:///{(data_dir / 'salon.db').resolve()}"
        started = time.perf_counter()
        conversation_id = seed_long_conversation(
            database_url, USERNAME, args.messages, model="fake:echo"
        )
        seed_s = time.perf_counter() - started
        db_mb = (data_dir / "salon.db").stat().st_size / 1e6
        print(f"seeded {args.messages:,} messages in {seed_s:.2f} s ({db_mb:.1f} MB database)")

        with salon_serve(env, workdir) as (base, start_s):
            print(f"salon serve answered after {start_s:.1f} s")
            last_id = _last_id(base, key, conversation_id)
            first_id = last_id - args.messages + 1
            by_key = {"Authorization": f"Bearer {key}"}
            results = measure_pages(
                base, by_key, conversation_id, first_id, "API key", args.requests
            )
            by_cookie = {"Cookie": login_cookie(base)}
            results += measure_pages(
                base, by_cookie, conversation_id, first_id, "session cookie", args.requests
            )
            for r in results:
                print(
                    f"{r.name:45} p50 {r.q(50):6.2f} ms  p95 {r.q(95):6.2f} ms  ({len(r.ms)} req)"
                )
            ui: list[float] = []
            ui_note = "skipped: --no-browser"
            if not args.no_browser:
                ui, ui_note = measure_ui(base, conversation_id, last_id, args.ui_runs)
                print(ui_note or "UI ready after " + ", ".join(f"{t:.0f}" for t in ui) + " ms")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    command = "python bench/long_chat.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    rows = "\n".join(
        f"| {r.name} | {len(r.ms)} | {r.q(50):.2f} | {r.q(95):.2f} | {max(r.ms):.2f} "
        f"| {r.size / 1024:.0f} KiB |"
        for r in results
    )
    newest = results[0]
    verdicts = [
        f"- Newest page p95 {newest.q(95):.1f} ms (aim ≤ {AIM_PAGE_MS:g} ms): "
        f"{'met' if newest.q(95) <= AIM_PAGE_MS else 'missed'}.",
    ]
    if ui:
        median = statistics.median(ui)
        verdicts.append(
            f"- Opening the conversation in Chromium, until the composer is editable and the "
            f"last message is on screen: median {median:.0f} ms, max {max(ui):.0f} ms over "
            f"{len(ui)} opens (aim ≤ {AIM_UI_MS:g} ms): "
            f"{'met' if max(ui) <= AIM_UI_MS else 'missed'}."
        )
    else:
        verdicts.append(f"- Web UI timing: {ui_note}.")
    section = f"""## Long chats

One conversation of {args.messages:,} messages (one branch, user/assistant alternating,
~200–800 characters each, some markdown), seeded with a bulk insert
({seed_s:.1f} s, {db_mb:.1f} MB SQLite file). `GET /api/conversations/{{id}}/messages?limit=50`
timed over one keep-alive connection from the same machine (after 5 warm-up requests):
the newest page, older pages walked back with `before=`, and the oldest page. The web UI
time runs from navigation start of `/c/<id>` (already signed in, static files cached) until
the composer is editable and the last message is on screen (headless Chromium).

Command: `{command.strip()}`
Machine: {machine()}; {datetime.now(UTC):%Y-%m-%d}.

| request | n | p50 ms | p95 ms | max ms | answer |
|---|---:|---:|---:|---:|---:|
{rows}

{chr(10).join(verdicts)}
"""
    bench_report.publish("long-chat", section, write=not args.no_write)
    return 0


def _last_id(base: str, key: str, conversation_id: str) -> int:
    client = Client(base, {"Authorization": f"Bearer {key}"})
    try:
        _, page, _ = client.get(f"/api/conversations/{conversation_id}/messages?limit=1")
        return int(page["data"][-1]["id"])
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
