"""Joining live text onto what a follower has (chat/relay.py), with scripted events."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from salon.chat.jobs import Delta, Ended
from salon.chat.relay import Catching, decode, encode
from salon.domain import MessageStatus

TEXT = "The quick brown fox jumps over the lazy dog"


class Scripted:
    """A subscription that returns the given messages, then silence."""

    def __init__(self, events: list[Delta | Ended]) -> None:
        self._messages = [encode(event) for event in events]

    async def next(self, timeout_s: float) -> dict[str, Any] | None:
        return self._messages.pop(0) if self._messages else None


def pieces(*bounds: int) -> list[Delta]:
    """Deltas of TEXT cut at `bounds`."""
    edges = [0, *bounds, len(TEXT)]
    return [Delta(end, TEXT[start:end]) for start, end in pairwise(edges)]


async def _drain(position: Catching) -> str:
    return "".join([delta.text async for delta in position.deltas(0.01)])


async def test_live_text_that_joins_is_passed_on_and_an_end_stops_it() -> None:
    events: list[Delta | Ended] = [*pieces(4, 10, 16)]
    events.append(Ended(len(TEXT), MessageStatus.COMPLETE, None, None))
    position = Catching(4, Scripted(events[1:]))
    assert await _drain(position) == TEXT[4:]
    assert position.have == len(TEXT)


async def test_text_ahead_of_the_store_waits_for_it_then_joins() -> None:
    # The follower has 4 characters; live text starts at 10 (it subscribed late) and goes on.
    position = Catching(4, Scripted(pieces(4, 10, 16, 25)[2:]))
    assert await _drain(position) == ""  # nothing joins yet
    assert position.join(TEXT[:8]) == Delta(8, TEXT[4:8])  # the store, still behind
    assert position.join(TEXT[:12]) == Delta(len(TEXT), TEXT[8:])  # caught up: all of it
    assert position.join(TEXT[:20]) is None  # nothing new


async def test_a_lost_message_is_covered_by_the_store() -> None:
    first, _lost, third, fourth = pieces(10, 16, 25)
    position = Catching(0, Scripted([first, third, fourth]))
    assert await _drain(position) == TEXT[:10]
    assert position.join(TEXT[:16]) == Delta(len(TEXT), TEXT[10:])


def test_events_survive_their_encoding() -> None:
    delta = Delta(12, "héllo ✓")
    assert decode(encode(delta)) == delta
    ended = decode(encode(Ended(3, MessageStatus.STOPPED, "why", "code")))
    assert isinstance(ended, Ended) and (ended.offset, ended.status) == (3, MessageStatus.STOPPED)
