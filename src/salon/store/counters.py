"""Windowed counters behind rate limits and quotas: in this process, or shared through Redis.

A counter is kept per fixed window (`window_s` seconds, aligned on the Unix epoch, so a day
is a UTC day); `add` returns the current window's total and the previous one's, which is
all a sliding-window estimate needs. Both stores answer the same `Counters` protocol.

Redis must never make a request hang: every call has short socket timeouts, no retries and
an overall deadline; on any failure `RedisCounters` logs a warning, counts in this process
instead, and leaves Redis alone for `backoff_s` before trying again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from salon.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

# Stale in-memory entries are swept once the table grows past this many keys.
SWEEP_AT = 50_000


@dataclass(frozen=True, slots=True)
class Window:
    current: int  # in the window that contains `now`
    previous: int  # in the window just before it


class Counters(Protocol):
    async def add(self, key: str, amount: int, window_s: int, now: float) -> Window:
        """Adds `amount` (may be negative) to the key's counter in `now`'s window."""
        ...

    async def read(self, key: str, window_s: int, now: float) -> Window: ...

    async def close(self) -> None: ...


class InMemoryCounters:
    """Counters of this process alone: a dict of (key, window) → (index, current, previous)."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, int], tuple[int, int, int]] = {}

    async def add(self, key: str, amount: int, window_s: int, now: float) -> Window:
        return self.add_now(key, amount, window_s, now)

    async def read(self, key: str, window_s: int, now: float) -> Window:
        return self.add_now(key, 0, window_s, now)

    def add_now(self, key: str, amount: int, window_s: int, now: float) -> Window:
        """`add` without the coroutine, for callers that cannot await (the Redis fallback)."""
        index = int(now // window_s)
        stored_index, current, previous = self._data.get((key, window_s), (index, 0, 0))
        if stored_index == index - 1:
            current, previous = 0, current
        elif stored_index != index:
            current, previous = 0, 0
        current += amount
        if amount:
            self._data[(key, window_s)] = (index, current, previous)
            if len(self._data) > SWEEP_AT:
                self._sweep(now)
        return Window(current, previous)

    def _sweep(self, now: float) -> None:
        """Drop counters two windows old: they can no longer count."""
        self._data = {k: v for k, v in self._data.items() if v[0] >= int(now // k[1]) - 1}

    async def close(self) -> None:
        return None


class RedisCounters:
    """Counters shared by every process that uses the same Redis and `prefix`.

    One round trip per call (a pipeline without MULTI: INCRBY, EXPIRE, GET). Windows expire
    on their own two windows later, so nothing needs cleaning up."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "salon:",
        timeout_s: float = 0.25,
        backoff_s: float = 5.0,
        fallback: InMemoryCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = redis_client(url, timeout_s)
        self._url = url
        self._prefix = prefix
        self._deadline_s = 2 * timeout_s  # connect + command, whatever the socket does
        self._backoff_s = backoff_s
        self.fallback = fallback or InMemoryCounters()
        self._clock = clock
        self._down_until = 0.0  # monotonic time before which Redis is not tried

    @property
    def degraded(self) -> bool:
        """Counting in this process because Redis failed recently."""
        return self._clock() < self._down_until

    async def add(self, key: str, amount: int, window_s: int, now: float) -> Window:
        if self.degraded:
            return self.fallback.add_now(key, amount, window_s, now)
        current, previous = self._keys(key, window_s, now)
        try:
            async with asyncio.timeout(self._deadline_s):
                pipe = self._client.pipeline(transaction=False)
                pipe.incrby(current, amount)
                pipe.expire(current, 2 * window_s + 60)
                pipe.get(previous)
                total, _, before = await pipe.execute()
        except Exception as exc:  # any failure of the store: never the request's failure
            self._failed(exc)
            return self.fallback.add_now(key, amount, window_s, now)
        self._recovered()
        return Window(int(total), int(before or 0))

    async def read(self, key: str, window_s: int, now: float) -> Window:
        if self.degraded:
            return self.fallback.add_now(key, 0, window_s, now)
        current, previous = self._keys(key, window_s, now)
        try:
            async with asyncio.timeout(self._deadline_s):
                values = await self._client.mget([current, previous])
        except Exception as exc:
            self._failed(exc)
            return self.fallback.add_now(key, 0, window_s, now)
        self._recovered()
        return Window(int(values[0] or 0), int(values[1] or 0))

    def _keys(self, key: str, window_s: int, now: float) -> tuple[str, str]:
        index = int(now // window_s)
        base = f"{self._prefix}{key}:{window_s}:"
        return f"{base}{index}", f"{base}{index - 1}"

    def _failed(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning(
                "Redis at %s failed (%s); counting limits in this process for %.0f s",
                safe_url(self._url),
                type(exc).__name__,
                self._backoff_s,
            )
        self._down_until = self._clock() + self._backoff_s

    def _recovered(self) -> None:
        if self._down_until:
            log.warning("Redis at %s is back; limits are shared again", safe_url(self._url))
            self._down_until = 0.0

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._client.aclose()
        except Exception:  # closing a dead connection must not fail the shutdown
            log.debug("closing the Redis client failed", exc_info=True)


def redis_client(url: str, timeout_s: float) -> Redis:
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:  # pragma: no cover - redis is a dependency
        raise ConfigError("redis_url is set but the redis package is not installed") from exc
    # No retries and short timeouts: a dead Redis costs one failed call, then the backoff.
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
    )


def safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"
