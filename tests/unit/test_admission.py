"""Admission control: fair queues per model, refusals, rate limits and quotas."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from salon.chat.admission import (
    DAY,
    Admission,
    Caller,
    Limiter,
    ModelQueue,
    QueuePolicy,
    RateLimits,
    _wait,
)
from salon.errors import Overloaded, QuotaExceeded, RateLimited
from salon.observability.metrics import Metrics
from salon.store.counters import InMemoryCounters, Window


def queue(concurrent: int = 1, waiting: int = 64, timeout_s: float = 5.0) -> ModelQueue:
    return ModelQueue("fake:slow", QueuePolicy(concurrent, waiting, timeout_s))


async def settle() -> None:
    """Let every ready task run up to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_flooding_user_does_not_starve_another() -> None:
    q = queue(concurrent=1)
    order: list[str] = []
    release = asyncio.Event()

    async def generate(user: str) -> None:
        async with q.slot(user):
            order.append(user)
            await release.wait()

    flood = [asyncio.create_task(generate("a")) for _ in range(10)]
    await settle()
    late = asyncio.create_task(generate("b"))
    await settle()
    assert q.in_flight == 1 and q.depth == 10
    # Let the slot go round one generation at a time.
    while len(order) < 11:
        release.set()
        release = asyncio.Event()
        await settle()
    release.set()
    await asyncio.gather(*flood, late)
    assert order.index("b") <= 1, order  # served within the first two slots
    assert q.in_flight == 0 and q.depth == 0


async def test_slots_go_to_the_user_with_fewest_in_use() -> None:
    q = queue(concurrent=2)
    order: list[str] = []
    gates = {user: asyncio.Event() for user in "abc"}

    async def generate(user: str) -> None:
        async with q.slot(user):
            order.append(user)
            await gates[user].wait()

    tasks = [asyncio.create_task(generate(u)) for u in "aaaab"]
    await settle()
    tasks.append(asyncio.create_task(generate("c")))
    await settle()
    assert order == ["a", "a"]
    gates["a"].set()  # both of a's end: b and c, who have none, come before a's others
    await settle()
    assert order[2:4] in (["b", "c"], ["c", "b"]), order
    for gate in gates.values():
        gate.set()
    await asyncio.gather(*tasks)


async def test_a_full_queue_refuses_at_once() -> None:
    q = queue(concurrent=1, waiting=2)
    hold = asyncio.Event()

    async def generate() -> None:
        async with q.slot("a"):
            await hold.wait()

    tasks = [asyncio.create_task(generate()) for _ in range(3)]
    await settle()
    assert (q.in_flight, q.depth) == (1, 2)
    started = time.perf_counter()
    with pytest.raises(Overloaded) as refused:
        async with q.slot("a"):
            pass
    elapsed = time.perf_counter() - started
    assert elapsed < 0.05, elapsed
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    hold.set()
    await asyncio.gather(*tasks)


async def test_a_newcomer_takes_the_place_of_a_flooders_newest_waiter() -> None:
    q = queue(concurrent=1, waiting=2)
    hold = asyncio.Event()

    async def generate(user: str) -> str:
        async with q.slot(user):
            await hold.wait()
        return user

    flood = [asyncio.create_task(generate("a")) for _ in range(3)]
    await settle()
    other = asyncio.create_task(generate("b"))
    await settle()
    assert q.depth == 2
    hold.set()
    results = await asyncio.gather(*flood, other, return_exceptions=True)
    assert isinstance(results[2], Overloaded)  # a's newest waiter gave way
    assert results[3] == "b"


async def test_a_wait_longer_than_the_timeout_is_refused() -> None:
    q = queue(concurrent=1, timeout_s=0.1)
    hold = asyncio.Event()

    async def holder() -> None:
        async with q.slot("a"):
            await hold.wait()

    task = asyncio.create_task(holder())
    await settle()
    started = time.perf_counter()
    with pytest.raises(Overloaded, match="waited"):
        async with q.slot("b"):
            pass
    assert 0.09 < time.perf_counter() - started < 1.0
    assert q.depth == 0
    hold.set()
    await task
    assert q.in_flight == 0


