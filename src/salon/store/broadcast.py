"""Messages between salon nodes: Redis pub/sub, used to stream a generation live to a
follower connected to another node than the one that runs it (chat/relay.py).

It is best-effort by design: a message lost or late only makes the follower read the store,
which stays the source of truth. So every call has short timeouts and no retries; a failed
publish is logged (once per `backoff_s`) and dropped, and a failed subscribe raises
`BroadcastUnavailable`, after which the caller polls the store as it does without Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

from salon.store.counters import redis_client, safe_url

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

log = logging.getLogger(__name__)


class BroadcastUnavailable(Exception):
    """The broadcast cannot be used now; poll the store instead."""


class Subscription(Protocol):
    async def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message on the channel, or None if none came within `timeout_s`."""
        ...


class Broadcast(Protocol):
    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        """Send `message` (JSON-serialisable) to the channel's current subscribers; never
        raises."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        """Messages published on `channel` from now on; raises BroadcastUnavailable."""
        ...

    async def close(self) -> None: ...


class RedisBroadcast:
    def __init__(
        self, url: str, *, prefix: str = "salon:", timeout_s: float = 0.25, backoff_s: float = 5.0
    ) -> None:
        self._client = redis_client(url, timeout_s)
        self._url = url
        self._prefix = prefix
        self._deadline_s = 2 * timeout_s
        self._backoff_s = backoff_s
        self._warned_at = float("-inf")

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._client.publish(self._prefix + channel, json.dumps(message))
        except Exception as exc:  # best-effort: followers fall back to the store
            self._warn("publish", exc)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        pubsub = self._client.pubsub()
        try:
            try:
                async with asyncio.timeout(self._deadline_s):
                    await pubsub.subscribe(self._prefix + channel)
            except Exception as exc:
                self._warn("subscribe", exc)
                raise BroadcastUnavailable(str(exc) or type(exc).__name__) from exc
            yield _RedisSubscription(pubsub)
        finally:
            try:
                async with asyncio.timeout(self._deadline_s):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception:  # a dead connection must not fail the follower
                log.debug("closing a Redis subscription failed", exc_info=True)

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= self._backoff_s:
            self._warned_at = now
            log.warning(
                "Redis at %s: %s failed (%s); followers on other nodes read the store",
                safe_url(self._url),
                what,
                type(exc).__name__,
            )

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._client.aclose()
        except Exception:
            log.debug("closing the Redis client failed", exc_info=True)


class _RedisSubscription:
    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub

    async def next(self, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            except Exception as exc:
                raise BroadcastUnavailable(type(exc).__name__) from exc
            if raw is not None and raw.get("type") == "message":
                data: dict[str, Any] = json.loads(raw["data"])
                return data
        return None
