"""A generation job's text and its followers (offsets, coalescing, the end)."""

from __future__ import annotations

import asyncio

from salon.chat.jobs import Delta, Ended, GenerationJob
from salon.domain import MessageStatus


async def _collect(job: GenerationJob, have: int) -> list[Delta | Ended]:
    return [event async for event in job.follow(have)]


async def test_text_from_any_offset() -> None:
    job = GenerationJob(1, "c", "He")
    for piece in ["llo", ", ", "wör", "ld"]:
        job.append(piece)
    assert job.text() == "Hello, wörld"
    for start in range(len(job.text()) + 1):
        assert job.text(start) == "Hello, wörld"[start:]


async def test_a_late_follower_gets_the_missed_text_coalesced_then_live_events() -> None:
    job = GenerationJob(1, "c", "")
    job.append("a")
    job.append("b")
    follower = asyncio.create_task(_collect(job, 1))
    await asyncio.sleep(0)
    job.append("c")
    await asyncio.sleep(0)
    job.end(MessageStatus.COMPLETE)
    events = await follower
    assert events[0] == Delta(2, "b")
    assert events[1] == Delta(3, "c")
    assert events[-1] == Ended(3, MessageStatus.COMPLETE, None, None)


async def test_followers_at_the_end_get_only_the_end() -> None:
    job = GenerationJob(1, "c", "done")
    job.end(MessageStatus.STOPPED)
    assert await _collect(job, 4) == [Ended(4, MessageStatus.STOPPED, None, None)]


async def test_many_followers_see_the_same_text() -> None:
    job = GenerationJob(1, "c", "")
    followers = [asyncio.create_task(_collect(job, 0)) for _ in range(5)]
    for index in range(50):
        job.append(f"{index} ")
        if index % 7 == 0:
            await asyncio.sleep(0)
    job.end(MessageStatus.COMPLETE)
    for follower in followers:
        events = await follower
        text = "".join(e.text for e in events if isinstance(e, Delta))
        assert text == "".join(f"{i} " for i in range(50))
