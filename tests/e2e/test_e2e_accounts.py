"""Accounts in a real browser: a second user sees nothing of the first, sign in/out,
API keys, the admin's sign-up switch."""

from __future__ import annotations

import json
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e

OTHER_PASSWORD = "another-good-password"


def _wait_done(page: Any, api: Any, conv_id: str) -> list[dict[str, Any]]:
    for _ in range(100):
        status, data = api(page, "GET", f"/api/conversations/{conv_id}/messages")
        assert status == 200
        if all(m["status"] != "streaming" for m in data["data"]):
            return list(data["data"])
        page.wait_for_timeout(100)
    raise AssertionError("the generation did not finish")


def _sign_up(page: Any, username: str) -> None:
    page.goto("/")
    expect(page.get_by_test_id("auth-title")).to_have_text("Sign in to Salon")
    page.get_by_test_id("auth-switch").click()
    expect(page.get_by_test_id("auth-title")).to_have_text("Create your account")
    page.get_by_test_id("auth-username").fill(username)
    page.get_by_test_id("auth-password").fill(OTHER_PASSWORD)
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("user-name")).to_have_text(username)


def test_second_user_sees_nothing_of_the_first(
    admin_page: Any, new_context: Any, api: Any, chat_ui: Any
) -> None:
    alice = admin_page
    status, conv = api(alice, "POST", "/api/conversations", {"title": "alice secret plans"})
    assert status == 201
    cid = conv["id"]
    status, turn = api(
        alice,
        "POST",
        f"/api/conversations/{cid}/messages",
        {"content": "the treasure is under the oak"},
    )
    assert status == 201
    messages = _wait_done(alice, api, cid)
    user_mid = turn["user_message"]["id"]
    mid = turn["assistant_message"]["id"]

    bob = new_context().new_page()
    _sign_up(bob, "bob")
    ui = chat_ui(bob)
    expect(bob.get_by_test_id("conversation-list-status")).to_have_text("No conversations yet.")
    expect(bob.get_by_test_id("conversation-item")).to_have_count(0)
    bob.get_by_test_id("search").fill("treasure")
    expect(bob.get_by_test_id("conversation-list-status")).to_have_text("No conversations match.")
    # Opening alice's conversation by URL shows nothing of it.
    bob.goto(f"/c/{cid}")
    expect(bob.get_by_test_id("toast").last).to_contain_text("does not exist")
    expect(bob.get_by_test_id("empty-state")).to_be_visible()
    expect(ui.messages()).to_have_count(0)
    expect(bob.locator("body")).not_to_contain_text("treasure")

    # Every route with alice's ids answers 404 to bob.
    status, own = api(bob, "POST", "/api/conversations", {})
    assert status == 201
    checks = [
        ("GET", f"/api/conversations/{cid}", None),
        ("PATCH", f"/api/conversations/{cid}", {"title": "mine now"}),
        ("GET", f"/api/conversations/{cid}/messages", None),
        ("GET", f"/api/conversations/{cid}/messages?before={mid}", None),
        ("POST", f"/api/conversations/{cid}/messages", {"content": "hi"}),
        ("POST", f"/api/conversations/{cid}/branch", {"message_id": mid}),
        ("GET", f"/api/messages/{mid}/stream", None),
        ("POST", f"/api/messages/{mid}/stop", None),
        ("POST", f"/api/messages/{mid}/regenerate", None),
        ("POST", f"/api/messages/{mid}/continue", None),
        ("POST", f"/api/messages/{user_mid}/regenerate", None),
        # alice's message id inside bob's own conversation
        ("POST", f"/api/conversations/{own['id']}/branch", {"message_id": mid}),
        ("DELETE", f"/api/conversations/{cid}", None),
    ]
    failures = []
    for method, path, body in checks:
        status, data = api(bob, method, path, body)
        if status != 404:
            failures.append(f"{method} {path} -> {status} {json.dumps(data)[:200]}")
        elif not (isinstance(data, dict) and "message" in data.get("error", {})):
            failures.append(f"{method} {path} -> 404 without the error shape: {data!r}")
    assert not failures, "\n".join(failures)

    # alice's message as the parent in bob's own conversation: refused exactly as an id
    # that does not exist is (no way to probe for other users' ids).
    path = f"/api/conversations/{own['id']}/messages"
    foreign = api(bob, "POST", path, {"content": "hi", "parent_id": mid})
    missing = api(bob, "POST", path, {"content": "hi", "parent_id": 10**9})
    assert foreign[0] in (400, 404)
    assert foreign == missing

    # Nothing of alice's changed.
    status, still = api(alice, "GET", f"/api/conversations/{cid}")
    assert status == 200
    assert still["title"] == "alice secret plans"
    assert _wait_done(alice, api, cid) == messages


