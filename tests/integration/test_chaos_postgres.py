"""PostgreSQL restarted under load (issue 5's chaos list), against a real `salon serve` and
a private PostgreSQL cluster that this module starts, restarts and removes (never the
shared server on 5432): `pg_ctl restart -m fast`, then stop → 2 s down → start.

While web-app users post messages and follow the answers, another one reads the
conversation list, another starts new conversations and a /v1 client streams:

- no request hangs: every one ends within its bound, refusals within a few seconds;
- a request while the database is away gets a clear error: 503 `database_unavailable`
  in salon's JSON error shape with Retry-After, never a 500, a traceback or a reset;
- salon recovers by itself once PostgreSQL is back (pool_pre_ping replaces the dead
  pooled connections), within seconds;
- nothing acknowledged is lost: every user message and conversation that got a 201 is
  stored, and every
  generation running through the outage still completes (its checkpoints are skipped
  while the database is away; its final state is written once it is back), with the
  text its follower saw.

The longer version, with numbers, is bench/chaos_postgres.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest_server import SalonServer, salon_env, salon_server
from tests.integration.pg_chaos import (
    ChaosLoad,
    PrivatePostgres,
    settled_messages,
    stored_conversations,
    unavailable_reason,
)

LOAD_S = 8.0  # of load in all, the disruption about a second in
WEB_USERS = 3
# A refusal is an answer at once; even a turn or a /v1 stream (short answers of the fake
# model) takes well under a second here, so 5 s on a busy 2-core machine is "no hang".
REFUSAL_BOUND_S = 5.0
RECOVERY_BOUND_S = 5.0

pytestmark = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"no private PostgreSQL: {unavailable_reason()}"
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def server(
    postgres: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SalonServer]:
    data_dir: Path = tmp_path_factory.mktemp("salon-chaos-pg")
    env = salon_env(
        data_dir,
        ["fake:slow", "fake:echo"],
        {"fake": {"kind": "fake", "fake_delay_s": "0.004"}},  # fake:slow: 400 words, ~1.6 s
        {
            "SALON_DATABASE_URL": postgres.url,
            "SALON_FLUSH_INTERVAL_S": "0.05",  # many checkpoints, so the outage meets some
            "SALON_PERSONALIZATION__EMBEDDER": "hashing",
            "SALON_LIMITS__MAX_CONCURRENT": "16",
        },
    )
    with salon_server(env) as running:
        yield running


async def under_load(
    server: SalonServer, disrupt: Callable[[], Awaitable[float]]
) -> tuple[ChaosLoad, float, float]:
    """Runs the load, calls `disrupt` a second in (it returns when PostgreSQL accepts
    connections again); returns the load, that moment and the recovery time."""
    async with ChaosLoad(server.base_url, username=f"u{uuid.uuid4().hex[:8]}") as load:
        stop_at = time.monotonic() + LOAD_S
        users = [asyncio.create_task(load.web_user(w, stop_at)) for w in range(WEB_USERS)]
        users.append(asyncio.create_task(load.v1_user(stop_at)))
        users.append(asyncio.create_task(load.reader(stop_at)))
        users.append(asyncio.create_task(load.writer(stop_at)))
        await asyncio.sleep(1.0)
        back = await disrupt()
        recovery = await load.recovery_s(back)
        await asyncio.wait_for(asyncio.gather(*users), LOAD_S + 2 * load.bound_s)
    return load, back, recovery


async def check(load: ChaosLoad, postgres: PrivatePostgres, back: float, recovery: float) -> None:
    bad = [o for o in load.outcomes if o.bad]
    assert not bad, f"requests that neither succeeded nor got the clear 503: {bad[:5]}"
    slow = [o for o in load.outcomes if o.kind != "follow" and o.seconds > REFUSAL_BOUND_S]
    assert not slow, f"requests slower than {REFUSAL_BOUND_S} s: {slow[:5]}"
    assert recovery < RECOVERY_BOUND_S, f"recovered only after {recovery:.2f} s"
    after = {o.kind for o in load.outcomes if o.ok and o.started > back + recovery}
    kinds = {"turn", "follow", "read", "write", "v1"}
    assert kinds <= after, f"after recovery only {after} succeeded"

    rows = await settled_messages(postgres.url, answers=load.started)
    stored_user = {content for _, role, content, _, _ in rows if role == "user"}
    lost = set(load.acknowledged) - stored_user
    assert not lost, f"acknowledged messages missing after the restart: {sorted(lost)[:5]}"
    missing = set(load.created) - await stored_conversations(postgres.url)
    assert not missing, f"acknowledged conversations missing after the restart: {missing}"
    answers = {mid: (content, status, error) for mid, role, content, status, error in rows
               if role == "assistant"}  # fmt: skip
    # The answers of acknowledged turns. (A turn refused with a 503 after its messages were
    # written — the chat service reads personalization after the insert — can leave its
    # answer "streaming" until the next start: a known chat/ issue, not asserted here.)
    unfinished = {mid: answers[mid][1:] for mid in load.started if answers[mid][1] != "complete"}
    assert not unfinished, f"answers not completed through the outage: {unfinished}"
    for mid, text in load.answers.items():
        assert answers[mid][0] == text, f"answer {mid}: the store differs from what was streamed"


async def test_postgres_restarted_fast_under_load(
    server: SalonServer, postgres: PrivatePostgres
) -> None:
    async def restart() -> float:
        await asyncio.to_thread(postgres.restart)  # -m fast: sessions are cut
        return time.monotonic()

    load, back, recovery = await under_load(server, restart)
    await check(load, postgres, back, recovery)
    assert len(load.answers) >= WEB_USERS  # the load was real


async def test_postgres_down_for_two_seconds_under_load(
    server: SalonServer, postgres: PrivatePostgres
) -> None:
    async def stop_wait_start() -> float:
        await asyncio.to_thread(postgres.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(postgres.start)
        return time.monotonic()

    load, back, recovery = await under_load(server, stop_wait_start)
    await check(load, postgres, back, recovery)
    refused = [o for o in load.outcomes if o.outage_error]
    # Two seconds down under steady load: the API must have said so, clearly.
    assert refused, "no request met the outage"
    assert {"read", "write"} <= {o.kind for o in refused}
