"""Conversations and their message trees, always scoped to an owner."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from salon.domain import MessageStatus, Usage
from salon.errors import NotFound
from salon.store.db import DATABASE_ERRORS, database_unavailable, while_unavailable
from salon.store.tables import conversations, messages

log = logging.getLogger(__name__)

# How long a generation's final state is retried while the database is away (a restart):
# without it the message would stay "streaming" until salon's next start.
FINISH_RETRY_S = 15.0


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    id: str
    user_id: str
    title: str
    model: str | None
    current_leaf_id: int | None
    created_at: datetime
    updated_at: datetime
    # Personalization overrides for this conversation (a ProfilePatch as a dict).
    settings: dict[str, Any] | None = None
    temporary: bool = False


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: int
    conversation_id: str
    user_id: str
    parent_id: int | None
    role: str
    content: str
    status: MessageStatus
    error: str | None
    model: str | None
    usage: Usage | None
    created_at: datetime
    siblings: tuple[int, ...] = field(default=())
    # What the safety layer did to this answer (blocked, recovered...), None if nothing.
    safety: dict[str, Any] | None = None
    # What personalization enforcement checked and repaired, None if nothing was active.
    personalization: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    role: str
    content: str
    status: MessageStatus
    model: str | None = None
    safety: dict[str, Any] | None = None


def _conversation(row: sa.Row[Any]) -> ConversationRecord:
    return ConversationRecord(
        row.id,
        row.user_id,
        row.title,
        row.model,
        row.current_leaf_id,
        utc(row.created_at),
        utc(row.updated_at),
        row.settings,
        bool(row.temporary),
    )


def _message(row: sa.Row[Any], siblings: tuple[int, ...] = ()) -> MessageRecord:
    usage = None
    if row.prompt_tokens is not None or row.completion_tokens is not None:
        usage = Usage(row.prompt_tokens or 0, row.completion_tokens or 0)
    return MessageRecord(
        row.id,
        row.conversation_id,
        row.user_id,
        row.parent_id,
        row.role,
        row.content,
        MessageStatus(row.status),
        row.error,
        row.model,
        usage,
        utc(row.created_at),
        siblings,
        row.safety,
        row.personalization,
    )


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Checkpoint(enum.Enum):
    """How writing a running generation's text went."""

    WRITTEN = "written"
    # The database is unavailable: the text is still in memory and the next checkpoint (or
    # `finish`) writes all of it, so a database restart does not end the generation.
    SKIPPED = "skipped"
    # The row is no longer this node's running generation: the user stopped it through
    # another node, or this node was taken for dead. The generation should end now.
    SETTLED = "settled"