def test_sign_out_and_sign_in(new_context: Any, admin_account: Any) -> None:
    page = new_context().new_page()
    page.goto("/")
    expect(page.get_by_test_id("auth-title")).to_have_text("Sign in to Salon")
    page.get_by_test_id("auth-username").fill(admin_account.username)
    page.get_by_test_id("auth-password").fill("wrong password!")
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("auth-error")).to_have_text("Wrong username or password.")
    page.get_by_test_id("auth-password").fill(admin_account.password)
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("user-name")).to_have_text(admin_account.username)
    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("auth-form")).to_be_visible()
    page.reload()
    expect(page.get_by_test_id("auth-form")).to_be_visible()


def test_api_keys(admin_page: Any, server: Any) -> None:
    page = admin_page
    page.get_by_test_id("open-settings").click()
    page.get_by_test_id("key-name").fill("e2e laptop")
    page.get_by_test_id("key-create").click()
    expect(page.get_by_test_id("key-created")).to_be_visible()
    key = page.get_by_test_id("key-value").inner_text()
    assert key.startswith("sk-salon-")
    item = page.get_by_test_id("key-item").filter(has_text="e2e laptop")
    expect(item).to_have_count(1)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_test_id("key-copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == key

    bearer = {"Authorization": f"Bearer {key}"}
    response = page.request.get(f"{server.base_url}/v1/models", headers=bearer)
    assert response.status == 200, response.text()

    # Shown once: reopening the dialog does not show it again.
    page.get_by_test_id("settings-close").click()
    page.get_by_test_id("open-settings").click()
    expect(page.get_by_test_id("key-created")).to_be_hidden()
    item = page.get_by_test_id("key-item").filter(has_text="e2e laptop")
    expect(item).to_contain_text(key[:12])
    item.get_by_test_id("key-delete").click()
    expect(item).to_have_count(0)
    response = page.request.get(f"{server.base_url}/v1/models", headers=bearer)
    assert response.status == 401


def test_admin_closes_and_opens_sign_up(admin_page: Any, new_context: Any, api: Any) -> None:
    page = admin_page
    page.get_by_test_id("open-settings").click()
    toggle = page.get_by_test_id("signup-toggle")
    expect(toggle).to_be_checked()
    try:
        toggle.click()
        expect(toggle).not_to_be_checked()
        expect(toggle).to_be_enabled()
        _, state = api(page, "GET", "/api/auth/state")
        assert state == {"has_users": True, "signup_open": False}

        visitor = new_context().new_page()
        visitor.goto("/")
        expect(visitor.get_by_test_id("auth-title")).to_have_text("Sign in to Salon")
        expect(visitor.get_by_test_id("auth-switch")).to_be_hidden()

        toggle.click()
        expect(toggle).to_be_checked()
        expect(toggle).to_be_enabled()
        visitor.reload()
        expect(visitor.get_by_test_id("auth-switch")).to_have_text("Sign up")
    finally:
        api(page, "PATCH", "/api/admin/settings", {"signup_open": True})


def test_non_admin_has_no_admin_section(new_context: Any, admin_account: Any) -> None:
    assert admin_account.username  # carol is not the first account
    page = new_context().new_page()
    _sign_up(page, "carol")
    page.get_by_test_id("open-settings").click()
    expect(page.get_by_test_id("settings-role")).to_have_text("user")
    expect(page.get_by_test_id("admin-section")).to_be_hidden()
    expect(page.get_by_test_id("key-empty")).to_be_visible()
