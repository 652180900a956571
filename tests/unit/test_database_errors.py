"""A database that is away is told apart from a bug (by type and SQLSTATE, never by message),
answered with 503 + Retry-After through the one error mapping, and the writes that must land
are retried while it comes back. Real errors from real engines: a refused connection (a port
nobody listens on), a unique violation in SQLite."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from salon.api.errors import HANDLERS
from salon.store.db import create_engine, database_unavailable, while_unavailable


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


async def refused_connection() -> BaseException:
    engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{dead_port()}/x")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("select 1"))
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError("connected to a dead port")


async def unique_violation(tmp_path: Path) -> BaseException:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("create table t (id integer primary key)"))
            await conn.execute(sa.text("insert into t values (1)"))
            await conn.execute(sa.text("insert into t values (1)"))
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError("a duplicate key was accepted")


async def test_a_refused_connection_is_unavailability_a_constraint_is_not(
    tmp_path: Path,
) -> None:
    assert database_unavailable(await refused_connection())
    assert database_unavailable(sa.exc.TimeoutError("QueuePool limit reached"))
    violation = await unique_violation(tmp_path)
    assert isinstance(violation, sa.exc.IntegrityError)
    assert not database_unavailable(violation)


async def call(error: BaseException) -> httpx.Response:
    async def fail(_request: Request) -> Response:
        raise error

    app = Starlette(routes=[Route("/", fail)], exception_handlers=HANDLERS)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/")


async def test_the_api_answers_an_unreachable_database_with_503_and_retry_after() -> None:
    response = await call(await refused_connection())
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "database_unavailable"


async def test_other_database_errors_stay_internal_errors_without_details(
    tmp_path: Path,
) -> None:
    response = await call(await unique_violation(tmp_path))
    assert response.status_code == 500
    body = json.dumps(response.json())
    assert "internal_error" in body and "UNIQUE" not in body  # nothing of the SQL leaks


async def test_a_write_that_must_land_is_retried_while_the_database_is_away() -> None:
    refused = await refused_connection()
    attempts = 0

    async def write() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise refused
        return "written"

    assert await while_unavailable(write, within_s=5) == "written"
    assert attempts == 3


async def test_the_retry_gives_up_at_its_bound_and_never_retries_a_bug(tmp_path: Path) -> None:
    refused = await refused_connection()

    async def down() -> None:
        raise refused

    with pytest.raises(type(refused)):
        await while_unavailable(down, within_s=0.3)
    violation = await unique_violation(tmp_path)
    attempts = 0

    async def buggy() -> None:
        nonlocal attempts
        attempts += 1
        raise violation

    with pytest.raises(sa.exc.IntegrityError):
        await while_unavailable(buggy, within_s=5)
    assert attempts == 1
