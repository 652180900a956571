"""Shared fixtures: a real database (SQLite file, and PostgreSQL when it is reachable)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from salon.store.db import create_engine, migrate
from salon.store.tables import metadata

# Test servers stop at once: a generation left running by a test is kept as incomplete
# rather than waited for (the graceful drain has its own test).
os.environ.setdefault("SALON_SHUTDOWN_GRACE_S", "0")

PG_ADMIN_URL = os.environ.get(
    "SALON_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def _postgres_reachable() -> bool:
    async def probe() -> bool:
        engine = create_engine(PG_ADMIN_URL)
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("select 1"))
            return True
        except Exception:
            return False
        finally:
            await engine.dispose()

    return asyncio.run(probe())


POSTGRES = _postgres_reachable()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    if not POSTGRES:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL must be reachable in CI (127.0.0.1:5432)")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    name = f"salon_test_{uuid.uuid4().hex[:10]}"

    async def admin(statement: str) -> None:
        engine = create_engine(PG_ADMIN_URL)
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(sa.text(statement))
        await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/salon.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await migrate(engine)
    async with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            await conn.execute(table.delete())
    yield engine
    await engine.dispose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests run last: Playwright's sync API keeps an event loop running in the
    main thread while its browser lives, which asyncio tests after it cannot share."""
    items.sort(key=lambda item: "tests/e2e/" in str(item.path).replace("\\", "/"))
