"""The real embedded model, end to end: a browser gets a streamed, non-empty answer."""

from __future__ import annotations

import time
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.e2e, pytest.mark.embedded]


def test_embedded_model_streams_an_answer(
    browser: Any, embedded_server: Any, sign_up: Any, chat_ui: Any
) -> None:
    context = browser.new_context(base_url=embedded_server.base_url)
    context.set_default_timeout(15_000)
    try:
        page = context.new_page()
        sign_up(page, "embedded-admin", "embedded-password", first=True)
        # One model only: no picker.
        expect(page.get_by_test_id("model-picker")).to_be_hidden()
        ui = chat_ui(page)
        started = time.perf_counter()
        ui.send("Say hello in one short sentence.")
        answer = ui.last()
        seen_streaming = False
        seen_partial = False
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = answer.get_attribute("data-status")
            if status == "streaming":
                seen_streaming = True
                if answer.get_by_test_id("message-content").text_content().strip():
                    seen_partial = True
            elif status != "streaming" and status is not None:
                break
            page.wait_for_timeout(20)
        ui.wait_status(answer, "complete", timeout=5_000)
        text = ui.content(answer)
        print(f"\nembedded answer in {time.perf_counter() - started:.2f} s: {text[:200]!r}")
        assert text
        assert seen_streaming
        assert seen_partial, "no partial text was seen before the answer was complete"
        expect(answer.get_by_test_id("message-error")).to_have_count(0)
    finally:
        context.close()
