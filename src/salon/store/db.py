"""Engine creation and migrations (SQLite in WAL mode by default, PostgreSQL by URL)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"

log = logging.getLogger(__name__)
T = TypeVar("T")


# A server that is down refuses at once; one that does not answer (a network partition, a
# frozen host) would otherwise hold a request for asyncpg's default 60 s per connection.
PG_CONNECT_TIMEOUT_S = 5.0
# How long a request waits for a pooled connection when all are busy (SQLAlchemy's default
# is 30 s; a request that waits longer than this has better things to do: a 503).
POOL_TIMEOUT_S = 10.0
# SQLSTATE classes that mean "the server cannot serve now", not "this statement is wrong":
# 08 connection exception, 57P operator intervention (shutdown, crash, starting up),
# 53 insufficient resources (too many connections).
UNAVAILABLE_SQLSTATES = ("08", "57P", "53")
# What a database that is away can raise through SQLAlchemy: its wrapped driver errors,
# a pool that ran out of time, and (asyncpg) the socket error of a refused connection,
# which SQLAlchemy passes through unwrapped.
DATABASE_ERRORS: tuple[type[Exception], ...] = (sa.exc.DBAPIError, sa.exc.TimeoutError, OSError)


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # pool_pre_ping: after a database restart every pooled connection is dead; each one is
    # tested (a cheap round trip) when it is checked out and replaced if it is, so the
    # first requests after the restart succeed instead of failing once per connection.
    connect_args = {"timeout": PG_CONNECT_TIMEOUT_S} if "asyncpg" in url else {}
    return create_async_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args=connect_args,
    )


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database cannot be reached or is restarting (worth a 503 and
    a retry), as opposed to a bug or a bad statement. Judged by exception type and SQLSTATE
    along the cause chain, never by message."""
    if isinstance(exc, sa.exc.TimeoutError):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state.startswith(UNAVAILABLE_SQLSTATES):
            return True
        orig = getattr(current, "orig", None)
        current = (
            orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
        )
    return False


async def while_unavailable(
    operation: Callable[[], Awaitable[T]], within_s: float, *, what: str = "a write"
) -> T:
    """`operation()`, tried again (0.1 s, doubling to 2 s apart) while the database is
    unavailable, for at most `within_s`; then the last error is raised. For the few writes
    that must land even across a database restart (a generation's final state)."""
    deadline = time.monotonic() + within_s
    delay = 0.1
    while True:
        try:
            return await operation()
        except DATABASE_ERRORS as exc:
            if not database_unavailable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable for %s; trying again in %.1f s", what, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


def _ensure_sqlite_dir(url: str) -> None:
    database = sa.make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed while a generation flushes; NORMAL is durable across
    # application crashes (only an OS crash can lose the last commits).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))
