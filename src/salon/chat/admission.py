"""Admission control: who may generate now, who waits, who is refused.

Every generation (a /v1 completion, a web-app job) passes one door, `Admission`:

1. `admit` — the caller's limits, before anything is stored or sent: completion tokens per
   day (429 `quota_exceeded`, or the fallback model when one is configured), room in the
   model's queue (503 `overloaded`, at once: the queue is full, or the newcomer's expected
   wait is longer than `max_wait_s`), requests per minute (429
   `rate_limit_exceeded`). Counters live in a `Counters` store (this process, or Redis).
2. `slot` — one of the model's `max_concurrent` generation slots, held for the whole
   generation and released however it ends. When none is free the request waits in the
   model's bounded queue; waiting users are served fairly (below); a wait longer than
   `queue_timeout_s` is refused (503 `overloaded`); a cancelled wait leaves the queue.
3. `spend` — the completion tokens the generation produced, counted against the quotas.

Fairness: when a slot frees, it goes to the waiting user with the fewest slots in use, ties
to the one served longest ago; each user's own requests keep their order. When the queue is
full, a newcomer takes the place of the newest waiter of a user who has at least two more
waiting than the newcomer would: one user flooding the queue cannot lock others out of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

from salon.errors import Overloaded, QuotaExceeded, RateLimited
from salon.observability.metrics import Metrics, QueueMetrics
from salon.store.counters import Counters, Window

log = logging.getLogger(__name__)

MINUTE = 60
DAY = 86_400
# Admin overrides are re-read this often, so that every process sees a change soon.
REFRESH_S = 10.0
SETTING = "limits"  # the instance setting that holds the admin's overrides
# Weight of the newest slot hold time in the average behind Retry-After.
EMA_WEIGHT = 0.2


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    max_concurrent: int  # 0 = no limit (no queue either)
    max_queue: int
    queue_timeout_s: float
    # A newcomer whose expected wait (the average slot hold time × the queue ahead, per
    # slot) is longer than this is refused at once instead of queued; None: the queue
    # timeout, so that a request that would most likely time out waiting is told at once.
    max_wait_s: float | None = None

    @property
    def wait_bound_s(self) -> float:
        return self.queue_timeout_s if self.max_wait_s is None else self.max_wait_s


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: str
    key_id: str | None = None  # the API key, on /v1; None in the web app


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-caller limits; 0 = unlimited. The admin may change every one at run time."""

    user_requests_per_minute: int = 0
    user_tokens_per_day: int = 0
    key_requests_per_minute: int = 0
    key_tokens_per_day: int = 0

    @property
    def counts_tokens(self) -> bool:
        return bool(self.user_tokens_per_day or self.key_tokens_per_day)

    @property
    def any(self) -> bool:
        return any(asdict(self).values())


RATE_LIMIT_NAMES = tuple(f.name for f in fields(RateLimits))


class SettingStore(Protocol):
    """Where the admin's overrides persist (AccountStore's instance settings)."""

    async def get_setting(self, key: str, default: Any) -> Any: ...

    async def set_setting(self, key: str, value: Any) -> None: ...


# -- one model's slots and queue ---------------------------------------------------------


