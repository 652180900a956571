"""Generations as server-side jobs, independent of any HTTP connection.

A job streams from a backend into memory and, batched, into the store. Any number of
followers attach and detach without affecting it. Positions in a message are character
offsets, so a follower that re-attaches with the offset it already has (SSE
`Last-Event-ID`) gets exactly the rest: no duplicates, no gaps — whether the job is still
in memory, has finished, or ran in a process that died (then the store has the text).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from salon.backends.registry import ModelRoute
from salon.chat.admission import Admission, Caller
from salon.chat.loops import LoopWatch
from salon.chat.personal import Enforcement
from salon.chat.safety import Recovery
from salon.domain import CompletionRequest, MessageStatus, StreamEvent, TextDelta, Usage
from salon.errors import SalonError
from salon.personalization.checks import CheckResult
from salon.personalization.enforce import StreamEnforcer
from salon.safety.refusal import RefusalVerdict
from salon.store.conversations import Checkpoint, ConversationStore

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class Delta:
    offset: int  # length of the message text once this piece is appended
    text: str


@dataclass(frozen=True, slots=True)
class Ended:
    offset: int
    status: MessageStatus
    error: str | None
    code: str | None
    # A revision that follows the settings better replaces this answer (a sibling).
    revised_by: int | None = None


JobEvent = Delta | Ended
# Starts a revision of a finished answer that failed checks; returns its message id.
Revise = Callable[["GenerationJob", list[CheckResult]], Awaitable[int | None]]
# Publishes a job's events after the given offset to other nodes, until it ends.
Publish = Callable[["GenerationJob", int], Coroutine[Any, Any, None]]


LOOP_NOTE = "The model kept repeating itself, so salon stopped this answer."


class GenerationJob:
    def __init__(self, message_id: int, conversation_id: str, initial_text: str) -> None:
        self.message_id = message_id
        self.conversation_id = conversation_id
        self._chunks: list[str] = [initial_text]
        self._ends: list[int] = [len(initial_text)]
        self._changed = asyncio.Event()
        self.ended: Ended | None = None
        self.usage: Usage | None = None
        self.task: asyncio.Task[None] | None = None
        # What a cancellation means: the user pressed stop, or the server is going down.
        self.cancel_status = MessageStatus.STOPPED
        # What the safety layer did (e.g. a recovery from a refusal), stored with the answer.
        self.safety: dict[str, Any] | None = None
        # Deterministic repairs the text passes through before anyone sees it.
        self.enforcer: StreamEnforcer | None = None
        self._raw: list[str] = []  # what the model wrote, before the enforcer
        # The checks' record, stored with the answer.
        self.personalization: dict[str, Any] | None = None
        self.revised_by: int | None = None
        self.started = time.monotonic()
        # Whose generation it is: fairness in the model's queue and token quotas.
        self.user_id = ""
        # A model that falls into a loop is stopped (`loops`): the answer is kept, marked.
        self.loops = LoopWatch()

    @property
    def length(self) -> int:
        return self._ends[-1]

    def text(self, start: int = 0) -> str:
        index = bisect.bisect_right(self._ends, start)
        if index >= len(self._chunks):
            return ""
        first_start = self._ends[index - 1] if index else 0
        head = self._chunks[index][start - first_start :]
        return head + "".join(self._chunks[index + 1 :])

    def emit(self, text: str) -> None:
        """Generated text, through the enforcer when there is one."""
        self.loops.feed(text)
        released = text
        if self.enforcer is not None:
            self._raw.append(text)
            released = self.enforcer.feed(text)
        if released:
            self.append(released)

    @property
    def raw_text(self) -> str:
        return "".join(self._raw)

    @property
    def enough(self) -> bool:
        """Stop generating: the enforcer has all it may release (a length bound), or the
        model has fallen into a loop."""
        return self.loops.looping or (self.enforcer is not None and self.enforcer.done)

    def append(self, text: str) -> None:
        self._chunks.append(text)
        self._ends.append(self.length + len(text))
        self._wake()

    def end(self, status: MessageStatus, error: str | None = None, code: str | None = None) -> None:
        self.ended = Ended(self.length, status, error, code, self.revised_by)
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, have: int) -> AsyncIterator[JobEvent]:
        """Everything after offset `have`, then live events until the job ends. A slow
        follower gets the text it missed coalesced into one delta, never a backlog."""
        sent = have
        while True:
            changed = self._changed
            if self.length > sent:
                piece = self.text(sent)
                sent += len(piece)
                yield Delta(sent, piece)
                continue
            if self.ended is not None:
                yield self.ended
                return
            await changed.wait()


class JobRunner:
    """Starts, tracks and stops generation jobs; owns their persistence."""

    def __init__(
        self,
        store: ConversationStore,
        flush_interval_s: float,
        clock: Clock,
        admission: Admission | None = None,
        publish: Publish | None = None,
    ) -> None:
        self._store = store
        self._flush_interval_s = flush_interval_s
        self._clock = clock
        self._jobs: dict[int, GenerationJob] = {}
        # Without it (tests, tools) a job generates at once, unlimited.
        self._admission = admission
        # Streams each job to followers on other nodes (chat/relay.py), when there are any.
        self._publish = publish
        self._publishing: set[asyncio.Task[None]] = set()

    def get(self, message_id: int) -> GenerationJob | None:
        return self._jobs.get(message_id)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def running_in(self, conversation_id: str) -> list[GenerationJob]:
        return [j for j in self._jobs.values() if j.conversation_id == conversation_id]

    def start(
        self,
        message_id: int,
        conversation_id: str,
        route: ModelRoute,
        request: CompletionRequest,
        initial_text: str = "",
        recovery: Recovery | None = None,
        enforcement: Enforcement | None = None,
        revise: Revise | None = None,
        user_id: str = "",
    ) -> GenerationJob:
        """With `recovery`, the start of the answer is held back until the refusal detector
        has judged it; a refusal is then dropped and the request re-asked once. With
        `enforcement`, the text passes the deterministic repairs, the answer is checked at
        the end, and `revise` is asked for a revision when only a new answer can repair it."""
        job = GenerationJob(message_id, conversation_id, initial_text)
        job.user_id = user_id
        if enforcement is not None:
            job.enforcer = enforcement.enforcer()
        self._jobs[message_id] = job
        job.task = asyncio.create_task(
            self._run(job, route, request, recovery, enforcement, revise), name=f"job-{message_id}"
        )
        if self._publish is not None:
            publishing = asyncio.create_task(self._publish(job, len(initial_text)))
            self._publishing.add(publishing)
            publishing.add_done_callback(self._publishing.discard)
        return job

    async def stop(self, message_id: int, status: MessageStatus = MessageStatus.STOPPED) -> bool:
        job = self._jobs.get(message_id)
        if job is None or job.task is None:
            return False
        job.cancel_status = status
        job.task.cancel()
        await asyncio.wait({job.task})
        return True

    async def drain(self, grace_s: float) -> None:
        """Let running generations finish, for at most `grace_s` (a graceful shutdown:
        new requests are no longer accepted by then)."""
        tasks = {job.task for job in self._jobs.values() if job.task is not None}
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)

    async def shutdown(self) -> None:
        """Whatever is still running when the process stops is kept, marked incomplete."""
        for message_id in list(self._jobs):
            await self.stop(message_id, MessageStatus.INCOMPLETE)
        if self._publishing:  # their last events, for followers on other nodes
            await asyncio.wait(self._publishing, timeout=1.0)

    async def _run(
        self,
        job: GenerationJob,
        route: ModelRoute,
        request: CompletionRequest,
        recovery: Recovery | None = None,
        enforcement: Enforcement | None = None,
        revise: Revise | None = None,
    ) -> None:
        try:
            usage = await self._admitted(job, route, request, recovery)
            if job.loops.looping:
                # Kept as written (it was shown as it streamed), marked so the user knows why
                # it ends there and can regenerate; not checked or revised.
                if job.enforcer is not None and (tail := job.enforcer.finish()):
                    job.append(tail)
                await self._finish(
                    job, MessageStatus.STOPPED, usage=usage, error=LOOP_NOTE, code="repetition"
                )
                return
            if enforcement is not None:
                await self._settle(job, enforcement, revise)
            await self._finish(job, MessageStatus.COMPLETE, usage=usage)
        except asyncio.CancelledError:
            await self._finish(job, job.cancel_status)
        except SettledElsewhere:
            # Stopped through another node, or this node was taken for dead: the row's
            # status stands (`_finish` keeps it) and the text generated so far is added.
            await self._finish(job, MessageStatus.STOPPED)
        except SalonError as exc:
            await self._finish(job, MessageStatus.ERROR, error=exc.message, code=exc.code)
        except Exception:
            log.exception("generation %s failed", job.message_id)
            await self._finish(
                job, MessageStatus.ERROR, error="internal error", code="internal_error"
            )
        finally:
            self._jobs.pop(job.message_id, None)

    async def _admitted(
        self,
        job: GenerationJob,
        route: ModelRoute,
        request: CompletionRequest,
        recovery: Recovery | None,
    ) -> Usage | None:
        """The generation inside one of the model's slots (waiting in its queue if need be),
        its tokens counted against the user's quota however it ends. A revision (started by
        `_settle`) takes a slot of its own, so this one is released before it."""
        admission = self._admission
        if admission is None:
            return await self._generate(job, route, request, recovery)
        user = job.user_id or job.conversation_id
        start, usage = job.length, None
        async with admission.slot(route.id, user):
            try:
                usage = await self._generate(job, route, request, recovery)
                return usage
            finally:
                # Without the backend's usage: about four characters a token.
                tokens = usage.completion_tokens if usage else (job.length - start + 3) // 4
                await admission.spend(Caller(user), tokens)

    async def _settle(
        self, job: GenerationJob, enforcement: Enforcement, revise: Revise | None
    ) -> None:
        """Release what the enforcer held, check the answer, and have it revised when a
        failed check needs a new answer (and the first one was quick enough to redo)."""
        assert job.enforcer is not None
        tail = job.enforcer.finish()
        if tail:
            job.append(tail)
        note, failed = enforcement.judge(job.text(), job.enforcer.fixes)
        if job.enforcer.fixes:
            # The model's own words stay available: "adjusted" is visible, never silent.
            note["original"] = job.raw_text
        # Stopped at a length bound: the model was going on past it.
        note["cut"] = job.enforcer.done
        job.personalization = note
        if failed and revise is not None:
            job.revised_by = await revise(job, failed)
            if job.revised_by is not None:
                note["revised_by"] = job.revised_by

    async def _generate(
        self,
        job: GenerationJob,
        route: ModelRoute,
        request: CompletionRequest,
        recovery: Recovery | None = None,
    ) -> Usage | None:
        if recovery is None or job.length:
            return await self._relay(job, route.backend.stream(request))
        stream = _Timed(route.backend.stream(request))
        try:
            held, usage, ended = await _hold(stream, recovery)
            verdict = recovery.judge(held, finished=ended)
            if recovery.is_refusal(verdict):
                confirmed = await recovery.confirmed()
                if confirmed is not None:
                    # Never shown to anyone: the job's text is still empty. Stop the first
                    # generation, then ask once more.
                    await stream.aclose()
                    return await self._reask(job, route, request, confirmed, verdict)
                # The refusal stands, and the answer ends with it (the rest is never shown).
                kept = recovery.refusal_only(held)
                cut = len(kept) < len(held.rstrip()) or not ended
                job.safety = recovery.kept(verdict, cut=cut) or job.safety
                log.info("message %s: the refusal stands", job.message_id)
                if kept:
                    job.emit(kept)
                if not ended and recovery.sentence_end(kept) is None:
                    # the hold ended mid-sentence ("I'm sorry, but I can't"): finish it
                    await _finish_sentence(job, stream, recovery, kept)
                return usage if ended else None
            if held:
                job.emit(held)
            if ended:
                return usage
            return await self._relay(job, stream.rest())
        finally:
            await stream.aclose()

    async def _reask(
        self,
        job: GenerationJob,
        route: ModelRoute,
        request: CompletionRequest,
        recovery: Recovery,
        refusal: RefusalVerdict,
    ) -> Usage | None:
        """The one re-ask after a refusal: with the clarifying instruction, on the recovery
        model where there is one, and the answer started where that model continues it."""
        other = recovery.route(route)
        retry = replace(request, model=other.name, messages=recovery.reask(request.messages, other))
        usage = await self._relay(job, other.backend.stream(retry))
        second = recovery.judge(job.text(), finished=True)
        by = other.id if other is not route else None
        job.safety = recovery.note(refusal, second, by, prefilled=recovery.prefills(other))
        log.info("message %s: recovered from a refusal (%s)", job.message_id, job.safety)
        return usage

    async def _relay(self, job: GenerationJob, events: AsyncIterator[StreamEvent]) -> Usage | None:
        last_flush = time.monotonic()
        usage: Usage | None = None
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    job.emit(event.text)
                    if job.enough:
                        break
                    if time.monotonic() - last_flush >= self._flush_interval_s:
                        last_flush = time.monotonic()
                        saved = await self._store.update_content(
                            job.message_id, job.text(), self._clock()
                        )
                        if saved is Checkpoint.SETTLED:
                            raise SettledElsewhere
                else:
                    usage = event.usage
        finally:
            # Leaving early (a length bound) must end the backend's generation now.
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        return usage

    async def _finish(
        self,
        job: GenerationJob,
        status: MessageStatus,
        *,
        usage: Usage | None = None,
        error: str | None = None,
        code: str | None = None,
    ) -> None:
        # Persist before announcing: a follower that re-attaches after the job is gone
        # reads the final state from the store.
        job.usage = usage
        try:
            settled_here = await asyncio.shield(
                self._store.finish(
                    job.message_id,
                    content=job.text(),
                    status=status,
                    error=error,
                    usage=usage,
                    now=self._clock(),
                    safety=job.safety,
                    personalization=job.personalization,
                )
            )
            if not settled_here:
                status, error, code = await self._store.status(job.message_id), None, None
        finally:
            job.end(status, error, code)


class SettledElsewhere(Exception):
    """The job's message row was settled by another node (see store/nodes.py)."""


