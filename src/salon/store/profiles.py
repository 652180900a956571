"""A user's personalization settings and personas, stored as validated JSON documents
(the shape is owned by `salon.personalization.profile`; this layer keeps dicts)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from salon.errors import NotFound
from salon.store.conversations import utc
from salon.store.tables import personas, profiles


@dataclass(frozen=True, slots=True)
class PersonaRecord:
    id: str
    user_id: str
    data: dict[str, Any]
    created_at: datetime
    updated_at: datetime


def _persona(row: sa.Row[Any]) -> PersonaRecord:
    return PersonaRecord(row.id, row.user_id, row.data, utc(row.created_at), utc(row.updated_at))


class ProfileStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def profile(self, user_id: str) -> dict[str, Any] | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(sa.select(profiles.c.data).where(profiles.c.user_id == user_id))
            ).first()
        return dict(row.data) if row else None

    async def save_profile(self, user_id: str, data: dict[str, Any], now: datetime) -> None:
        async with self._engine.begin() as conn:
            updated = await conn.execute(
                profiles.update()
                .where(profiles.c.user_id == user_id)
                .values(data=data, updated_at=now)
            )
            if not updated.rowcount:
                await conn.execute(
                    profiles.insert().values(user_id=user_id, data=data, updated_at=now)
                )

    async def personas(self, user_id: str) -> list[PersonaRecord]:
        stmt = (
            personas.select()
            .where(personas.c.user_id == user_id)
            .order_by(personas.c.created_at, personas.c.id)
        )
        async with self._engine.connect() as conn:
            return [_persona(row) for row in await conn.execute(stmt)]

    async def persona(self, user_id: str, persona_id: str) -> PersonaRecord:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    personas.select().where(
                        personas.c.id == persona_id, personas.c.user_id == user_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound("persona not found")
        return _persona(row)

    async def save_persona(
        self, user_id: str, persona_id: str, data: dict[str, Any], now: datetime
    ) -> PersonaRecord:
        async with self._engine.begin() as conn:
            updated = await conn.execute(
                personas.update()
                .where(personas.c.id == persona_id, personas.c.user_id == user_id)
                .values(data=data, updated_at=now)
            )
            if not updated.rowcount:
                await conn.execute(
                    personas.insert().values(
                        id=persona_id, user_id=user_id, data=data, created_at=now, updated_at=now
                    )
                )
        return await self.persona(user_id, persona_id)

    async def delete_persona(self, user_id: str, persona_id: str) -> None:
        async with self._engine.begin() as conn:
            deleted = await conn.execute(
                personas.delete().where(personas.c.id == persona_id, personas.c.user_id == user_id)
            )
        if not deleted.rowcount:
            raise NotFound("persona not found")
