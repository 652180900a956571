"""The conversation list: newest first, search, rename, delete, paging."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e


def _item(page: Any, conv_id: str) -> Any:
    return page.locator(f'[data-testid="conversation-item"][data-id="{conv_id}"]')


def test_search_rename_delete(admin_page: Any, chat_ui: Any) -> None:
    page = admin_page
    ui = chat_ui(page)
    word = f"quokka{uuid.uuid4().hex[:6]}"

    ui.send("first topic of the day")
    ui.wait_status(ui.last(), "complete")
    first_id = ui.conversation_id()
    ui.send(f"tell me about the {word}")  # in the content, not in the title
    ui.wait_status(ui.last(), "complete")

    ui.new_chat()
    ui.send("second topic")
    ui.wait_status(ui.last(), "complete")
    second_id = ui.conversation_id()

    # Newest first.
    ids = page.get_by_test_id("conversation-item").evaluate_all("els => els.map(e => e.dataset.id)")
    assert ids.index(second_id) < ids.index(first_id)

    # Search matches message content; clearing shows everything again.
    page.get_by_test_id("search").fill(word)
    expect(page.get_by_test_id("conversation-item")).to_have_count(1)
    expect(_item(page, first_id)).to_be_visible()
    page.get_by_test_id("search").fill("second topic")
    expect(page.get_by_test_id("conversation-item")).to_have_count(1)
    expect(_item(page, second_id)).to_be_visible()
    page.get_by_test_id("search").fill("")
    expect(_item(page, first_id)).to_be_visible()

    # Open the first one from the list.
    _item(page, first_id).get_by_test_id("conversation-link").click()
    expect(page).to_have_url(re.compile(f"/c/{first_id}$"))
    expect(ui.messages()).to_have_count(4)

    # Rename inline.
    item = _item(page, first_id)
    item.hover()
    item.get_by_test_id("conversation-rename").click()
    field = item.get_by_test_id("rename-input")
    expect(field).to_be_focused()
    field.fill("Renamed chat")
    field.press("Enter")
    expect(_item(page, first_id).get_by_test_id("conversation-link")).to_have_text("Renamed chat")
    expect(page.get_by_test_id("chat-title")).to_have_text("Renamed chat")
    # Escape cancels a rename.
    item = _item(page, first_id)
    item.get_by_test_id("conversation-rename").click()
    item.get_by_test_id("rename-input").fill("never saved")
    item.get_by_test_id("rename-input").press("Escape")
    expect(_item(page, first_id).get_by_test_id("conversation-link")).to_have_text("Renamed chat")
    page.reload()
    expect(_item(page, first_id).get_by_test_id("conversation-link")).to_have_text("Renamed chat")

    # Delete asks first; cancelling keeps it.
    item = _item(page, second_id)
    item.hover()
    item.get_by_test_id("conversation-delete").click()
    expect(page.get_by_test_id("confirm-dialog")).to_be_visible()
    page.get_by_test_id("confirm-cancel").click()
    expect(_item(page, second_id)).to_be_visible()
    # Deleting the open conversation goes back to a new chat.
    _item(page, first_id).hover()
    _item(page, first_id).get_by_test_id("conversation-delete").click()
    page.get_by_test_id("confirm-ok").click()
    expect(_item(page, first_id)).to_have_count(0)
    expect(page.get_by_test_id("empty-state")).to_be_visible()
    page.reload()
    expect(_item(page, second_id)).to_be_visible()
    expect(_item(page, first_id)).to_have_count(0)


def test_conversation_list_pages_on_scroll(admin_account: Any, api: Any, new_context: Any) -> None:
    page = new_context().new_page()
    # A fresh user (not the first one: admin_account exists), so that the count is exact.
    page.goto("/")
    page.get_by_test_id("auth-switch").click()
    name = f"pager{uuid.uuid4().hex[:6]}"
    page.get_by_test_id("auth-username").fill(name)
    page.get_by_test_id("auth-password").fill("pager-password")
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("user-name")).to_have_text(name)
    total = 75
    for i in range(total):
        status, _ = api(page, "POST", "/api/conversations", {"title": f"chat {i:03d}"})
        assert status == 201
    page.reload()
    items = page.get_by_test_id("conversation-item")
    expect(items.first).to_have_text("chat 074")
    # A tall screen can show more than a page at once, so the list may already fill in.
    page.get_by_test_id("conversation-list").evaluate("el => el.scrollTo(0, el.scrollHeight)")
    expect(items).to_have_count(total)
    titles = items.get_by_test_id("conversation-link").all_inner_texts()
    assert titles == [f"chat {i:03d}" for i in reversed(range(total))]
