"""Several salon nodes on one database: each running generation has one writer, a stop
through another node ends it, a dead node's generations are kept and marked incomplete.
On SQLite and PostgreSQL, with real stores and a real JobRunner."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from salon.backends.registry import BackendRegistry
from salon.chat.jobs import JobRunner
from salon.domain import ChatMessage, CompletionRequest, MessageStatus
from salon.settings import Settings
from salon.store.accounts import AccountStore, UserRecord
from salon.store.conversations import (
    Checkpoint,
    ConversationRecord,
    ConversationStore,
    NewMessage,
)
from salon.store.nodes import NodeStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TTL = timedelta(seconds=30)


async def _streaming(store: ConversationStore, engine: AsyncEngine, user: str = "ann") -> int:
    """A conversation of `user` with one running answer, started by `store`'s node."""
    await AccountStore(engine).create_user(
        UserRecord(user + "-id", user, "hash", "user", NOW), first_is_admin=False
    )
    await store.create(ConversationRecord("c-" + user, user + "-id", "t", None, None, NOW, NOW))
    created = await store.append(
        user + "-id",
        "c-" + user,
        None,
        [
            NewMessage("user", "hello", MessageStatus.COMPLETE),
            NewMessage("assistant", "", MessageStatus.STREAMING, "fake:slow"),
        ],
        NOW,
    )
    return created[1].id


async def test_only_the_running_node_writes_and_a_settled_row_stays_settled(
    engine: AsyncEngine,
) -> None:
    a, b = ConversationStore(engine, node="a"), ConversationStore(engine, node="b")
    message = await _streaming(a, engine)

    assert await b.update_content(message, "not mine", NOW) is Checkpoint.SETTLED
    assert await a.update_content(message, "Hel", NOW) is Checkpoint.WRITTEN

    # The user stops it through node b: b settles the row, keeping a's last checkpoint.
    assert await b.settle(message, MessageStatus.STOPPED, NOW)
    assert not await b.settle(message, MessageStatus.STOPPED, NOW)  # once only
    assert await a.update_content(message, "Hello", NOW) is Checkpoint.SETTLED

    # a's final write adds its text but keeps the status that b set.
    assert not await a.finish(
        message, content="Hello there", status=MessageStatus.COMPLETE, error=None,
        usage=None, now=NOW,
    )  # fmt: skip
    record = await a.message("ann-id", message)
    assert (record.content, record.status) == ("Hello there", MessageStatus.STOPPED)
    assert await a.status(message) is MessageStatus.STOPPED


async def test_start_up_marks_only_this_nodes_generations(engine: AsyncEngine) -> None:
    a, b = ConversationStore(engine, node="a"), ConversationStore(engine, node="b")
    mine = await _streaming(a, engine, "ann")
    theirs = await _streaming(b, engine, "bob")

    assert await a.mark_interrupted() == 1  # node a restarted
    assert await a.status(mine) is MessageStatus.INCOMPLETE
    assert await a.status(theirs) is MessageStatus.STREAMING


async def test_the_sweep_takes_over_a_silent_nodes_generations(engine: AsyncEngine) -> None:
    a, b = ConversationStore(engine, node="a"), ConversationStore(engine, node="b")
    alive = await _streaming(a, engine, "ann")
    dead = await _streaming(b, engine, "bob")
    node_a, node_b = NodeStore(engine, "a"), NodeStore(engine, "b")
    await node_a.beat(NOW)
    await node_b.beat(NOW)

    # Both beat recently: nothing to sweep.
    assert await node_a.sweep(NOW + timedelta(seconds=10), TTL) == 0
    # b falls silent; a keeps beating.
    later = NOW + timedelta(seconds=40)
    await node_a.beat(later)
    assert await node_a.sweep(later, TTL) == 1
    assert await a.status(dead) is MessageStatus.INCOMPLETE
    assert await a.status(alive) is MessageStatus.STREAMING
    # b was only slow: its next checkpoint learns the row is no longer its own.
    assert await b.update_content(dead, "late", later) is Checkpoint.SETTLED
    # A node that never beat at all is silent too.
    ghost = await _streaming(ConversationStore(engine, node="ghost"), engine, "cy")
    assert await node_a.sweep(later, TTL) == 1
    assert await a.status(ghost) is MessageStatus.INCOMPLETE


async def test_a_running_job_stops_when_another_node_stops_its_message(
    engine: AsyncEngine,
) -> None:
    """The owner's JobRunner generates with `fake:slow` (400 words, one every few ms);
    node b settles the row; the job ends within a checkpoint, and its row keeps the status
    b set and all the text the job had."""
    a, b = ConversationStore(engine, node="a"), ConversationStore(engine, node="b")
    message = await _streaming(a, engine)
    registry = BackendRegistry(Settings(models=["fake:slow"]))
    runner = JobRunner(a, flush_interval_s=0.05, clock=lambda: datetime.now(UTC))
    route = registry.resolve("fake:slow")
    request = CompletionRequest(route.name, [ChatMessage("user", "count")])
    job = runner.start(message, "c-ann", route, request)
    try:
        async with asyncio.timeout(10):
            while (await a.message("ann-id", message)).content == "":
                await asyncio.sleep(0.02)
        assert await b.settle(message, MessageStatus.STOPPED, datetime.now(UTC))
        async with asyncio.timeout(5):
            ended = [event async for event in job.follow(0)][-1]
    finally:
        await runner.shutdown()
        await registry.close()
    assert ended.status is MessageStatus.STOPPED  # type: ignore[union-attr]
    record = await a.message("ann-id", message)
    assert record.status is MessageStatus.STOPPED
    assert record.content == job.text() and record.content
    assert not record.content.endswith("w400")  # it did stop early