@pytest.mark.parametrize(("max_wait_s", "timeout_s", "admitted"), [(3.0, 60.0, 3), (None, 5.0, 5)])
async def test_a_newcomer_expected_to_wait_too_long_is_refused_at_once(
    max_wait_s: float | None, timeout_s: float, admitted: int
) -> None:
    """Generations hold a slot 2 s on average; 2 slots: the n-th waiter expects n s. Beyond
    `max_wait_s` (by default the queue timeout) a newcomer is refused at once, with its
    expected wait as Retry-After, although the queue has places left."""
    clock = Clock(0.0)
    q = ModelQueue("fake:slow", QueuePolicy(2, 64, timeout_s, max_wait_s), clock=clock)
    async with q.slot("a"):
        clock.now += 2.0  # one generation measured: 2 s
    hold = asyncio.Event()

    async def generate(user: str) -> None:
        async with q.slot(user):
            await hold.wait()

    tasks = [asyncio.create_task(generate(f"u{i}")) for i in range(2 + admitted)]
    await settle()
    assert (q.in_flight, q.depth) == (2, admitted)
    with pytest.raises(Overloaded) as refused:
        q.check_room("late")
    assert refused.value.retry_after_s == min(admitted + 1.0, timeout_s)
    hold.set()
    await asyncio.gather(*tasks)


async def test_cancelling_a_wait_frees_its_place() -> None:
    q = queue(concurrent=1, waiting=1)
    hold = asyncio.Event()
    entered: list[str] = []

    async def generate(user: str) -> None:
        async with q.slot(user):
            entered.append(user)
            await hold.wait()

    first = asyncio.create_task(generate("a"))
    waiting = asyncio.create_task(generate("b"))
    await settle()
    assert q.depth == 1
    waiting.cancel()
    await settle()
    assert q.depth == 0 and waiting.cancelled()
    again = asyncio.create_task(generate("c"))  # the place is free again
    await settle()
    assert q.depth == 1
    hold.set()
    await asyncio.gather(first, again)
    assert entered == ["a", "c"] and q.in_flight == 0


async def test_a_slot_granted_to_a_cancelled_wait_is_passed_on() -> None:
    q = queue(concurrent=1)
    hold = asyncio.Event()
    entered: list[str] = []

    async def generate(user: str) -> None:
        async with q.slot(user):
            entered.append(user)
            await hold.wait()

    first = asyncio.create_task(generate("a"))
    await settle()
    second = asyncio.create_task(generate("b"))
    third = asyncio.create_task(generate("c"))
    await settle()
    hold.set()
    await asyncio.sleep(0)  # a releases: b is granted but has not resumed yet
    second.cancel()
    await asyncio.gather(first, second, third, return_exceptions=True)
    assert second.cancelled()
    assert "c" in entered and q.in_flight == 0 and q.depth == 0


async def test_a_slot_is_released_when_the_generation_fails() -> None:
    q = queue(concurrent=1)
    with pytest.raises(RuntimeError):
        async with q.slot("a"):
            raise RuntimeError("backend died")
    assert q.in_flight == 0
    async with q.slot("a"):
        assert q.in_flight == 1


async def test_unlimited_concurrency_never_waits() -> None:
    q = queue(concurrent=0, waiting=0)
    async with q.slot("a"), q.slot("a"):
        assert q.in_flight == 0


async def test_queue_gauges_follow_the_queue() -> None:
    metrics = Metrics()
    q = ModelQueue("fake:slow", QueuePolicy(1, 4, 5.0), metrics.queue("fake:slow"))
    hold = asyncio.Event()

    async def generate() -> None:
        async with q.slot("a"):
            await hold.wait()

    tasks = [asyncio.create_task(generate()) for _ in range(3)]
    await settle()
    text = metrics.render().decode()
    assert 'salon_queue_depth{model="fake:slow"} 2.0' in text
    assert 'salon_queue_in_flight{model="fake:slow"} 1.0' in text
    hold.set()
    await asyncio.gather(*tasks)
    assert 'salon_queue_depth{model="fake:slow"} 0.0' in metrics.render().decode()


# -- per-caller limits -------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Store:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def get_setting(self, key: str, default: Any) -> Any:
        return self.values.get(key, default)

    async def set_setting(self, key: str, value: Any) -> None:
        self.values[key] = value


def limiter(limits: RateLimits, clock: Clock, store: Store | None = None) -> Limiter:
    return Limiter(InMemoryCounters(), limits, store, clock=clock)