class ConversationStore:
    def __init__(self, engine: AsyncEngine, node: str = "local") -> None:
        self._engine = engine
        # This process's node name: stamped on the generations it runs (store/nodes.py).
        self.node = node
        self._skipped_logged_at = float("-inf")

    # -- conversations -------------------------------------------------------------------

    async def create(self, record: ConversationRecord) -> ConversationRecord:
        async with self._engine.begin() as conn:
            await conn.execute(
                conversations.insert().values(
                    id=record.id,
                    user_id=record.user_id,
                    title=record.title,
                    model=record.model,
                    current_leaf_id=None,
                    settings=record.settings,
                    temporary=record.temporary,
                    created_at=record.created_at,
                    updated_at=record.updated_at,
                )
            )
        return record

    async def get(self, user_id: str, conversation_id: str) -> ConversationRecord:
        async with self._engine.connect() as conn:
            return await self._get(conn, user_id, conversation_id)

    async def _get(
        self, conn: AsyncConnection, user_id: str, conversation_id: str
    ) -> ConversationRecord:
        row = (
            await conn.execute(
                conversations.select().where(
                    conversations.c.id == conversation_id, conversations.c.user_id == user_id
                )
            )
        ).first()
        if row is None:
            raise NotFound("conversation not found")
        return _conversation(row)

    async def search(
        self,
        user_id: str,
        *,
        query: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[ConversationRecord]:
        c = conversations.c
        # Temporary chats stay out of the history.
        stmt = conversations.select().where(c.user_id == user_id, c.temporary.is_(False))
        if query:
            pattern = _like(query)
            in_content = (
                sa.select(messages.c.id)
                .where(
                    messages.c.conversation_id == c.id,
                    messages.c.content.ilike(pattern, escape="\\"),
                )
                .exists()
            )
            stmt = stmt.where(sa.or_(c.title.ilike(pattern, escape="\\"), in_content))
        if before is not None:
            stmt = stmt.where(sa.tuple_(c.updated_at, c.id) < sa.tuple_(*before))
        stmt = stmt.order_by(c.updated_at.desc(), c.id.desc()).limit(limit)
        async with self._engine.connect() as conn:
            return [_conversation(row) for row in await conn.execute(stmt)]

    async def update(
        self, user_id: str, conversation_id: str, values: dict[str, Any]
    ) -> ConversationRecord:
        async with self._engine.begin() as conn:
            await self._get(conn, user_id, conversation_id)
            if values:
                await conn.execute(
                    conversations.update()
                    .where(conversations.c.id == conversation_id)
                    .values(**values)
                )
            return await self._get(conn, user_id, conversation_id)

    async def delete(self, user_id: str, conversation_id: str) -> None:
        async with self._engine.begin() as conn:
            await self._get(conn, user_id, conversation_id)
            await conn.execute(
                messages.delete().where(messages.c.conversation_id == conversation_id)
            )
            await conn.execute(conversations.delete().where(conversations.c.id == conversation_id))

    # -- messages ------------------------------------------------------------------------

    async def append(
        self,
        user_id: str,
        conversation_id: str,
        parent_id: int | None,
        new: Sequence[NewMessage],
        now: datetime,
        title: str | None = None,
    ) -> list[MessageRecord]:
        """Add a chain of messages under `parent_id` and make its end the active leaf,
        in one transaction."""
        async with self._engine.begin() as conn:
            await self._get(conn, user_id, conversation_id)
            if parent_id is not None:
                await self._message(conn, user_id, parent_id, conversation_id)
            created: list[MessageRecord] = []
            parent = parent_id
            for item in new:
                result = await conn.execute(
                    messages.insert().values(
                        conversation_id=conversation_id,
                        user_id=user_id,
                        parent_id=parent,
                        role=item.role,
                        content=item.content,
                        status=item.status.value,
                        model=item.model,
                        safety=item.safety,
                        node=self.node if item.status == MessageStatus.STREAMING else None,
                        created_at=now,
                        updated_at=now,
                    )
                )
                assert result.inserted_primary_key is not None
                message_id = int(result.inserted_primary_key[0])
                created.append(
                    MessageRecord(
                        message_id,
                        conversation_id,
                        user_id,
                        parent,
                        item.role,
                        item.content,
                        item.status,
                        None,
                        item.model,
                        None,
                        now,
                        safety=item.safety,
                    )
                )
                parent = message_id
            values: dict[str, Any] = {"current_leaf_id": parent, "updated_at": now}
            if title is not None:
                values["title"] = title
            await conn.execute(
                conversations.update().where(conversations.c.id == conversation_id).values(**values)
            )
        return created

    async def message(self, user_id: str, message_id: int) -> MessageRecord:
        async with self._engine.connect() as conn:
            record = await self._message(conn, user_id, message_id)
            siblings = await self._siblings(conn, record.conversation_id, [record.parent_id])
        return _with_siblings(record, siblings)

    async def _message(
        self,
        conn: AsyncConnection,
        user_id: str,
        message_id: int,
        conversation_id: str | None = None,
    ) -> MessageRecord:
        stmt = messages.select().where(messages.c.id == message_id, messages.c.user_id == user_id)
        if conversation_id is not None:
            stmt = stmt.where(messages.c.conversation_id == conversation_id)
        row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound("message not found")
        return _message(row)

    async def path(
        self, user_id: str, conversation_id: str, end_id: int, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        """Up to `limit` messages of the branch ending at `end_id` (inclusive), oldest
        first, and whether older ones exist. Walks parent links in one recursive query,
        so the cost is the page size, not the conversation length."""
        m = messages.c
        seed = sa.select(m.id, m.parent_id, sa.literal(0).label("depth")).where(
            m.id == end_id, m.user_id == user_id, m.conversation_id == conversation_id
        )
        chain = seed.cte("chain", recursive=True)
        step = (
            sa.select(m.id, m.parent_id, (chain.c.depth + 1).label("depth"))
            .join(chain, m.id == chain.c.parent_id)
            .where(chain.c.depth < limit)
        )
        chain = chain.union_all(step)
        stmt = sa.select(messages).join(chain, m.id == chain.c.id).order_by(chain.c.depth.desc())
        async with self._engine.connect() as conn:
            rows = list(await conn.execute(stmt))
            has_more = len(rows) > limit
            if has_more:
                rows = rows[1:]
            records = [_message(row) for row in rows]
            siblings = await self._siblings(conn, conversation_id, [r.parent_id for r in records])
        return [_with_siblings(r, siblings) for r in records], has_more

    async def _siblings(
        self, conn: AsyncConnection, conversation_id: str, parents: Iterable[int | None]
    ) -> dict[int | None, tuple[int, ...]]:
        wanted = set(parents)
        ids = [p for p in wanted if p is not None]
        m = messages.c
        # Two index lookups rather than one `IN (...) OR IS NULL`, which SQLite answers by
        # scanning the whole conversation.
        conditions = []
        if ids:
            conditions.append(m.parent_id.in_(ids))
        if None in wanted:
            conditions.append(m.parent_id.is_(None))
        found: dict[int | None, list[int]] = {}
        for condition in conditions:
            stmt = (
                sa.select(m.id, m.parent_id)
                .where(m.conversation_id == conversation_id, condition)
                .order_by(m.id)
            )
            for row in await conn.execute(stmt):
                found.setdefault(row.parent_id, []).append(row.id)
        return {parent: tuple(children) for parent, children in found.items()}

    async def newest_leaf_under(self, user_id: str, message_id: int) -> MessageRecord:
        """The most recently created message in the subtree of `message_id`. Children are
        always newer than their parent, so it has no children: it is a leaf."""
        m = messages.c
        async with self._engine.connect() as conn:
            top = await self._message(conn, user_id, message_id)
            tree = sa.select(m.id).where(m.id == message_id).cte("tree", recursive=True)
            tree = tree.union_all(sa.select(m.id).join(tree, m.parent_id == tree.c.id))
            newest = await conn.scalar(sa.select(sa.func.max(tree.c.id)))
            row = (await conn.execute(messages.select().where(m.id == newest))).first()
        return _message(row) if row else top

    async def update_content(self, message_id: int, content: str, now: datetime) -> Checkpoint:
        """A checkpoint of a running generation of this node: its whole text so far."""
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(
                    messages.update()
                    .where(self._running_here(message_id))
                    .values(content=content, updated_at=now)
                )
        except DATABASE_ERRORS as exc:
            if not database_unavailable(exc):
                raise
            self._checkpoint_skipped()
            return Checkpoint.SKIPPED
        return Checkpoint.WRITTEN if result.rowcount else Checkpoint.SETTLED

    def _running_here(self, message_id: int) -> sa.ColumnElement[bool]:
        return sa.and_(
            messages.c.id == message_id,
            messages.c.status == MessageStatus.STREAMING.value,
            messages.c.node == self.node,
        )

    def _checkpoint_skipped(self) -> None:
        # Every running generation checkpoints several times a second: one line per 5 s.
        now = time.monotonic()
        if now - self._skipped_logged_at >= 5.0:
            self._skipped_logged_at = now
            log.warning("database unavailable: generation checkpoints are skipped meanwhile")

    async def finish(
        self,
        message_id: int,
        *,
        content: str,
        status: MessageStatus,
        error: str | None,
        usage: Usage | None,
        now: datetime,
        safety: dict[str, Any] | None = None,
        personalization: dict[str, Any] | None = None,
    ) -> bool:
        """The final state of a generation this node runs. False when the row was settled
        elsewhere meanwhile (stopped through another node): then only the text and usage
        are written, and the status that was set there stays."""
        values: dict[str, Any] = {"content": content, "updated_at": now}
        if safety is not None:
            values["safety"] = safety
        if personalization is not None:
            values["personalization"] = personalization
        if usage is not None:
            values["prompt_tokens"] = usage.prompt_tokens
            values["completion_tokens"] = usage.completion_tokens
        settled = {"status": status.value, "error": error, "node": None}

        async def write() -> bool:
            async with self._engine.begin() as conn:
                result = await conn.execute(
                    messages.update()
                    .where(self._running_here(message_id))
                    .values(**values, **settled)
                )
                if result.rowcount:
                    return True
                # Settled elsewhere; unless someone generates in it again (a continue).
                await conn.execute(
                    messages.update()
                    .where(
                        messages.c.id == message_id,
                        messages.c.status != MessageStatus.STREAMING.value,
                    )
                    .values(**values)
                )
                return False

        return await while_unavailable(
            write, FINISH_RETRY_S, what=f"finishing message {message_id}"
        )

    async def restart(self, message_id: int, now: datetime) -> None:
        """Mark an assistant message as generating again, here (continue / retry in place)."""
        async with self._engine.begin() as conn:
            await conn.execute(
                messages.update()
                .where(messages.c.id == message_id)
                .values(
                    status=MessageStatus.STREAMING.value, error=None, node=self.node, updated_at=now
                )
            )

    async def status(self, message_id: int) -> MessageStatus:
        async with self._engine.connect() as conn:
            value = await conn.scalar(
                sa.select(messages.c.status).where(messages.c.id == message_id)
            )
        if value is None:
            raise NotFound("no such message")
        return MessageStatus(value)

    async def settle(self, message_id: int, status: MessageStatus, now: datetime) -> bool:
        """End a generation that runs on no node this process can reach, keeping its last
        checkpoint. Its node, if it still runs it, sees at its next checkpoint that the row
        is settled and stops. False when it had ended already."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                messages.update()
                .where(
                    messages.c.id == message_id,
                    messages.c.status == MessageStatus.STREAMING.value,
                )
                .values(status=status.value, node=None, updated_at=now)
            )
        return bool(result.rowcount)

    async def safety_summary(self, since: datetime) -> list[tuple[str, int, dict[str, int]]]:
        """Per model, since `since`: how many answers, and how many of them the safety
        layer acted on, by action ("blocked", "recovered", "recovery_failed", ...)."""
        m = messages.c
        recent = sa.and_(m.role == "assistant", m.created_at >= since)
        async with self._engine.connect() as conn:
            totals = await conn.execute(
                sa.select(m.model, sa.func.count()).where(recent).group_by(m.model)
            )
            acted = await conn.execute(
                sa.select(m.model, m.safety).where(recent, m.safety.is_not(None))
            )
            counts: dict[str, dict[str, int]] = {}
            for model, note in acted:
                action = str((note or {}).get("action", "other"))
                per_model = counts.setdefault(model or "-", {})
                per_model[action] = per_model.get(action, 0) + 1
            return [
                (model or "-", int(total), counts.get(model or "-", {})) for model, total in totals
            ]

    async def mark_interrupted(self) -> int:
        """At start-up: the generations this node ran when its last process died are kept,
        marked incomplete (other nodes' are theirs, or the sweep's: store/nodes.py)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                messages.update()
                .where(
                    messages.c.status == MessageStatus.STREAMING.value,
                    sa.or_(messages.c.node == self.node, messages.c.node.is_(None)),
                )
                .values(status=MessageStatus.INCOMPLETE.value, node=None)
            )
        return int(result.rowcount or 0)

    async def touch(self, conversation_id: str, now: datetime, leaf_id: int | None) -> None:
        values: dict[str, Any] = {"updated_at": now}
        if leaf_id is not None:
            values["current_leaf_id"] = leaf_id
        async with self._engine.begin() as conn:
            await conn.execute(
                conversations.update().where(conversations.c.id == conversation_id).values(**values)
            )


def _with_siblings(
    record: MessageRecord, siblings: dict[int | None, tuple[int, ...]]
) -> MessageRecord:
    return MessageRecord(
        record.id,
        record.conversation_id,
        record.user_id,
        record.parent_id,
        record.role,
        record.content,
        record.status,
        record.error,
        record.model,
        record.usage,
        record.created_at,
        siblings.get(record.parent_id, (record.id,)),
        record.safety,
        record.personalization,
    )
