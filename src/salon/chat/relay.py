"""A generation streamed live to a follower on another node.

The node that runs a job publishes its events (`publish`) on the job's channel of a
`Broadcast` (Redis pub/sub). A follower connected to another node reads them
(`Catching`) as long as they join onto the text it has; whenever they do not — it
subscribed late, a message was lost, the job ended, the channel fell silent — it reads the
store, which stays the source of truth. Without a broadcast, followers poll the store.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from salon.chat.jobs import Delta, Ended, GenerationJob, JobEvent
from salon.domain import MessageStatus
from salon.store.broadcast import Broadcast, Subscription

# While live text waits for the store to catch up, the store is read this often.
STORE_RECHECK_S = 0.1


def channel(message_id: int) -> str:
    return f"gen:{message_id}"


async def publish(job: GenerationJob, broadcast: Broadcast, start: int) -> None:
    """Every event of `job` after offset `start`, until it ends. A slow broadcast gets the
    text coalesced (`GenerationJob.follow`), never a backlog."""
    async for event in job.follow(start):
        await broadcast.publish(channel(job.message_id), encode(event))


class Catching:
    """A follower's position in a generation that another node runs: the text it has, from
    the store and, with a subscription, from the live events.

    Live text that does not join onto what the follower has (it subscribed after the store
    read, or a message was lost) waits in `ahead`, growing with the events that follow it,
    until the store has caught up with its start: the store lags the live events by up to
    one checkpoint interval, so without this a follower that once fell behind would only
    ever advance at the store's pace."""

    def __init__(self, have: int, live: Subscription | None = None) -> None:
        self.have = have
        self.live = live
        self._ahead: Delta | None = None
        self._recheck_at = 0.0

    def join(self, content: str) -> Delta | None:
        """The store's text after `have`, joined with what came ahead of it live."""
        end = max(self.have, len(content))
        text = content[self.have :]
        if self._ahead is not None:
            start = self._ahead.offset - len(self._ahead.text)
            if start <= end:
                text += self._ahead.text[end - start :]
                end = max(end, self._ahead.offset)
                self._ahead = None
        if end == self.have:
            return None
        self.have = end
        return Delta(end, text)

    async def deltas(self, silence_s: float) -> AsyncIterator[Delta]:
        """Live text after `have`, until the job ends, live text must wait for the store
        (checked every STORE_RECHECK_S), or nothing comes for `silence_s`: then the caller
        reads the store and `join`s it. Raises BroadcastUnavailable when the subscription
        breaks."""
        assert self.live is not None
        while True:
            wait_s = silence_s if self._ahead is None else self._recheck_at - time.monotonic()
            message = await self.live.next(wait_s) if wait_s > 0 else None
            if message is None:
                return
            event = decode(message)
            if isinstance(event, Ended):
                return
            start = event.offset - len(event.text)
            if self._ahead is not None:
                joined = start == self._ahead.offset
                self._ahead = (
                    Delta(event.offset, self._ahead.text + event.text) if joined else event
                )
            elif start > self.have:
                self._ahead = event
                self._recheck_at = time.monotonic() + STORE_RECHECK_S
            elif event.offset > self.have:
                yield Delta(event.offset, event.text[self.have - start :])
                self.have = event.offset


def encode(event: JobEvent) -> dict[str, Any]:
    if isinstance(event, Delta):
        return {"offset": event.offset, "text": event.text}
    return {"offset": event.offset, "status": event.status.value}


def decode(message: dict[str, Any]) -> JobEvent:
    offset = int(message["offset"])
    if "text" in message:
        return Delta(offset, str(message["text"]))
    # The follower reads how it ended (error, revision) from the store.
    return Ended(offset, MessageStatus(message["status"]), None, None)