async def test_requests_per_minute_refuse_with_retry_after_and_do_not_count_refusals() -> None:
    clock = Clock(1_000_040.0)  # 20 s into a minute
    limits = RateLimits(user_requests_per_minute=3)
    lim = limiter(limits, clock)
    ann = Caller("ann")
    for _ in range(3):
        await lim.count_request(ann, limits)
    with pytest.raises(RateLimited) as refused:
        await lim.count_request(ann, limits)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    # Three in this window: room again once the window is over and the weight of those
    # three has fallen enough, i.e. 40 s + 20 s later.
    assert refused.value.retry_after_s == pytest.approx(60.0)
    await lim.count_request(Caller("bob"), limits)  # others are not affected
    clock.now += 60  # next window: 3 × 2/3 = 2 weighted, so one fits
    await lim.count_request(ann, limits)
    with pytest.raises(RateLimited):
        await lim.count_request(ann, limits)


async def test_per_key_limits_count_each_key_apart() -> None:
    clock = Clock(1_000_000.0)
    limits = RateLimits(key_requests_per_minute=1)
    lim = limiter(limits, clock)
    await lim.count_request(Caller("ann", "k1"), limits)
    await lim.count_request(Caller("ann", "k2"), limits)
    with pytest.raises(RateLimited, match="API key"):
        await lim.count_request(Caller("ann", "k1"), limits)


def test_wait_is_when_the_sliding_estimate_has_room() -> None:
    # 2 in the previous window, 1 now (+1 refused), limit 2, at 50 %: the estimate is
    # 1 + 2 × 0.5 = 2; one more fits once the previous weight is below 0.5, i.e. never in
    # this window; in the next: 1 × (1 - g) + 1 ≤ 2 at once.
    assert _wait(Window(2, 2), 30.0, 60, 2) == pytest.approx(30.0)
    # 0 now (+1 refused), 4 before, limit 2, at 0: needs 4(1 - f) ≤ 1 → f = 0.75.
    assert _wait(Window(1, 4), 0.0, 60, 2) == pytest.approx(45.0)


async def test_daily_tokens_refuse_until_midnight_utc() -> None:
    clock = Clock(DAY * 20_000 + 3600.0)  # 01:00 UTC
    limits = RateLimits(user_tokens_per_day=100)
    lim = limiter(limits, clock)
    ann = Caller("ann")
    assert await lim.tokens_exhausted(ann, limits) is None
    await lim.spend(ann, 100, limits)
    refusal = await lim.tokens_exhausted(ann, limits)
    assert isinstance(refusal, QuotaExceeded) and refusal.status == 429
    assert refusal.code == "quota_exceeded" and refusal.retry_after_s == DAY - 3600
    clock.now += DAY
    assert await lim.tokens_exhausted(ann, limits) is None


def admission(limits: RateLimits, store: Store | None = None, **kw: Any) -> Admission:
    clock = Clock(1_000_000.0)
    return Admission(
        limiter(limits, clock, store),
        lambda _model: QueuePolicy(1, 1, 5.0),
        metrics=Metrics(),
        **kw,
    )


async def test_admission_falls_back_to_a_cheaper_model_when_the_quota_ran_out() -> None:
    door = admission(RateLimits(user_tokens_per_day=10), fallback_model="fake:echo")
    ann = Caller("ann")
    assert await door.admit(ann, "fake:slow") == "fake:slow"
    await door.spend(ann, 10)
    assert await door.admit(ann, "fake:slow") == "fake:echo"
    without = admission(RateLimits(user_tokens_per_day=10))
    await without.spend(ann, 10)
    with pytest.raises(QuotaExceeded):
        await without.admit(ann, "fake:slow")


async def test_admission_refuses_a_full_queue_fast_and_counts_it() -> None:
    door = admission(RateLimits())
    hold = asyncio.Event()

    async def generate() -> None:
        async with door.slot("fake:slow", "ann"):
            await hold.wait()

    tasks = [asyncio.create_task(generate()) for _ in range(2)]
    await settle()
    started = time.perf_counter()
    with pytest.raises(Overloaded):
        await door.admit(Caller("ann"), "fake:slow")
    assert time.perf_counter() - started < 0.05
    hold.set()
    await asyncio.gather(*tasks)


async def test_the_admin_changes_limits_at_run_time_and_they_persist() -> None:
    store = Store()
    door = admission(RateLimits(user_requests_per_minute=0), store)
    ann = Caller("ann")
    await door.admit(ann, "fake:slow")
    changed = await door.limiter.update({"user_requests_per_minute": 1})
    assert changed.user_requests_per_minute == 1
    assert store.values["limits"] == {"user_requests_per_minute": 1}
    await door.admit(ann, "fake:slow")
    with pytest.raises(RateLimited):
        await door.admit(ann, "fake:slow")
    # Another process reads the same store.
    other = admission(RateLimits(), store)
    assert (await other.limiter.current()).user_requests_per_minute == 1
