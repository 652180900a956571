"""The real embedded model, end to end: a browser gets a streamed, non-empty answer."""

from __future__ import annotations

import time
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.e2e, pytest.mark.embedded]

_WATCH_STREAMING = """() => {
  window.__salonSeen = { streaming: false, partial: false };
  const streaming = '[data-role="assistant"][data-status="streaming"]';
  const check = () => {
    for (const el of document.querySelectorAll(streaming)) {
      window.__salonSeen.streaming = true;
      const content = el.querySelector('[data-testid="message-content"]');
      if (content && content.textContent.trim()) window.__salonSeen.partial = true;
    }
  };
  new MutationObserver(check).observe(document.body, {
    subtree: true, childList: true, attributes: true, characterData: true,
  });
}"""


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
        # A MutationObserver sees every state the DOM passes through; polling from the test
        # missed a whole answer that streamed in under a second on a fast machine.
        page.evaluate(_WATCH_STREAMING)
        started = time.perf_counter()
        ui.send("Say hello in one short sentence.")
        answer = ui.last()
        ui.wait_status(answer, "complete", timeout=180_000)
        seen = page.evaluate("() => window.__salonSeen")
        seen_streaming, seen_partial = seen["streaming"], seen["partial"]
        text = ui.content(answer)
        print(f"\nembedded answer in {time.perf_counter() - started:.2f} s: {text[:200]!r}")
        assert text
        assert seen_streaming
        assert seen_partial, "no partial text was seen before the answer was complete"
        expect(answer.get_by_test_id("message-error")).to_have_count(0)
    finally:
        context.close()
