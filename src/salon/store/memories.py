"""Saved memories (versioned) and the items that retrieval searches, scoped to an owner.

A memory is never edited in place: a change inserts a new row that supersedes the old one,
which stays as history. The recall items mirror what retrieval may return (current
memories and past messages); every change to them bumps the owner's revision counter, so an
in-memory index anywhere can catch up by reading only what changed since its revision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from salon.errors import Conflict, NotFound
from salon.store.conversations import utc
from salon.store.tables import memories, recall_items, recall_state

CURRENT = "current"
SUPERSEDED = "superseded"
DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    id: int
    user_id: str
    kind: str
    subject: str | None
    text: str
    language: str
    status: str
    origin: str  # "explicit" | "extracted" | "user"
    supersedes_id: int | None
    source_message_id: int | None
    conversation_id: str | None
    created_at: datetime
    updated_at: datetime
    forgotten_by: int | None = None


@dataclass(frozen=True, slots=True)
class NewMemory:
    kind: str
    text: str
    language: str
    origin: str
    subject: str | None = None
    source_message_id: int | None = None
    conversation_id: str | None = None


@dataclass(frozen=True, slots=True)
class RecallRow:
    kind: str
    ref_id: int
    conversation_id: str | None
    text: str
    vector: bytes | None
    removed: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewRecallItem:
    kind: str
    ref_id: int
    text: str
    vector: bytes | None
    created_at: datetime
    conversation_id: str | None = None


def _memory(row: sa.Row[Any]) -> MemoryRecord:
    return MemoryRecord(
        row.id,
        row.user_id,
        row.kind,
        row.subject,
        row.text,
        row.language,
        row.status,
        row.origin,
        row.supersedes_id,
        row.source_message_id,
        row.conversation_id,
        utc(row.created_at),
        utc(row.updated_at),
        row.forgotten_by,
    )


def _recall(row: sa.Row[Any]) -> RecallRow:
    return RecallRow(
        row.kind,
        row.ref_id,
        row.conversation_id,
        row.text,
        row.vector,
        bool(row.removed),
        utc(row.created_at),
    )


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class MemoryStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # -- memories ------------------------------------------------------------------------

    async def add(
        self, user_id: str, new: NewMemory, vector: bytes | None, now: datetime
    ) -> tuple[MemoryRecord, MemoryRecord | None]:
        """Save a memory; a current memory about the same subject is superseded by it (and
        returned), so two contradicting facts are never both current."""
        async with self._engine.begin() as conn:
            old = await self._current_about(conn, user_id, new.subject)
            record = await self._insert(conn, user_id, new, old.id if old else None, now)
            if old is not None:
                await self._set_status(conn, old.id, SUPERSEDED, now)
            await self._index_memory(conn, user_id, record, vector, old)
            return record, old

    async def revise(
        self, user_id: str, memory_id: int, text: str, vector: bytes | None, now: datetime
    ) -> MemoryRecord:
        """A user's edit: a new version that supersedes the current one."""
        async with self._engine.begin() as conn:
            old = await self._get(conn, user_id, memory_id)
            if old.status != CURRENT:
                raise Conflict("only a current memory can be edited")
            new = NewMemory(
                old.kind,
                text,
                old.language,
                "user",
                old.subject,
                old.source_message_id,
                old.conversation_id,
            )
            record = await self._insert(conn, user_id, new, old.id, now)
            await self._set_status(conn, old.id, SUPERSEDED, now)
            await self._index_memory(conn, user_id, record, vector, old)
            return record

    async def delete(
        self, user_id: str, memory_id: int, now: datetime, *, by_message: int | None = None
    ) -> MemoryRecord:
        """Out of context, search and export at once — with its earlier versions, which
        say the same thing in older words; kept (for undo) until the purge. `by_message`:
        the user message that asked for it."""
        async with self._engine.begin() as conn:
            record = await self._get(conn, user_id, memory_id)
            if record.status == DELETED:
                return record
            chain = await self._chain(conn, user_id, record)
            await conn.execute(
                memories.update()
                .where(memories.c.id.in_([m.id for m in chain]))
                .values(status=DELETED, updated_at=now)
            )
            await conn.execute(
                memories.update().where(memories.c.id == memory_id).values(forgotten_by=by_message)
            )
            await self._remove_items(conn, user_id, "memory", [memory_id])
            for version in chain:
                await self._hide_source(conn, user_id, version, hidden=True)
            return await self._get(conn, user_id, memory_id)

    async def restore(
        self, user_id: str, memory_id: int, vector: bytes | None, now: datetime
    ) -> MemoryRecord:
        """Undo a deletion, earlier versions included. The memory becomes current again
        unless a newer memory about the same subject has taken its place meanwhile (then it
        returns as history)."""
        async with self._engine.begin() as conn:
            record = await self._get(conn, user_id, memory_id)
            if record.status != DELETED:
                raise Conflict("that memory is not deleted")
            newer = await self._current_about(conn, user_id, record.subject)
            status = SUPERSEDED if newer is not None else CURRENT
            chain = await self._chain(conn, user_id, record)
            earlier = [m.id for m in chain if m.id != memory_id and m.status == DELETED]
            if earlier:
                await conn.execute(
                    memories.update()
                    .where(memories.c.id.in_(earlier))
                    .values(status=SUPERSEDED, updated_at=now)
                )
            await self._set_status(conn, memory_id, status, now)
            await conn.execute(
                memories.update().where(memories.c.id == memory_id).values(forgotten_by=None)
            )
            restored = await self._get(conn, user_id, memory_id)
            if status == CURRENT:
                await self._index_memory(conn, user_id, restored, vector, None)
            for version in chain:
                await self._hide_source(conn, user_id, version, hidden=False)
            return restored

    async def undo_add(
        self, user_id: str, memory_id: int, vector_of_previous: bytes | None, now: datetime
    ) -> MemoryRecord | None:
        """Undo a save (the chat's "memory updated" chip): the new memory is erased and
        the one it superseded, if any, is current again (and returned)."""
        async with self._engine.begin() as conn:
            record = await self._get(conn, user_id, memory_id)
            if record.status != CURRENT:
                raise Conflict("only the current version of a memory can be undone")
            await self._remove_items(conn, user_id, "memory", [memory_id])
            await conn.execute(memories.delete().where(memories.c.id == memory_id))
            if record.supersedes_id is None:
                return None
            await self._set_status(conn, record.supersedes_id, CURRENT, now)
            previous = await self._get(conn, user_id, record.supersedes_id)
            await self._index_memory(conn, user_id, previous, vector_of_previous, None)
            return previous

    async def get(self, user_id: str, memory_id: int) -> MemoryRecord:
        async with self._engine.connect() as conn:
            return await self._get(conn, user_id, memory_id)

    async def list_memories(
        self,
        user_id: str,
        *,
        statuses: Sequence[str] = (CURRENT,),
        query: str | None = None,
        limit: int = 500,
    ) -> list[MemoryRecord]:
        m = memories.c
        stmt = memories.select().where(m.user_id == user_id, m.status.in_(statuses))
        if query:
            stmt = stmt.where(m.text.ilike(_like(query), escape="\\"))
        stmt = stmt.order_by(m.created_at.desc(), m.id.desc()).limit(limit)
        async with self._engine.connect() as conn:
            return [_memory(row) for row in await conn.execute(stmt)]

    async def history(self, user_id: str, memory_id: int) -> list[MemoryRecord]:
        """The versions of a memory, newest first (it and what it superseded, in turn)."""
        async with self._engine.connect() as conn:
            return await self._chain(conn, user_id, await self._get(conn, user_id, memory_id))

    async def _chain(
        self, conn: AsyncConnection, user_id: str, record: MemoryRecord
    ) -> list[MemoryRecord]:
        chain = [record]
        while chain[-1].supersedes_id is not None and len(chain) < 100:
            try:
                chain.append(await self._get(conn, user_id, chain[-1].supersedes_id))
            except NotFound:  # erased by a purge or an undo
                break
        return chain

    async def sources(self, user_id: str, memory_ids: Sequence[int]) -> dict[int, int]:
        """The message each of these memories was saved from (where known)."""
        if not memory_ids:
            return {}
        m = memories.c
        stmt = sa.select(m.id, m.source_message_id).where(
            m.user_id == user_id, m.id.in_(memory_ids), m.source_message_id.is_not(None)
        )
        async with self._engine.connect() as conn:
            return {int(row.id): int(row.source_message_id) for row in await conn.execute(stmt)}

    async def from_messages(self, user_id: str, message_ids: Sequence[int]) -> list[MemoryRecord]:
        """Memories saved from these messages, or forgotten because they asked (what the
        chat's chips show)."""
        if not message_ids:
            return []
        m = memories.c
        saved = sa.and_(m.source_message_id.in_(message_ids), m.status != DELETED)
        stmt = (
            memories.select()
            .where(m.user_id == user_id, sa.or_(saved, m.forgotten_by.in_(message_ids)))
            .order_by(m.id)
        )
        async with self._engine.connect() as conn:
            return [_memory(row) for row in await conn.execute(stmt)]

    async def purge(self, deleted_before: datetime) -> int:
        """Erase deleted memories whose undo window has passed (all users)."""
        m = memories.c
        async with self._engine.begin() as conn:
            result = await conn.execute(
                memories.delete().where(m.status == DELETED, m.updated_at < deleted_before)
            )
        return int(result.rowcount or 0)

    async def erase_user(self, user_id: str) -> None:
        """Forget everything: every memory and every recall item of the user."""
        async with self._engine.begin() as conn:
            await conn.execute(memories.delete().where(memories.c.user_id == user_id))
            await self._remove_all(conn, user_id)

    # -- recall items --------------------------------------------------------------------

    async def index(self, user_id: str, items: Sequence[NewRecallItem]) -> None:
        if not items:
            return
        async with self._engine.begin() as conn:
            rev = await self._bump(conn, user_id)
            for item in items:
                await self._upsert_item(conn, user_id, item, rev)

    async def unindex_conversation(self, user_id: str, conversation_id: str) -> None:
        """A deleted conversation's messages leave retrieval (their text is erased)."""
        r = recall_items.c
        async with self._engine.begin() as conn:
            rev = await self._bump(conn, user_id)
            await conn.execute(
                recall_items.update()
                .where(
                    r.user_id == user_id,
                    r.kind == "message",
                    r.conversation_id == conversation_id,
                )
                .values(removed=True, text="", vector=None, rev=rev)
            )

    async def revision(self, user_id: str) -> int:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(recall_state.c.rev).where(recall_state.c.user_id == user_id)
                )
            ).first()
        return int(row.rev) if row else 0

    async def changes(self, user_id: str, since: int) -> tuple[int, list[RecallRow]]:
        """Every recall item changed after revision `since`, and the revision now."""
        r = recall_items.c
        async with self._engine.connect() as conn:
            rev_row = (
                await conn.execute(
                    sa.select(recall_state.c.rev).where(recall_state.c.user_id == user_id)
                )
            ).first()
            rev = int(rev_row.rev) if rev_row else 0
            if rev <= since:
                return rev, []
            rows = await conn.execute(
                recall_items.select().where(r.user_id == user_id, r.rev > since, r.rev <= rev)
            )
            return rev, [_recall(row) for row in rows]

    async def indexed_messages(self, user_id: str, message_ids: Iterable[int]) -> set[int]:
        ids = list(message_ids)
        if not ids:
            return set()
        r = recall_items.c
        stmt = sa.select(r.ref_id).where(
            r.user_id == user_id, r.kind == "message", r.ref_id.in_(ids)
        )
        async with self._engine.connect() as conn:
            return {int(row.ref_id) for row in await conn.execute(stmt)}

    # -- helpers -------------------------------------------------------------------------

    async def _get(self, conn: AsyncConnection, user_id: str, memory_id: int) -> MemoryRecord:
        row = (
            await conn.execute(
                memories.select().where(memories.c.id == memory_id, memories.c.user_id == user_id)
            )
        ).first()
        if row is None:
            raise NotFound("memory not found")
        return _memory(row)

    async def _current_about(
        self, conn: AsyncConnection, user_id: str, subject: str | None
    ) -> MemoryRecord | None:
        if subject is None:
            return None
        m = memories.c
        row = (
            await conn.execute(
                memories.select()
                .where(m.user_id == user_id, m.subject == subject, m.status == CURRENT)
                .order_by(m.id.desc())
                .limit(1)
            )
        ).first()
        return _memory(row) if row else None

    async def _insert(
        self,
        conn: AsyncConnection,
        user_id: str,
        new: NewMemory,
        supersedes_id: int | None,
        now: datetime,
    ) -> MemoryRecord:
        result = await conn.execute(
            memories.insert().values(
                user_id=user_id,
                kind=new.kind,
                subject=new.subject,
                text=new.text,
                language=new.language,
                status=CURRENT,
                origin=new.origin,
                supersedes_id=supersedes_id,
                source_message_id=new.source_message_id,
                conversation_id=new.conversation_id,
                created_at=now,
                updated_at=now,
            )
        )
        assert result.inserted_primary_key is not None
        return await self._get(conn, user_id, int(result.inserted_primary_key[0]))

    async def _set_status(
        self, conn: AsyncConnection, memory_id: int, status: str, now: datetime
    ) -> None:
        await conn.execute(
            memories.update()
            .where(memories.c.id == memory_id)
            .values(status=status, updated_at=now)
        )

    async def _index_memory(
        self,
        conn: AsyncConnection,
        user_id: str,
        record: MemoryRecord,
        vector: bytes | None,
        replaced: MemoryRecord | None,
    ) -> None:
        rev = await self._bump(conn, user_id)
        item = NewRecallItem(
            "memory", record.id, record.text, vector, record.created_at, record.conversation_id
        )
        await self._upsert_item(conn, user_id, item, rev)
        if replaced is not None:
            await self._remove_items(conn, user_id, "memory", [replaced.id], rev)

    async def _upsert_item(
        self, conn: AsyncConnection, user_id: str, item: NewRecallItem, rev: int
    ) -> None:
        r = recall_items.c
        values = {
            "text": item.text,
            "vector": item.vector,
            "removed": False,
            "rev": rev,
            "created_at": item.created_at,
            "conversation_id": item.conversation_id,
        }
        updated = await conn.execute(
            recall_items.update()
            .where(r.user_id == user_id, r.kind == item.kind, r.ref_id == item.ref_id)
            .values(**values)
        )
        if not updated.rowcount:
            await conn.execute(
                recall_items.insert().values(
                    user_id=user_id, kind=item.kind, ref_id=item.ref_id, **values
                )
            )

    async def _remove_items(
        self,
        conn: AsyncConnection,
        user_id: str,
        kind: str,
        ref_ids: Sequence[int],
        rev: int | None = None,
    ) -> None:
        r = recall_items.c
        rev = rev if rev is not None else await self._bump(conn, user_id)
        # The text goes with it: a removed item must not be recoverable from the index.
        await conn.execute(
            recall_items.update()
            .where(r.user_id == user_id, r.kind == kind, r.ref_id.in_(ref_ids))
            .values(removed=True, text="", vector=None, rev=rev)
        )

    async def _hide_source(
        self, conn: AsyncConnection, user_id: str, record: MemoryRecord, *, hidden: bool
    ) -> None:
        """A deleted memory must not come back through the message it was saved from: that
        message leaves retrieval too (the conversation itself keeps it). Its text stays in
        the row, so a restore can bring it back."""
        if record.source_message_id is None:
            return
        r = recall_items.c
        rev = await self._bump(conn, user_id)
        await conn.execute(
            recall_items.update()
            .where(
                r.user_id == user_id,
                r.kind == "message",
                r.ref_id == record.source_message_id,
                r.vector.is_not(None),
            )
            .values(removed=hidden, rev=rev)
        )

    async def _remove_all(self, conn: AsyncConnection, user_id: str) -> None:
        rev = await self._bump(conn, user_id)
        await conn.execute(
            recall_items.update()
            .where(recall_items.c.user_id == user_id)
            .values(removed=True, text="", vector=None, rev=rev)
        )

    async def _bump(self, conn: AsyncConnection, user_id: str) -> int:
        """The owner's next revision, in the caller's transaction (writers to one owner
        serialise on this row, so revisions are assigned in commit order)."""
        s = recall_state.c
        result = await conn.execute(
            recall_state.update().where(s.user_id == user_id).values(rev=s.rev + 1)
        )
        if not result.rowcount:
            try:
                async with conn.begin_nested():
                    await conn.execute(recall_state.insert().values(user_id=user_id, rev=1))
                return 1
            except IntegrityError:  # another writer created it first
                await conn.execute(
                    recall_state.update().where(s.user_id == user_id).values(rev=s.rev + 1)
                )
        row = (await conn.execute(sa.select(s.rev).where(s.user_id == user_id))).one()
        return int(row.rev)