class ModelQueue:
    def __init__(
        self,
        model_id: str,
        policy: QueuePolicy,
        metrics: QueueMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self.policy = policy
        self._metrics = metrics
        self._clock = clock
        self.in_flight = 0
        self.depth = 0  # waiters, all users together
        # Invariant: someone waits only while every slot is taken.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._held: Counter[str] = Counter()  # slots in use per user
        self._served: dict[str, int] = {}  # user → tick of their last grant
        self._ticks = itertools.count()
        self._hold_s = 0.0  # moving average of how long a slot is held

    @property
    def unlimited(self) -> bool:
        return self.policy.max_concurrent <= 0

    def check_room(self, user: str) -> None:
        """Raise Overloaded now if a request of `user` would be refused at once."""
        if not self.unlimited and not self._room_for(user):
            self._refused("queue_full")
            raise Overloaded(
                f"{self.model_id} is at capacity ({self.in_flight} generating, "
                f"{self.depth} waiting); try again shortly",
                retry_after_s=self._retry_after(),
            )

    @asynccontextmanager
    async def slot(self, user: str) -> AsyncIterator[None]:
        """A generation slot for the body of the `async with`, released however it ends."""
        if self.unlimited:
            yield
            return
        await self._acquire(user)
        started = self._clock()
        try:
            yield
        finally:
            self._release(user, self._clock() - started)

    # -- waiting -----------------------------------------------------------------------

    async def _acquire(self, user: str) -> None:
        if self.in_flight < self.policy.max_concurrent and not self.depth:
            self._grant(user)
            return
        self.check_room(user)
        waiter = self._enter(user)
        try:
            async with asyncio.timeout(self.policy.queue_timeout_s):
                await waiter
        except (TimeoutError, asyncio.CancelledError) as exc:
            if _granted(waiter):  # the slot came as the wait ended
                if isinstance(exc, TimeoutError):
                    return
                self._release(user, 0.0)
                raise
            self._leave(user, waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._refused("queue_timeout")
            raise Overloaded(
                f"waited {self.policy.queue_timeout_s:g} s for {self.model_id} without a "
                "free slot; try again later",
                retry_after_s=self._retry_after(),
            ) from None

    def _room_for(self, user: str) -> bool:
        if self.in_flight < self.policy.max_concurrent and not self.depth:
            return True
        if self._expected_wait_s() > self.policy.wait_bound_s:
            return False
        return self.depth < self.policy.max_queue or self._victim(user) is not None

    def _expected_wait_s(self) -> float:
        """A newcomer's likely wait: 0 until a slot hold time has been measured."""
        return self._hold_s * (self.depth + 1) / max(1, self.policy.max_concurrent)

    def _victim(self, user: str) -> str | None:
        """A user whose newest waiter may give its place to `user` (fair share of places)."""
        mine = len(self._waiting.get(user, ()))
        others = [(len(q), u) for u, q in self._waiting.items() if u != user]
        if not others:
            return None
        most, victim = max(others)
        return victim if most >= mine + 2 else None

    def _enter(self, user: str) -> asyncio.Future[None]:
        if self.depth >= self.policy.max_queue:
            victim = self._victim(user)
            assert victim is not None  # check_room said there is room
            self._displace(victim)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user, deque()).append(waiter)
        self.depth += 1
        self._changed()
        return waiter

    def _displace(self, victim: str) -> None:
        queue = self._waiting[victim]
        waiter = queue.pop()
        self._drop_empty(victim)
        self.depth -= 1
        self._refused("queue_full")
        waiter.set_exception(
            Overloaded(
                f"{self.model_id} is at capacity and you have the most requests waiting; "
                "try again shortly",
                retry_after_s=self._retry_after(),
            )
        )

    def _leave(self, user: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(user)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.depth -= 1
            self._drop_empty(user)
            self._changed()

    def _drop_empty(self, user: str) -> None:
        if not self._waiting[user]:
            del self._waiting[user]
            if not self._held[user]:
                self._served.pop(user, None)

    # -- slots -------------------------------------------------------------------------

    def _grant(self, user: str) -> None:
        self.in_flight += 1
        self._held[user] += 1
        self._served[user] = next(self._ticks)
        self._changed()

    def _release(self, user: str, held_s: float) -> None:
        self.in_flight -= 1
        self._held[user] -= 1
        if not self._held[user]:
            del self._held[user]
            if user not in self._waiting:
                self._served.pop(user, None)
        self._hold_s = (
            held_s if not self._hold_s else self._hold_s + EMA_WEIGHT * (held_s - self._hold_s)
        )
        self._serve_next()
        self._changed()

    def _serve_next(self) -> None:
        while self.depth and self.in_flight < self.policy.max_concurrent:
            user = min(self._waiting, key=lambda u: (self._held[u], self._served.get(u, -1)))
            waiter = self._waiting[user].popleft()
            self._drop_empty(user)
            self.depth -= 1
            if waiter.done():  # cancelled, its task not yet resumed to leave
                continue
            self._grant(user)
            waiter.set_result(None)

    def _retry_after(self) -> float:
        """When a place is likely: the average hold time per slot for everyone ahead."""
        estimate = self._expected_wait_s() or 1.0
        return min(max(estimate, 1.0), self.policy.queue_timeout_s)

    def _changed(self) -> None:
        if self._metrics is not None:
            self._metrics.depth.set(self.depth)
            self._metrics.in_flight.set(self.in_flight)

    def _refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.refused(reason)


def _granted(waiter: asyncio.Future[None]) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


# -- per-caller limits -------------------------------------------------------------------


class Limiter:
    """Requests per minute (a sliding window over two fixed ones) and completion tokens per
    UTC day, per user and per API key, counted in a `Counters` store."""

    def __init__(
        self,
        counters: Counters,
        defaults: RateLimits,
        store: SettingStore | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters
        self._defaults = defaults
        self._store = store
        self._clock = clock
        self._monotonic = monotonic
        self._limits = defaults
        self._loaded_at: float | None = None

    async def current(self) -> RateLimits:
        """The defaults with the admin's overrides, re-read every REFRESH_S."""
        now = self._monotonic()
        if self._store is not None and (
            self._loaded_at is None or now - self._loaded_at > REFRESH_S
        ):
            self._loaded_at = now
            try:
                stored = await self._store.get_setting(SETTING, {})
            except Exception:  # the limits in force stay; the next refresh tries again
                log.warning("could not read the admin's limits", exc_info=True)
            else:
                self._limits = _merge(self._defaults, stored)
        return self._limits

    async def update(self, changes: Mapping[str, int]) -> RateLimits:
        """The admin's change, kept in the store and in force here at once."""
        stored: dict[str, int] = {}
        if self._store is not None:
            stored = dict(await self._store.get_setting(SETTING, {}) or {})
        stored.update({k: int(v) for k, v in changes.items() if k in RATE_LIMIT_NAMES})
        if self._store is not None:
            await self._store.set_setting(SETTING, stored)
        self._limits = _merge(self._defaults, stored)
        self._loaded_at = self._monotonic()
        return self._limits

    async def tokens_exhausted(self, caller: Caller, limits: RateLimits) -> QuotaExceeded | None:
        """The refusal when a daily token quota is used up, else None."""
        now = self._clock()
        for key, limit in _scopes(caller, limits.user_tokens_per_day, limits.key_tokens_per_day):
            used = (await self.counters.read(f"tpd:{key}", DAY, now)).current
            if used >= limit:
                who = "this API key" if key.startswith("key:") else "your account"
                return QuotaExceeded(
                    f"{who} used its {limit} completion tokens for today (UTC); "
                    "the quota resets at midnight UTC",
                    retry_after_s=DAY - now % DAY,
                )
        return None

    async def count_request(self, caller: Caller, limits: RateLimits) -> None:
        """Counts one request; raises RateLimited (and counts nothing) when over a limit."""
        now = self._clock()
        counted: list[str] = []
        scopes = _scopes(caller, limits.user_requests_per_minute, limits.key_requests_per_minute)
        for key, limit in scopes:
            window = await self.counters.add(f"rpm:{key}", 1, MINUTE, now)
            counted.append(key)
            if _estimate(window, now, MINUTE) > limit:
                # A refused request does not count, so Retry-After stays true for a client
                # that honours it.
                for done in counted:
                    await self.counters.add(f"rpm:{done}", -1, MINUTE, now)
                who = "this API key" if key.startswith("key:") else "your account"
                raise RateLimited(
                    f"{who} is over its limit of {limit} requests per minute",
                    retry_after_s=_wait(window, now, MINUTE, limit),
                )

    async def spend(self, caller: Caller, tokens: int, limits: RateLimits) -> None:
        if tokens <= 0 or not limits.counts_tokens:
            return
        now = self._clock()
        for key, _ in _scopes(caller, limits.user_tokens_per_day, limits.key_tokens_per_day):
            await self.counters.add(f"tpd:{key}", tokens, DAY, now)


def _scopes(caller: Caller, user_limit: int, key_limit: int) -> list[tuple[str, int]]:
    scopes = [(f"user:{caller.user_id}", user_limit)]
    if caller.key_id is not None:
        scopes.append((f"key:{caller.key_id}", key_limit))
    return [(key, limit) for key, limit in scopes if limit > 0]


def _merge(defaults: RateLimits, stored: Any) -> RateLimits:
    if not isinstance(stored, dict):
        return defaults
    valid = {k: int(v) for k, v in stored.items() if k in RATE_LIMIT_NAMES and int(v) >= 0}
    return replace(defaults, **valid)


def _estimate(window: Window, now: float, window_s: int) -> float:
    """Requests in the last `window_s`, the previous window weighted by its overlap."""
    elapsed = (now % window_s) / window_s
    return window.current + window.previous * (1 - elapsed)


def _wait(window: Window, now: float, window_s: int, limit: int) -> float:
    """Seconds until one more request fits. `window` includes the refused request, so
    `window.current` is what the estimate must make room beside."""
    current, previous = window.current - 1, window.previous
    elapsed = (now % window_s) / window_s
    if current + 1 <= limit and previous:
        # Within this window, as the previous one's weight falls.
        needed = 1 - (limit - current - 1) / previous
        return max(0.0, needed - elapsed) * window_s
    # Next window: this one becomes the previous, weighted by what is left of it.
    into_next = max(0.0, 1 - (limit - 1) / current) if current else 0.0
    return (1 - elapsed + into_next) * window_s


# -- the door ----------------------------------------------------------------------------


class Admission:
    def __init__(
        self,
        limiter: Limiter,
        policy: Callable[[str], QueuePolicy],
        *,
        metrics: Metrics | None = None,
        fallback_model: str | None = None,
    ) -> None:
        self.limiter = limiter
        self._policy = policy
        self._metrics = metrics
        self._fallback = fallback_model
        self._queues: dict[str, ModelQueue] = {}

    def queue(self, model_id: str) -> ModelQueue:
        found = self._queues.get(model_id)
        if found is None:
            metrics = self._metrics.queue(model_id) if self._metrics is not None else None
            found = self._queues[model_id] = ModelQueue(model_id, self._policy(model_id), metrics)
        return found

    async def admit(self, caller: Caller, model_id: str) -> str:
        """The caller's limits and room in the queue; returns the model to use: `model_id`,
        or the fallback model when a token quota ran out and one is configured."""
        limits = await self.limiter.current()
        if limits.any:
            model_id = await self._within_quota(caller, model_id, limits)
        self.queue(model_id).check_room(caller.user_id)
        if limits.user_requests_per_minute or limits.key_requests_per_minute:
            try:
                await self.limiter.count_request(caller, limits)
            except RateLimited:
                self._refused(model_id, "rate_limit")
                raise
        return model_id

    async def _within_quota(self, caller: Caller, model_id: str, limits: RateLimits) -> str:
        if not limits.counts_tokens:
            return model_id
        refusal = await self.limiter.tokens_exhausted(caller, limits)
        if refusal is None:
            return model_id
        if self._fallback and self._fallback != model_id:
            log.info("user %s is over a token quota: served by %s", caller.user_id, self._fallback)
            return self._fallback
        self._refused(model_id, "quota")
        raise refusal

    def slot(self, model_id: str, user_id: str) -> AbstractAsyncContextManager[None]:
        """One of the model's slots for the whole generation (see ModelQueue.slot)."""
        return self.queue(model_id).slot(user_id)

    async def spend(self, caller: Caller, tokens: int) -> None:
        """Completion tokens produced, counted against the daily quotas. Never raises: the
        answer is already given."""
        try:
            await self.limiter.spend(caller, tokens, await self.limiter.current())
        except Exception:
            log.warning("could not count %d tokens for %s", tokens, caller.user_id, exc_info=True)

    def _refused(self, model_id: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.queue(model_id).refused(reason)

    async def close(self) -> None:
        await self.limiter.counters.close()
