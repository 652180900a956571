"""Chat in a real browser: streaming, sanitizing, stop/continue, regenerate, edit, branches,
refresh mid-stream, backend failures."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e


def test_first_account_is_admin(admin_page: Any, admin_account: Any, api: Any) -> None:
    page = admin_page
    status, me = api(page, "GET", "/api/auth/me")
    assert status == 200
    assert me["user"]["username"] == admin_account.username
    assert me["user"]["role"] == "admin"
    page.get_by_test_id("open-settings").click()
    dialog = page.get_by_test_id("settings-dialog")
    expect(dialog).to_be_visible()
    expect(page.get_by_test_id("settings-role")).to_have_text("admin")
    expect(page.get_by_test_id("admin-section")).to_be_visible()
    page.get_by_test_id("settings-close").click()
    expect(dialog).to_be_hidden()


def test_chat_streams_rendered_markdown(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    # The send button is disabled while the composer is empty.
    expect(page.get_by_test_id("send")).to_be_disabled()
    ui.send("Hello **world** and `code`")
    user = ui.last("user")
    expect(user.get_by_test_id("message-content")).to_have_text("Hello **world** and `code`")
    answer = ui.last()
    ui.wait_status(answer, "complete")
    content = answer.get_by_test_id("message-content")
    expect(content).to_have_text("You said: Hello world and code")
    expect(content.locator("strong")).to_have_text("world")
    expect(content.locator("code")).to_have_text("code")
    # The composer is cleared and ready; the URL names the conversation, which is listed.
    expect(page.get_by_test_id("composer")).to_have_value("")
    conv_id = ui.conversation_id()
    item = page.locator(f'[data-testid="conversation-item"][data-id="{conv_id}"]')
    expect(item).to_be_visible()
    expect(item).to_have_class(re.compile(r"\bactive\b"))
    # Shift+Enter inserts a newline instead of sending.
    composer = page.get_by_test_id("composer")
    composer.fill("line one")
    composer.press("Shift+Enter")
    composer.type("line two")
    expect(composer).to_have_value("line one\nline two")
    expect(ui.messages()).to_have_count(2)


def test_markdown_is_sanitized(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    payload = (
        "<img src=x onerror=alert(1)> <script>window.__pwned=1</script> [x](javascript:alert(2))"
    )
    ui.send(payload)
    answer = ui.last()
    ui.wait_status(answer, "complete")
    expect(answer.get_by_test_id("message-content")).to_contain_text("<img src=x onerror=alert(1)>")
    page.wait_for_timeout(300)  # give a broken image's onerror a chance to fire
    found = page.evaluate(
        """() => ({
            onerror: document.querySelectorAll('[onerror]').length,
            imgs: document.querySelectorAll('[data-testid=message] img').length,
            scripts: document.querySelectorAll('[data-testid=message] script').length,
            jsLinks: [...document.querySelectorAll('a[href]')].filter(
                a => a.getAttribute('href').trim().toLowerCase().startsWith('javascript')
            ).length,
            pwned: window.__pwned === 1,
        })"""
    )
    assert found == {"onerror": 0, "imgs": 0, "scripts": 0, "jsLinks": 0, "pwned": False}
    assert dialogs == []


def test_code_blocks_are_highlighted_with_copy(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    ui.pick_model("fake:markdown")
    ui.send("show me code")
    answer = ui.last()
    ui.wait_status(answer, "complete")
    expect(answer.locator("h2")).to_have_text("Result")
    block = answer.get_by_test_id("code-block")
    expect(block).to_have_count(1)
    expect(block.locator("code.hljs")).to_contain_text("print('hello')")
    expect(block.locator("code .hljs-built_in, code .hljs-string").first).to_be_visible()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    block.get_by_test_id("copy-code").click()
    expect(block.get_by_test_id("copy-code")).to_have_attribute("data-copied", "true")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hello')\n"
    answer.get_by_test_id("copy-message").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("## Result")


def test_stop_keeps_text_and_continue(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    ui.pick_model("fake:slow")
    ui.send("count for me")
    answer = ui.last()
    expect(page.get_by_test_id("stop")).to_be_visible()
    expect(page.get_by_test_id("send")).to_be_hidden()
    expect(answer.get_by_test_id("message-content")).to_contain_text("w5")
    page.get_by_test_id("stop").click()
    ui.wait_status(answer, "stopped", timeout=5_000)
    expect(answer.get_by_test_id("message-status")).to_contain_text("Stopped")
    expect(page.get_by_test_id("send")).to_be_visible()
    expect(page.get_by_test_id("stop")).to_be_hidden()
    stopped_text = ui.content(answer)
    words = stopped_text.split()
    assert len(words) >= 5
    assert words == [f"w{i}" for i in range(1, len(words) + 1)]
    # The stopped text stays after a reload, with the marker and both buttons.
    page.reload()
    answer = ui.last()
    ui.wait_status(answer, "stopped")
    assert ui.content(answer) == stopped_text
    expect(answer.get_by_test_id("regenerate")).to_be_visible()
    # Continue picks up where it stopped, in the same message.
    answer.get_by_test_id("continue").click()
    ui.wait_status(answer, "streaming", timeout=5_000)
    expect(answer.get_by_test_id("message-content")).to_contain_text(f"w{len(words) + 3}")
    page.get_by_test_id("stop").click()
    ui.wait_status(answer, "stopped", timeout=5_000)
    more = ui.content(answer).split()
    assert len(more) > len(words)
    assert more == [f"w{i}" for i in range(1, len(more) + 1)]
    expect(ui.messages()).to_have_count(2)


def test_regenerate_and_switch_branches(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    ui.send("pick a number")
    first = ui.last()
    ui.wait_status(first, "complete")
    first_id = first.get_attribute("data-id")
    expect(first.get_by_test_id("branch-switcher")).to_have_count(0)
    first.get_by_test_id("regenerate").click()
    second = ui.last()
    expect(second).not_to_have_attribute("data-id", first_id)
    ui.wait_status(second, "complete")
    second_id = second.get_attribute("data-id")
    expect(second.get_by_test_id("branch-label")).to_have_text("2 / 2")
    expect(second.get_by_test_id("branch-next")).to_be_disabled()
    expect(ui.messages()).to_have_count(2)
    second.get_by_test_id("branch-prev").click()
    back = ui.last()
    expect(back).to_have_attribute("data-id", first_id)
    expect(back.get_by_test_id("branch-label")).to_have_text("1 / 2")
    expect(back.get_by_test_id("message-content")).to_have_text("You said: pick a number")
    # The choice is saved on the server: it survives a reload.
    page.reload()
    expect(ui.last()).to_have_attribute("data-id", first_id)
    ui.last().get_by_test_id("branch-next").click()
    expect(ui.last()).to_have_attribute("data-id", second_id)
    expect(ui.last().get_by_test_id("branch-label")).to_have_text("2 / 2")


def test_edit_user_message_creates_branch(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    ui.send("first question")
    ui.wait_status(ui.last(), "complete")
    ui.send("second question")
    ui.wait_status(ui.last(), "complete")
    expect(ui.messages()).to_have_count(4)

    first_user = ui.messages("user").first
    first_user.hover()
    first_user.get_by_test_id("edit").click()
    editor = first_user.get_by_test_id("edit-input")
    expect(editor).to_have_value("first question")
    editor.fill("first question, edited")
    first_user.get_by_test_id("edit-save").click()

    expect(ui.messages()).to_have_count(2)
    ui.wait_status(ui.last(), "complete")
    expect(ui.last().get_by_test_id("message-content")).to_have_text(
        "You said: first question, edited"
    )
    edited = ui.messages("user").first
    expect(edited.get_by_test_id("message-content")).to_have_text("first question, edited")
    expect(edited.get_by_test_id("branch-label")).to_have_text("2 / 2")

    edited.get_by_test_id("branch-prev").click()
    expect(ui.messages()).to_have_count(4)
    texts = [t.strip() for t in ui.messages().get_by_test_id("message-content").all_text_contents()]
    assert texts == [
        "first question",
        "You said: first question",
        "second question",
        "You said: second question",
    ]
    expect(ui.messages("user").first.get_by_test_id("branch-label")).to_have_text("1 / 2")
    # Cancelling an edit leaves the message as it was.
    user = ui.messages("user").nth(1)
    user.hover()
    user.get_by_test_id("edit").click()
    user.get_by_test_id("edit-input").fill("never sent")
    user.get_by_test_id("edit-cancel").click()
    expect(user.get_by_test_id("message-content")).to_have_text("second question")
    expect(ui.messages()).to_have_count(4)


def test_refresh_mid_stream_finishes_exactly_once(admin_page: Any, chat_ui: Any, api: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    ui.pick_model("fake:slow")
    ui.send("a long answer please")
    expect(ui.last().get_by_test_id("message-content")).to_contain_text("w8")
    conv_id = ui.conversation_id()

    page.reload()
    answer = ui.last()
    expect(answer).to_have_attribute("data-status", "streaming")
    # Sample the text while it streams: every sample must be w1 … wk, growing.
    samples: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = page.evaluate(
            """() => {
                const all = document.querySelectorAll('[data-testid=message][data-role=assistant]');
                const el = all[all.length - 1];
                return [el.dataset.status,
                        el.querySelector('[data-testid=message-content]').textContent.trim()];
            }"""
        )
        samples.append(snap[1])
        if snap[0] != "streaming":
            break
        page.wait_for_timeout(50)
    ui.wait_status(answer, "complete", timeout=5_000)
    final = ui.content(answer).split()
    count = len(final)
    assert count >= 100, f"expected a long answer, got {count} words"
    assert final == [f"w{i}" for i in range(1, count + 1)]
    lengths = []
    for sample in samples:
        words = sample.split()
        assert words == [f"w{i}" for i in range(1, len(words) + 1)], sample[:200]
        lengths.append(len(words))
    assert lengths == sorted(lengths), "the streamed text must only grow"
    assert len(set(lengths)) > 3, "the answer should have been seen streaming after the reload"

    # The server agrees with what is shown.
    status, page_data = api(page, "GET", f"/api/conversations/{conv_id}/messages")
    assert status == 200
    assert page_data["data"][-1]["content"] == " ".join(final)
    assert page_data["data"][-1]["status"] == "complete"


def test_backend_down_shows_error(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    ui.pick_model("fake:down")
    ui.send("anyone there?")
    answer = ui.last()
    ui.wait_status(answer, "error", timeout=10_000)
    error = answer.get_by_test_id("message-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(re.compile("unreachable|unavailable|down", re.I))
    expect(answer.get_by_test_id("regenerate")).to_be_visible()
    expect(page.get_by_test_id("send")).to_be_visible()


def test_backend_failing_mid_stream_keeps_partial_text(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    ui.pick_model("fake:fail")
    ui.send("tell me more")
    answer = ui.last()
    ui.wait_status(answer, "error", timeout=10_000)
    expect(answer.get_by_test_id("message-error")).to_be_visible()
    expect(answer.get_by_test_id("message-content")).to_contain_text("You said: tell")
    expect(answer.get_by_test_id("continue")).to_be_visible()


def test_a_model_caught_in_a_loop_is_stopped_with_the_reason(admin_page: Any, chat_ui: Any) -> None:
    ui = chat_ui(admin_page)
    ui.pick_model("fake:loop")
    ui.send("tell me a story")
    answer = ui.last()
    ui.wait_status(answer, "stopped", timeout=10_000)
    status = answer.get_by_test_id("message-status")
    expect(status).to_contain_text("kept repeating itself")
    expect(answer.get_by_test_id("message-content")).to_contain_text(
        "All work and no play makes Jack a dull boy."
    )
    expect(answer.get_by_test_id("regenerate")).to_be_visible()
    # the reason is stored with the answer: still there after a reload
    admin_page.reload()
    answer = ui.last()
    ui.wait_status(answer, "stopped")
    expect(answer.get_by_test_id("message-status")).to_contain_text("kept repeating itself")


def test_server_unreachable_shows_clear_error(admin_page: Any) -> None:
    """The server goes away after the page loaded: a readable error, and no hang."""
    page = admin_page
    page.route("**/api/**", lambda route: route.abort("connectionrefused"))
    page.get_by_test_id("composer").fill("hello?")
    page.get_by_test_id("composer").press("Enter")
    toast = page.get_by_test_id("toast").last
    expect(toast).to_contain_text("Cannot reach the server", timeout=5_000)
    expect(page.get_by_test_id("send-error")).to_contain_text("Cannot reach the server")
    # The text is given back to retry later.
    expect(page.get_by_test_id("composer")).to_have_value("hello?")
    page.unroute("**/api/**")
    page.reload()
    expect(page.get_by_test_id("composer")).to_be_visible()


def test_models_picker_saves_on_conversation(admin_page: Any, chat_ui: Any, api: Any) -> None:
    ui = chat_ui(admin_page)
    page = admin_page
    picker = page.get_by_test_id("model-picker")
    expect(picker).to_be_visible()
    expect(picker).to_have_value("fake:echo")
    ui.send("first")
    ui.wait_status(ui.last(), "complete")
    conv_id = ui.conversation_id()
    ui.pick_model("fake:markdown")
    for _ in range(50):
        _, conv = api(page, "GET", f"/api/conversations/{conv_id}")
        if conv.get("model") == "fake:markdown":
            break
        page.wait_for_timeout(100)
    assert conv["model"] == "fake:markdown"
    ui.send("second")
    ui.wait_status(ui.last(), "complete")
    expect(ui.last().locator("h2")).to_have_text("Result")
    page.reload()
    expect(page.get_by_test_id("model-picker")).to_have_value("fake:markdown")


def test_server_down_at_start_shows_error_and_retry(new_context: Any, admin_account: Any) -> None:
    page = new_context(storage_state=admin_account.storage_state).new_page()
    page.route("**/api/**", lambda route: route.abort("connectionrefused"))
    page.goto("/")
    expect(page.get_by_test_id("boot-text")).to_contain_text("Cannot reach the server")
    expect(page.get_by_test_id("retry")).to_be_visible()
    page.unroute("**/api/**")
    page.get_by_test_id("retry").click()
    expect(page.get_by_test_id("composer")).to_be_visible()
    expect(page.get_by_test_id("boot")).to_be_hidden()
