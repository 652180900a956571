"""The server dies mid-stream: the page says it is reconnecting, and once the server is
back the answer is marked incomplete (its saved text kept) and can be continued."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e


def test_server_crash_mid_stream_then_continue(
    browser: Any, server_factory: Any, sign_up: Any, chat_ui: Any
) -> None:
    srv = server_factory()
    context = browser.new_context(base_url=srv.base_url)
    context.set_default_timeout(10_000)
    try:
        page = context.new_page()
        sign_up(page, "crash-admin", "crash-password", first=True)
        ui = chat_ui(page)
        ui.pick_model("fake:slow")
        ui.send("count slowly")
        answer = ui.last()
        expect(answer.get_by_test_id("message-content")).to_contain_text("w10")

        # Crash: no graceful shutdown, the generation dies with the process.
        os.kill(srv.process.pid, signal.SIGKILL)
        srv.process.wait(timeout=10)
        expect(answer.get_by_test_id("connection-status")).to_contain_text("Reconnecting")
        expect(answer).to_have_attribute("data-status", "streaming")

        port = int(srv.base_url.rsplit(":", 1)[1])
        server_factory(data_dir=srv.data_dir, port=port)
        ui.wait_status(answer, "incomplete", timeout=30_000)
        expect(answer.get_by_test_id("message-status")).to_contain_text("Incomplete")
        expect(answer.get_by_test_id("connection-status")).to_have_count(0)
        kept = ui.content(answer).split()
        assert len(kept) >= 5
        assert kept == [f"w{i}" for i in range(1, len(kept) + 1)]

        answer.get_by_test_id("continue").click()
        ui.wait_status(answer, "complete", timeout=30_000)
        final = ui.content(answer).split()
        assert final == [f"w{i}" for i in range(1, 401)]
    finally:
        context.close()
