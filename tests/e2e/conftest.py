"""End-to-end fixtures: a real `salon serve` subprocess and a real (headless) Chromium.

The server runs on a free local port with its own data directory and the fake models
(plus `embedded:smollm2-135m-instruct` for the one test marked `embedded`). Tests talk to
it through the browser UI, and through `page.request` (same cookies as the page) where
they need to set something up quickly or check the API directly.

Environment knobs:
- SALON_E2E_CHROMIUM: the Chromium binary (default /usr/bin/chromium).
- SALON_E2E_START_S: how long to wait for a server to answer (default 30 s; the
  embedded-model server gets SALON_E2E_EMBEDDED_START_S, default 900 s, since it may have
  to prepare the model first).
- SALON_E2E_KEEP: keep the servers' data directories (their logs are printed on failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SALON_E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-gpu",
    "--no-first-run",
]
FAKE_MODELS = "fake:echo,fake:slow,fake:fail,fake:down,fake:markdown,fake:loop"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
PASSWORD = "correct-horse-battery"
ADMIN = "alice"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


# -- the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    base_url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def database(self) -> Path:
        return self.data_dir / "salon.db"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def start_server(
    data_dir: Path,
    models: str,
    *,
    start_timeout_s: float,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    # A clean environment for salon: no SALON_* settings leak in from the developer's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALON_")}
    env.update(
        {
            "SALON_DATA_DIR": str(data_dir),
            "SALON_MODELS": models,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    log_path = data_dir / "server.log"
    log = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "salon", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(REPO),
    )
    log.close()
    server = Server(f"http://127.0.0.1:{port}", data_dir, log_path, process, env)
    deadline = time.monotonic() + start_timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"salon serve exited with {process.returncode} before answering:\n"
                f"{server.log_tail()}"
            )
        try:
            _get_json(f"{server.base_url}/api/auth/state")
            return server
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(
                f"salon serve did not answer within {start_timeout_s:.0f} s:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    """Stops exactly the process we started, by its PID."""
    process = server.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextlib.contextmanager
def running_server(
    prefix: str, models: str, *, start_timeout_s: float, extra_env: dict[str, str] | None = None
) -> Iterator[Server]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    server = start_server(
        root / "data", models, start_timeout_s=start_timeout_s, extra_env=extra_env
    )
    try:
        yield server
    finally:
        stop_server(server)
        if os.environ.get("SALON_E2E_KEEP"):
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server_factory() -> Iterator[Any]:
    """Starts extra servers for one test (each in its own data directory unless given one);
    all are stopped afterwards. `start(models, data_dir=None, port=None) -> Server`."""
    started: list[Server] = []
    root = Path(tempfile.mkdtemp(prefix="salon-e2e-extra-"))

    def start(
        models: str = FAKE_MODELS, data_dir: Path | None = None, port: int | None = None
    ) -> Server:
        timeout = float(os.environ.get("SALON_E2E_START_S", "30"))
        srv = start_server(
            data_dir or root / f"data{len(started)}", models, start_timeout_s=timeout, port=port
        )
        started.append(srv)
        return srv

    yield start
    for srv in started:
        stop_server(srv)
    if not os.environ.get("SALON_E2E_KEEP"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    timeout = float(os.environ.get("SALON_E2E_START_S", "30"))
    with running_server("salon-e2e-", FAKE_MODELS, start_timeout_s=timeout) as srv:
        yield srv


@pytest.fixture(scope="session")
def embedded_server() -> Iterator[Server]:
    """A second server with the real embedded model. The model file comes from
    SALON_TEST_MODEL_CACHE (default <repo>/.cache/models, filled by scripts/test.sh); the
    server prepares it itself when it is missing, hence the long start timeout."""
    cache = Path(os.environ.get("SALON_TEST_MODEL_CACHE", REPO / ".cache" / "models"))
    timeout = float(os.environ.get("SALON_E2E_EMBEDDED_START_S", "900"))
    with running_server(
        "salon-e2e-embedded-",
        EMBEDDED_MODEL,
        start_timeout_s=timeout,
        extra_env={"SALON_EMBEDDED__CACHE_DIR": str(cache)},
    ) as srv:
        yield srv


# -- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set SALON_E2E_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def new_context(browser: Any, server: Server, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Factory for browser contexts on the server; all are closed after the test, which
    fails if a page of theirs threw an uncaught JavaScript error."""
    contexts: list[Any] = []
    page_errors: list[str] = []

    def watch(page: Any) -> None:
        page.on("pageerror", lambda error: page_errors.append(f"{page.url}: {error}"))

    def make(
        storage_state: dict[str, Any] | None = None, base_url: str | None = None, **kwargs: Any
    ) -> Any:
        context = browser.new_context(
            base_url=base_url or server.base_url,
            storage_state=storage_state,
            viewport=kwargs.pop("viewport", {"width": 1280, "height": 860}),
            **kwargs,
        )
        context.set_default_timeout(10_000)
        context.on("page", watch)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        with contextlib.suppress(Exception):
            context.close()
    assert not page_errors, "uncaught errors in the page:\n" + "\n".join(page_errors)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        srv = item.funcargs.get("server") if hasattr(item, "funcargs") else None
        if isinstance(srv, Server):
            report.sections.append(("salon serve log (tail)", srv.log_tail()))
    return report


