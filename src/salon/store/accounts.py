"""Users, sessions, API keys and instance-wide settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from salon.errors import Conflict
from salon.store.tables import api_keys, app_settings, sessions, users


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: str
    username: str
    password_hash: str
    role: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SessionRecord:
    user: UserRecord
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    user_id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None


def _user(row: sa.Row[Any]) -> UserRecord:
    return UserRecord(row.id, row.username, row.password_hash, row.role, row.created_at)


def _key(row: sa.Row[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(row.id, row.user_id, row.name, row.prefix, row.created_at, row.last_used_at)


# Any constant: the lock only has to be the same for every first-admin decision.
SIGNUP_LOCK = 0x5A10


async def _serialise_signups(conn: AsyncConnection) -> None:
    """Make "count the users, then insert" atomic across concurrent sign-ups, so two
    people signing up at once can never both become the first admin."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SIGNUP_LOCK})
    else:
        # SQLite: a write statement takes the database's write lock for the transaction
        # (the count below then sees every committed sign-up).
        await conn.execute(users.update().where(sa.false()).values(role=users.c.role))


class AccountStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # -- users ---------------------------------------------------------------------------

    async def count_users(self) -> int:
        async with self._engine.connect() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(users)) or 0)

    async def create_user(self, record: UserRecord, *, first_is_admin: bool) -> UserRecord:
        """Insert a user. With `first_is_admin`, the role becomes admin exactly when no
        other user exists, decided inside the transaction."""
        async with self._engine.begin() as conn:
            role = record.role
            if first_is_admin:
                await _serialise_signups(conn)
                existing = await conn.scalar(sa.select(sa.func.count()).select_from(users))
                role = "admin" if not existing else record.role
            try:
                await conn.execute(
                    users.insert().values(
                        id=record.id,
                        username=record.username,
                        password_hash=record.password_hash,
                        role=role,
                        created_at=record.created_at,
                    )
                )
            except IntegrityError as exc:
                raise Conflict(f"the username {record.username!r} is taken") from exc
        return UserRecord(record.id, record.username, record.password_hash, role, record.created_at)

    async def user_by_name(self, username: str) -> UserRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(users.select().where(users.c.username == username))).first()
        return _user(row) if row else None

    async def list_users(self) -> list[UserRecord]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(users.select().order_by(users.c.created_at))
            return [_user(row) for row in rows]

    # -- sessions ------------------------------------------------------------------------

    async def create_session(
        self, token_hash: str, user_id: str, csrf_token: str, now: datetime, expires: datetime
    ) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                sessions.insert().values(
                    token_hash=token_hash,
                    user_id=user_id,
                    csrf_token=csrf_token,
                    created_at=now,
                    expires_at=expires,
                )
            )

    async def session(self, token_hash: str, now: datetime) -> SessionRecord | None:
        query = (
            sa.select(users, sessions.c.csrf_token, sessions.c.expires_at)
            .join(sessions, sessions.c.user_id == users.c.id)
            .where(sessions.c.token_hash == token_hash, sessions.c.expires_at > now)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return SessionRecord(_user(row), row.csrf_token, row.expires_at)

    async def delete_session(self, token_hash: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(sessions.delete().where(sessions.c.token_hash == token_hash))

    # -- API keys ------------------------------------------------------------------------

    async def create_key(self, record: ApiKeyRecord, key_hash: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id=record.id,
                    user_id=record.user_id,
                    name=record.name,
                    prefix=record.prefix,
                    key_hash=key_hash,
                    created_at=record.created_at,
                )
            )

    async def list_keys(self, user_id: str) -> list[ApiKeyRecord]:
        query = api_keys.select().where(api_keys.c.user_id == user_id)
        async with self._engine.connect() as conn:
            rows = await conn.execute(query.order_by(api_keys.c.created_at))
            return [_key(row) for row in rows]

    async def delete_key(self, user_id: str, key_id: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                api_keys.delete().where(api_keys.c.id == key_id, api_keys.c.user_id == user_id)
            )
        return bool(result.rowcount)

    async def user_by_key(self, key_hash: str) -> tuple[str, UserRecord] | None:
        """The key's id and its owner."""
        query = (
            sa.select(users, api_keys.c.id.label("key_id"))
            .join(api_keys, api_keys.c.user_id == users.c.id)
            .where(api_keys.c.key_hash == key_hash)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return (row.key_id, _user(row)) if row else None

    async def touch_key(self, key_id: str, now: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                api_keys.update().where(api_keys.c.id == key_id).values(last_used_at=now)
            )

    # -- instance settings ---------------------------------------------------------------

    async def get_setting(self, key: str, default: Any) -> Any:
        async with self._engine.connect() as conn:
            value = await conn.scalar(
                sa.select(app_settings.c.value).where(app_settings.c.key == key)
            )
        return default if value is None else value

    async def set_setting(self, key: str, value: Any) -> None:
        async with self._engine.begin() as conn:
            updated = await conn.execute(
                app_settings.update().where(app_settings.c.key == key).values(value=value)
            )
            if not updated.rowcount:
                await conn.execute(app_settings.insert().values(key=key, value=value))
