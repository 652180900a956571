"""Memory on a real database (SQLite, and PostgreSQL when reachable): saving, superseding,
deleting and restoring, retrieval kept consistent across processes, and isolation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from salon.backends.embeddings import HashingEmbedder
from salon.domain import MessageStatus
from salon.errors import Conflict, NotFound
from salon.personalization.extract import Candidate
from salon.personalization.memory import MemoryService
from salon.store.accounts import AccountStore, UserRecord
from salon.store.conversations import ConversationRecord, ConversationStore, NewMessage
from salon.store.memories import CURRENT, DELETED, SUPERSEDED, MemoryStore

START = datetime(2026, 3, 1, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


async def _user(engine: AsyncEngine, name: str) -> str:
    record = UserRecord(name + "-id", name, "hash", "user", START)
    return (await AccountStore(engine).create_user(record, first_is_admin=False)).id


async def _messages(engine: AsyncEngine, user_id: str, cid: str, *texts: str) -> list[int]:
    """User messages in a real conversation (memories point at the message they came from)."""
    store = ConversationStore(engine)
    await store.create(ConversationRecord(cid, user_id, "t", None, None, START, START))
    chain = [NewMessage("user", text, MessageStatus.COMPLETE) for text in texts]
    return [m.id for m in await store.append(user_id, cid, None, chain, START)]


def _service(engine: AsyncEngine, clock: Clock) -> MemoryService:
    return MemoryService(
        MemoryStore(engine), HashingEmbedder, clock, undo_window=timedelta(hours=1)
    )


def _fact(text: str, subject: str | None = None, kind: str = "fact") -> Candidate:
    return Candidate(kind, text, subject, False, "en")  # type: ignore[arg-type]


async def test_a_changed_fact_supersedes_the_old_one(engine: AsyncEngine) -> None:
    clock = Clock()
    memory = _service(engine, clock)
    ann = await _user(engine, "ann")
    (saved,) = await memory.save(ann, [_fact("Lives in Lyon", "home_city")])
    clock.advance(days=30)
    (moved,) = await memory.save(ann, [_fact("Lives in Oslo", "home_city")])

    assert moved.action == "updated"
    assert moved.previous is not None and moved.previous.id == saved.memory.id
    current = await memory.list_memories(ann)
    assert [m.text for m in current] == ["Lives in Oslo"]
    everything = await memory.list_memories(ann, history=True)
    assert {(m.text, m.status) for m in everything} == {
        ("Lives in Oslo", CURRENT),
        ("Lives in Lyon", SUPERSEDED),
    }
    chain = await memory.store.history(ann, moved.memory.id)
    assert [m.text for m in chain] == ["Lives in Oslo", "Lives in Lyon"]
    # Only the current fact is searchable: the old city never comes back as current.
    found = await memory.search(ann, "Which city do I live in? Lyon or Oslo", 5)
    assert [f.text for f in found if f.kind == "memory"] == ["Lives in Oslo"]


async def test_an_edit_is_a_new_version(engine: AsyncEngine) -> None:
    memory = _service(engine, Clock())
    ann = await _user(engine, "ann")
    (saved,) = await memory.save(ann, [_fact("Likes tea", kind="preference")])
    edited = await memory.edit(ann, saved.memory.id, "Likes green tea")
    assert edited.supersedes_id == saved.memory.id
    assert (await memory.store.get(ann, saved.memory.id)).status == SUPERSEDED
    with pytest.raises(Conflict):
        await memory.edit(ann, saved.memory.id, "Likes coffee")  # not the current version


async def test_a_deleted_memory_never_returns_and_is_erased_after_the_undo_window(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    memory = _service(engine, clock)
    ann = await _user(engine, "ann")
    (saved,) = await memory.save(ann, [_fact("Allergic to peanuts", "allergy:peanuts")])
    assert await memory.search(ann, "peanuts allergy", 5)

    await memory.delete(ann, saved.memory.id)
    assert await memory.list_memories(ann, history=True) == []
    assert [f for f in await memory.search(ann, "peanuts allergy", 5) if f.kind == "memory"] == []
    remembered, _ = await memory.recall(
        ann, "what am I allergic to", use_memories=True, use_history=True, exclude_conversation=None
    )
    assert remembered == []

    restored = await memory.restore(ann, saved.memory.id)
    assert restored.status == CURRENT
    assert [f.text for f in await memory.search(ann, "peanuts allergy", 5)] == [
        "Allergic to peanuts"
    ]

    await memory.delete(ann, saved.memory.id)
    clock.advance(hours=2)
    assert await memory.purge() == 1
    with pytest.raises(NotFound):
        await memory.store.get(ann, saved.memory.id)


async def test_undoing_a_save_brings_back_what_it_replaced(engine: AsyncEngine) -> None:
    memory = _service(engine, Clock())
    ann = await _user(engine, "ann")
    (first,) = await memory.save(ann, [_fact("Works as a nurse", "job")])
    (second,) = await memory.save(ann, [_fact("Works as a pilot", "job")])
    previous = await memory.undo(ann, second.memory.id)
    assert previous is not None and previous.id == first.memory.id
    assert [m.text for m in await memory.list_memories(ann)] == ["Works as a nurse"]
    assert [f.text for f in await memory.search(ann, "what is my job", 5)] == ["Works as a nurse"]


async def test_explicit_requests_and_duplicates(engine: AsyncEngine) -> None:
    memory = _service(engine, Clock())
    ann = await _user(engine, "ann")
    said = ["Remember that I am vegetarian"] * 2 + ["Forget that I am vegetarian"]
    first, second, third = await _messages(engine, ann, "c1", *said)
    changes = await memory.act_on(ann, "c1", first, said[0], use_rules=False)
    assert len(changes) == 1 and "vegetarian" in changes[0].memory.text.lower()
    assert changes[0].memory.source_message_id == first
    again = await memory.act_on(ann, "c1", second, said[1], use_rules=False)
    assert again == []  # the same fact is not stored twice
    forgotten = await memory.act_on(ann, "c1", third, said[2], use_rules=False)
    assert [c.action for c in forgotten] == ["forgotten"]
    assert await memory.list_memories(ann) == []


async def test_another_process_sees_every_change(engine: AsyncEngine) -> None:
    """Two services on one database (two workers): each index catches up by revision."""
    clock = Clock()
    writer, reader = _service(engine, clock), _service(engine, clock)
    ann = await _user(engine, "ann")
    assert await reader.search(ann, "sister's name", 5) == []
    (saved,) = await writer.save(ann, [_fact("Sister is called Maud", "sister_name")])
    assert [f.text for f in await reader.search(ann, "sister's name", 5)] == [
        "Sister is called Maud"
    ]
    await writer.delete(ann, saved.memory.id)
    assert await reader.search(ann, "sister's name", 5) == []


async def test_past_messages_are_searchable_until_their_conversation_is_deleted(
    engine: AsyncEngine,
) -> None:
    memory = _service(engine, Clock())
    ann = await _user(engine, "ann")
    (recital,) = await _messages(engine, ann, "c1", "My daughter's piano recital is on May 14")
    (sql,) = await _messages(engine, ann, "c2", "Can you help me fix this SQL query?")
    await memory.index_messages(
        ann, [(recital, "c1", "My daughter's piano recital is on May 14", START)]
    )
    await memory.index_messages(ann, [(sql, "c2", "Can you help me fix this SQL query?", START)])
    found = await memory.search(ann, "when is the piano recital", 5)
    assert found[0].message_ids == (recital,)
    _, history = await memory.recall(
        ann,
        "when is the piano recital",
        use_memories=True,
        use_history=True,
        exclude_conversation="c2",
    )
    assert [h.key for h in history][:1] == [f"message:{recital}"]
    await memory.store.unindex_conversation(ann, "c1")
    assert all(f.message_ids != (recital,) for f in await memory.search(ann, "piano recital", 5))


async def test_one_users_memories_never_reach_another(engine: AsyncEngine) -> None:
    memory = _service(engine, Clock())
    ann, bob = await _user(engine, "ann"), await _user(engine, "bob")
    (saved,) = await memory.save(ann, [_fact("Bank PIN hint is the cat's birthday")])
    (cat,) = await _messages(engine, ann, "c1", "My cat Felix was born in 2019")
    await memory.index_messages(ann, [(cat, "c1", "My cat Felix was born in 2019", START)])

    assert await memory.search(bob, "cat birthday PIN hint Felix", 10) == []
    memories, history = await memory.recall(
        bob, "cat birthday PIN", use_memories=True, use_history=True, exclude_conversation=None
    )
    assert memories == [] and history == []
    assert await memory.list_memories(bob, history=True) == []
    for attempt in (
        memory.store.get(bob, saved.memory.id),
        memory.delete(bob, saved.memory.id),
        memory.edit(bob, saved.memory.id, "mine now"),
        memory.undo(bob, saved.memory.id),
    ):
        with pytest.raises(NotFound):
            await attempt
    assert (await memory.store.get(ann, saved.memory.id)).status == CURRENT
    assert DELETED not in {m.status for m in await memory.list_memories(ann, history=True)}


async def test_deleting_an_edited_memory_takes_its_earlier_versions_along(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    memory = _service(engine, clock)
    ann = await _user(engine, "ann")
    (saved,) = await memory.save(ann, [_fact("I live in Lyon", "home_city")])
    edited = await memory.edit(ann, saved.memory.id, "I live in Lille")
    await memory.delete(ann, edited.id)
    assert await memory.list_memories(ann, history=True) == []
    assert await memory.search(ann, "Lyon Lille where I live", 5) == []

    restored = await memory.restore(ann, edited.id)
    assert restored.status == CURRENT
    versions = {(m.text, m.status) for m in await memory.list_memories(ann, history=True)}
    assert versions == {("I live in Lille", CURRENT), ("I live in Lyon", SUPERSEDED)}

    await memory.delete(ann, edited.id)
    clock.advance(hours=2)
    assert await memory.purge() == 2  # both versions erased for good
    assert await memory.list_memories(ann, history=True) == []


async def test_a_forget_request_is_recorded_on_the_message_that_asked(
    engine: AsyncEngine,
) -> None:
    memory = _service(engine, Clock())
    ann = await _user(engine, "ann")
    said = ["Remember that my gate code is 4417", "Forget that my gate code is 4417"]
    remember, forget = await _messages(engine, ann, "c1", *said)
    await memory.act_on(ann, "c1", remember, said[0], use_rules=False)
    (change,) = await memory.act_on(ann, "c1", forget, said[1], use_rules=False)
    assert change.action == "forgotten"
    (record,) = await memory.store.from_messages(ann, [forget])
    assert record.status == DELETED and record.forgotten_by == forget
    assert await memory.store.from_messages(ann, [remember]) == []
    await memory.index_messages(ann, [(forget, "c1", said[1], START)])
    assert await memory.search(ann, "gate code", 5) == []  # neither the memory nor its words


async def test_search_counts_a_memory_and_its_source_message_once(engine: AsyncEngine) -> None:
    """A memory says what the message it came from said: one slot for both, so the k results
    hold k different things."""
    memory = _service(engine, Clock())
    ann = await _user(engine, "ann")
    said = "Remember that my cat is called Pistache"
    other = "My cat Pistache climbs on the kitchen counter"
    first, second = await _messages(engine, ann, "c1", said, other)
    await memory.index_messages(ann, [(first, "c1", said, START), (second, "c1", other, START)])
    assert len(await memory.act_on(ann, "c1", first, said, use_rules=False)) == 1  # saved
    found = await memory.search(ann, "cat Pistache", 5)
    assert [f.message_ids for f in found].count((first,)) == 1
    assert {f.message_ids for f in found} == {(first,), (second,)}
    assert len(found) == 2


async def test_warm_up_builds_the_embedder_but_embeds_nothing(engine: AsyncEngine) -> None:
    """Start-up checks that the embedder can be built (a broken model shows at once) but
    leaves its weights for the first use (an idle server does not carry them)."""
    built: list[SpyEmbedder] = []

    class SpyEmbedder(HashingEmbedder):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0
            built.append(self)

        def embed(self, texts: Sequence[str]) -> np.ndarray:
            self.calls += 1
            return super().embed(texts)

    memory = MemoryService(MemoryStore(engine), SpyEmbedder, Clock())
    await memory.warm_up()
    await memory.warm_up()
    assert len(built) == 1 and built[0].calls == 0
    ann = await _user(engine, "ann")
    await memory.search(ann, "anything", 3)
    assert len(built) == 1 and built[0].calls == 1