# -- accounts and helpers ----------------------------------------------------------------


@dataclass
class Account:
    username: str
    password: str
    storage_state: dict[str, Any]


def call_api(page: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Calls the JSON API with the page's cookies (and its CSRF token). Returns
    (status, parsed body)."""
    headers = {"Accept": "application/json"}
    if method not in ("GET", "HEAD"):
        me = page.request.get("/api/auth/me")
        if me.ok:
            headers["X-CSRF-Token"] = me.json()["csrf_token"]
        headers["Content-Type"] = "application/json"
    response = page.request.fetch(
        path,
        method=method,
        headers=headers,
        data=json.dumps(body) if body is not None else None,
    )
    text = response.text()
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = text
    return response.status, data


def sign_up_in_ui(page: Any, username: str, password: str, *, first: bool) -> None:
    expect = sync_api.expect
    page.goto("/")
    expect(page.get_by_test_id("auth-form")).to_be_visible()
    if first:
        expect(page.get_by_test_id("auth-title")).to_have_text("Create the admin account")
    else:
        expect(page.get_by_test_id("auth-title")).to_have_text("Sign in to Salon")
        page.get_by_test_id("auth-switch").click()
        expect(page.get_by_test_id("auth-title")).to_have_text("Create your account")
    page.get_by_test_id("auth-username").fill(username)
    page.get_by_test_id("auth-password").fill(password)
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("app")).to_be_visible()
    expect(page.get_by_test_id("user-name")).to_have_text(username)


@pytest.fixture(scope="session")
def admin_account(browser: Any, server: Server) -> Account:
    """The first account, created through the UI's first-run form (so it is the admin)."""
    state = _get_json(f"{server.base_url}/api/auth/state")
    assert state["has_users"] is False, "the e2e server must start empty"
    context = browser.new_context(base_url=server.base_url)
    context.set_default_timeout(10_000)
    try:
        page = context.new_page()
        sign_up_in_ui(page, ADMIN, PASSWORD, first=True)
        return Account(ADMIN, PASSWORD, context.storage_state())
    finally:
        context.close()


@pytest.fixture
def admin_page(new_context: Any, admin_account: Account) -> Any:
    """A signed-in page of the admin, on a fresh new chat."""
    context = new_context(storage_state=admin_account.storage_state)
    page = context.new_page()
    page.goto("/")
    sync_api.expect(page.get_by_test_id("composer")).to_be_visible()
    return page


class ChatUI:
    """Thin helpers over the testids of the web UI."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.expect = sync_api.expect

    def messages(self, role: str | None = None) -> Any:
        selector = '[data-testid="message"]'
        if role:
            selector += f'[data-role="{role}"]'
        return self.page.locator(selector)

    def last(self, role: str = "assistant") -> Any:
        return self.messages(role).last

    def pick_model(self, model: str) -> None:
        picker = self.page.get_by_test_id("model-picker")
        picker.select_option(model)
        self.expect(picker).to_have_value(model)

    def new_chat(self, model: str | None = None) -> None:
        self.page.get_by_test_id("new-chat").click()
        self.expect(self.page.get_by_test_id("empty-state")).to_be_visible()
        if model:
            self.pick_model(model)

    def send(self, text: str) -> None:
        """Types and sends a message; returns once the UI shows it and its answer (so that
        `last()` is the new answer, not the previous one)."""
        before = self.messages().count()
        composer = self.page.get_by_test_id("composer")
        composer.fill(text)
        self.expect(self.page.get_by_test_id("send")).to_be_enabled()
        composer.press("Enter")
        self.expect(self.messages()).to_have_count(before + 2)
        self.expect(self.last("user").get_by_test_id("message-content")).to_have_text(text)

    def wait_status(self, message: Any, status: str, timeout: float = 20_000) -> None:
        self.expect(message).to_have_attribute("data-status", status, timeout=timeout)

    def content(self, message: Any) -> str:
        # textContent, not innerText: innerText is "" for a message that content-visibility
        # has not painted yet (just rendered, or off screen).
        return str(message.get_by_test_id("message-content").text_content()).strip()

    def conversation_id(self) -> str:
        path = self.page.evaluate("location.pathname")
        assert path.startswith("/c/"), path
        return str(path[len("/c/") :])


@pytest.fixture
def sign_up() -> Any:
    """`sign_up(page, username, password, first=bool)` through the UI's forms."""
    return sign_up_in_ui


@pytest.fixture
def chat_ui() -> Any:
    return ChatUI


@pytest.fixture
def api() -> Any:
    """`api(page, method, path, body=None) -> (status, data)` with the page's session."""
    return call_api