class _End:
    pass


_END = _End()
_TICK = _End()  # no event within the timeout; the wait for it goes on


async def _next(events: AsyncIterator[StreamEvent]) -> StreamEvent | _End:
    try:
        return await anext(events)
    except StopAsyncIteration:
        return _END


class _Timed:
    """A backend stream read with timeouts that do not cancel the read: a late event is
    kept for the next call rather than lost (cancelling would end the backend's generator)."""

    def __init__(self, events: AsyncGenerator[StreamEvent, None]) -> None:
        self._events = events
        self._pending: asyncio.Task[StreamEvent | _End] | None = None
        self._closed = False

    async def next(self, wait_s: float | None) -> StreamEvent | _End:
        """The next event, `_END` at the end, or `_TICK` if none came within `wait_s`."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(_next(self._events))
        done, _ = await asyncio.wait({self._pending}, timeout=wait_s)
        if not done:
            return _TICK
        pending, self._pending = self._pending, None
        return pending.result()

    async def rest(self) -> AsyncIterator[StreamEvent]:
        while not isinstance(event := await self.next(None), _End):
            yield event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.wait({self._pending})
            self._pending = None
        await self._events.aclose()


# How much more of a refusal cut mid-sentence is read to finish its sentence, at most.
FINISH_SENTENCE_CHARS = 300


async def _finish_sentence(
    job: GenerationJob, stream: _Timed, recovery: Recovery, kept: str
) -> None:
    """The rest of the sentence `kept` (the job's text so far) ends in: up to its end, or a
    bound."""
    written = kept
    async for event in stream.rest():
        if not isinstance(event, TextDelta):
            return
        end = recovery.sentence_end(written + event.text)
        if end is not None:
            job.emit(event.text[: end - len(written)])
            return
        job.emit(event.text)
        written += event.text
        if len(written) - len(kept) >= FINISH_SENTENCE_CHARS:
            return


async def _hold(stream: _Timed, recovery: Recovery) -> tuple[str, Usage | None, bool]:
    """The start of the answer, held back until the refusal detector can judge it: up to
    `hold_chars` characters or `hold_max_s` seconds after the first one, or the end of the
    stream. Returns (the held text, the usage if it ended, whether it ended)."""
    parts: list[str] = []
    size = 0
    deadline: float | None = None
    while size < recovery.hold_chars:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            break
        event = await stream.next(timeout)
        if event is _TICK:
            break
        if isinstance(event, _End):
            return "".join(parts), None, True
        if isinstance(event, TextDelta):
            parts.append(event.text)
            size += len(event.text)
            if deadline is None and event.text:
                deadline = time.monotonic() + recovery.hold_max_s
        else:
            return "".join(parts), event.usage, True
    return "".join(parts), None, False
