"""The conversation store on a real database (SQLite, and PostgreSQL when reachable)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from salon.domain import MessageStatus, Usage
from salon.errors import Conflict, NotFound
from salon.store.accounts import AccountStore, UserRecord
from salon.store.conversations import ConversationRecord, ConversationStore, NewMessage

NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def _user(engine: AsyncEngine, name: str) -> UserRecord:
    record = UserRecord(name + "-id", name, "hash", "user", NOW)
    return await AccountStore(engine).create_user(record, first_is_admin=False)


async def _conversation(store: ConversationStore, user_id: str, cid: str) -> ConversationRecord:
    return await store.create(ConversationRecord(cid, user_id, "t", None, None, NOW, NOW))


def _turn(text: str) -> list[NewMessage]:
    return [
        NewMessage("user", text, MessageStatus.COMPLETE),
        NewMessage("assistant", "re: " + text, MessageStatus.COMPLETE, "fake:echo"),
    ]


async def test_branches_paging_and_siblings(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    user = await _user(engine, "ann")
    await _conversation(store, user.id, "c1")
    first = await store.append(user.id, "c1", None, _turn("one"), NOW)
    second = await store.append(user.id, "c1", first[1].id, _turn("two"), NOW)
    # An edit of the second question: a sibling branch under the first answer.
    edited = await store.append(user.id, "c1", first[1].id, _turn("two, edited"), NOW)

    page, more = await store.path(user.id, "c1", edited[1].id, 10)
    assert [m.content for m in page] == ["one", "re: one", "two, edited", "re: two, edited"]
    assert not more
    assert page[2].siblings == (second[0].id, edited[0].id)

    page, more = await store.path(user.id, "c1", second[1].id, 2)
    assert [m.content for m in page] == ["two", "re: two"]
    assert more

    leaf = await store.newest_leaf_under(user.id, second[0].id)
    assert leaf.id == second[1].id
    conversation = await store.get(user.id, "c1")
    assert conversation.current_leaf_id == edited[1].id


async def test_every_read_and_write_is_scoped_to_the_owner(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    ann, bob = await _user(engine, "ann"), await _user(engine, "bob")
    await _conversation(store, ann.id, "c1")
    (_question, answer) = await store.append(ann.id, "c1", None, _turn("secret"), NOW)
    with pytest.raises(NotFound):
        await store.get(bob.id, "c1")
    with pytest.raises(NotFound):
        await store.message(bob.id, answer.id)
    with pytest.raises(NotFound):
        await store.append(bob.id, "c1", answer.id, _turn("x"), NOW)
    with pytest.raises(NotFound):
        await store.update(bob.id, "c1", {"title": "mine"})
    with pytest.raises(NotFound):
        await store.delete(bob.id, "c1")
    assert await store.path(bob.id, "c1", answer.id, 10) == ([], False)
    assert await store.search(bob.id, query="secret", limit=10, before=None) == []
    assert [c.id for c in await store.search(ann.id, query="secret", limit=10, before=None)] == [
        "c1"
    ]


async def test_search_matches_title_and_content_newest_first(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    user = await _user(engine, "ann")
    for index in range(5):
        cid = f"c{index}"
        when = NOW + timedelta(minutes=index)
        await store.create(
            ConversationRecord(cid, user.id, f"title {index}", None, None, when, when)
        )
    await store.append(
        user.id, "c1", None, _turn("about 100% pure_sugar"), NOW + timedelta(hours=1)
    )
    found = await store.search(user.id, query="100% pure_", limit=10, before=None)
    assert [c.id for c in found] == ["c1"]
    everything = await store.search(user.id, query=None, limit=2, before=None)
    assert [c.id for c in everything] == ["c1", "c4"]
    older = await store.search(
        user.id, query=None, limit=10, before=(everything[-1].updated_at, everything[-1].id)
    )
    assert [c.id for c in older] == ["c3", "c2", "c0"]


async def test_interrupted_generations_are_kept_and_marked(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    user = await _user(engine, "ann")
    await _conversation(store, user.id, "c1")
    _, answer = await store.append(
        user.id,
        "c1",
        None,
        [
            NewMessage("user", "q", MessageStatus.COMPLETE),
            NewMessage("assistant", "", MessageStatus.STREAMING, "fake:slow"),
        ],
        NOW,
    )
    await store.update_content(answer.id, "partial text", NOW)
    assert await store.mark_interrupted() == 1
    kept = await store.message(user.id, answer.id)
    assert kept.status == MessageStatus.INCOMPLETE
    assert kept.content == "partial text"
    await store.restart(answer.id, NOW)  # continued
    await store.finish(
        answer.id,
        content="partial text, done",
        status=MessageStatus.COMPLETE,
        error=None,
        usage=Usage(3, 4),
        now=NOW,
    )
    done = await store.message(user.id, answer.id)
    assert (done.status, done.usage) == (MessageStatus.COMPLETE, Usage(3, 4))


async def test_deleting_a_conversation_removes_its_messages(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    user = await _user(engine, "ann")
    await _conversation(store, user.id, "c1")
    (_, answer) = await store.append(user.id, "c1", None, _turn("q"), NOW)
    await store.delete(user.id, "c1")
    with pytest.raises(NotFound):
        await store.message(user.id, answer.id)


async def test_usernames_are_unique_and_the_first_user_is_admin(engine: AsyncEngine) -> None:
    accounts = AccountStore(engine)
    first = await accounts.create_user(
        UserRecord("1", "ann", "h", "user", NOW), first_is_admin=True
    )
    second = await accounts.create_user(
        UserRecord("2", "bob", "h", "user", NOW), first_is_admin=True
    )
    assert (first.role, second.role) == ("admin", "user")
    with pytest.raises(Conflict):
        await accounts.create_user(UserRecord("3", "ann", "h", "user", NOW), first_is_admin=False)


async def test_concurrent_first_sign_ups_make_exactly_one_admin(engine: AsyncEngine) -> None:
    import asyncio

    store = AccountStore(engine)
    records = [UserRecord(f"id{i}", f"user{i}", "hash", "user", NOW) for i in range(12)]
    created = await asyncio.gather(
        *(store.create_user(r, first_is_admin=True) for r in records), return_exceptions=True
    )
    users_made = [u for u in created if isinstance(u, UserRecord)]
    assert len(users_made) == 12, [c for c in created if not isinstance(c, UserRecord)]
    assert [u.role for u in users_made].count("admin") == 1
