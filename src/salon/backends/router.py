"""One logical model served by several backends: a `TextBackend` over ordered targets.

Everything above the seam (chat, gateway, jobs) is unchanged; the registry builds a
`Router` for a model id that has a `[routes."<id>"]` entry.

- Failover happens only before the first event: a target that fails (any `BackendError`:
  cannot connect, 5xx, 429, timeout, a broken stream) or sends nothing within
  `first_token_timeout_s` is replaced by the next one, each target at most once per request,
  within `max_attempts` and `budget_s`. Once an event has been relayed, a failure ends the
  stream with the error: restarting elsewhere would repeat text the user already has.
  Errors about the request itself (InvalidRequest, ContextTooLong, UnknownModel) are not
  `BackendError`s and are raised at once: another target would refuse it too.
- A circuit breaker per target: `failures_to_open` consecutive failed attempts open it, and
  an open target is skipped without being called. After `cooldown_s` it is half-open: one
  trial request may use it; the trial's outcome closes or re-opens it. With no target to
  call, the request fails at once with `CircuitOpen` (a 503 with a retry delay) instead of
  waiting on a dead backend.
- Active health checks: while a breaker is open, a probe (for OpenAI-compatible targets
  `GET {base_url}/models`) runs every `probe_interval_s`; success closes the breaker, so a
  recovered backend comes back without a user request being spent on it, and failure keeps
  it open. Probe tasks start when a breaker opens and end when it closes or on `close()`.
- Choice: the least requests in flight among closed targets, ties broken by a moving average
  of time to first token, then by order. With a `session_key`, rendezvous hashing picks a
  stable target per session (an engine's prefix cache stays warm) and moves only the
  sessions of a target that is down.
- Hedging (`hedge_after_s` > 0): when the first token is late, the same request starts on a
  second target; the first to send an event wins and the other is cancelled. Only the
  winner's events are relayed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

import aiohttp

from salon.backends.base import TextBackend
from salon.domain import CompletionRequest, Finished, StreamEvent
from salon.errors import BackendError, BackendTimeout, BackendUnavailable, SalonError
from salon.observability.metrics import RouteMetrics
from salon.settings import RoutePolicy

log = logging.getLogger(__name__)

# Weight of the newest time to first token in a target's moving average.
TTFT_ALPHA = 0.2

# Answers True when the target looks able to serve; may raise (counted as False).
Probe = Callable[[], Awaitable[bool]]


class CircuitOpen(BackendUnavailable):
    """No target can be called now: every one is skipped by its open circuit breaker."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


@dataclass(frozen=True, slots=True)
class Target:
    label: str  # for logs and metrics, e.g. "vllm-a:qwen2.5-7b"
    backend: TextBackend
    model: str  # the name this backend calls the model
    probe: Probe | None = None


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Consecutive-failure breaker. Time is passed in, so it is tested without sleeping."""

    __slots__ = ("_cooldown_s", "_opened_at", "_threshold", "_trial", "failures", "state")

    def __init__(self, failures_to_open: int, cooldown_s: float) -> None:
        self._threshold = failures_to_open
        self._cooldown_s = cooldown_s
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trial = False  # a half-open trial request is in flight

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def current(self, now: float) -> BreakerState:
        if self.state is BreakerState.OPEN and now >= self._opened_at + self._cooldown_s:
            self.state = BreakerState.HALF_OPEN
        return self.state

    def admits(self, now: float) -> bool:
        state = self.current(now)
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial)

    def start(self, now: float) -> bool:
        """An attempt begins; True when it is the half-open trial."""
        if self.current(now) is BreakerState.HALF_OPEN:
            self._trial = True
            return True
        return False

    def succeeded(self) -> None:
        self.state, self.failures, self._trial = BreakerState.CLOSED, 0, False

    def failed(self, now: float) -> None:
        self.failures += 1
        self._trial = False
        if self.state is not BreakerState.CLOSED or self.failures >= self._threshold:
            self.trip(now)

    def trip(self, now: float) -> None:
        self.state, self._opened_at = BreakerState.OPEN, now

    def abandoned(self, trial: bool) -> None:
        """An attempt ended without a verdict (the caller left): free the trial slot."""
        if trial:
            self._trial = False

    def retry_after(self, now: float) -> float:
        if self.state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self._cooldown_s - now)
        return 0.0


@dataclass(slots=True, eq=False)
class _Slot:
    """A target and what the router knows about it."""

    index: int
    target: Target
    breaker: CircuitBreaker
    in_flight: int = 0
    ttft_s: float = 0.0  # moving average; 0 until measured, so a new target gets tried
    probing: asyncio.Task[None] | None = None


@dataclass(slots=True, eq=False)
class _Attempt:
    slot: _Slot
    events: AsyncGenerator[StreamEvent, None]
    started: float
    deadline: float  # no first event by then: failed
    trial: bool
    settled: bool = False


class Router:
    def __init__(
        self,
        name: str,
        targets: Sequence[Target],
        policy: RoutePolicy | None = None,
        *,
        metrics: RouteMetrics | None = None,
        close_targets: bool = True,
    ) -> None:
        if not targets:
            raise ValueError(f"route {name!r} has no targets")
        self.name = name
        self.policy = policy or RoutePolicy()
        self._metrics = metrics
        self._close_targets = close_targets  # False when the targets are shared (registry)
        self._closed = False
        self._slots = [
            _Slot(i, t, CircuitBreaker(self.policy.failures_to_open, self.policy.cooldown_s))
            for i, t in enumerate(targets)
        ]
        for slot in self._slots:
            self._observe(slot)

    # -- the TextBackend seam ------------------------------------------------------------

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        started = time.monotonic()
        if self.policy.hedge_after_s > 0:
            attempt, first = await self._first_hedged(request, started)
        else:
            attempt, first = await self._first_in_turn(request, started)
        failure: BackendError | None = None
        try:
            # Settled at the Finished event: callers need not close the stream (`complete`
            # doesn't), and the next request must see this one's load and verdict.
            if isinstance(first, Finished):
                self._settle(attempt, None)
            yield first
            if not isinstance(first, Finished):
                async for event in attempt.events:
                    if isinstance(event, Finished):
                        self._settle(attempt, None)
                    yield event
        except BackendError as exc:  # after the first event: the stream ends with it
            failure = exc
            raise
        finally:
            self._settle(attempt, failure)  # once: a no-op after Finished
            await attempt.events.aclose()

    async def close(self) -> None:
        self._closed = True
        probes = [s.probing for s in self._slots if s.probing is not None]
        for task in probes:
            task.cancel()
        if probes:
            await asyncio.wait(probes)
        if self._close_targets:
            closed: set[int] = set()
            for slot in self._slots:
                if id(slot.target.backend) not in closed:
                    closed.add(id(slot.target.backend))
                    await slot.target.backend.close()

    # -- introspection (tests, an admin view) ---------------------------------------------

    def states(self) -> dict[str, BreakerState]:
        now = time.monotonic()
        return {s.target.label: s.breaker.current(now) for s in self._slots}

    # -- the first event: one target after another -----------------------------------------

    async def _first_in_turn(
        self, request: CompletionRequest, started: float
    ) -> tuple[_Attempt, StreamEvent]:
        tried: set[int] = set()
        last: BackendError | None = None
        while (attempt := self._open(request, tried, started)) is not None:
            try:
                async with asyncio.timeout(attempt.deadline - time.monotonic()):
                    first = await anext(attempt.events)
            except BaseException as exc:
                last = await self._failed_first(attempt, exc)
                continue
            self._measure(attempt)
            return attempt, first
        raise self._exhausted(last, tried)

    async def _failed_first(self, attempt: _Attempt, exc: BaseException) -> BackendError:
        """Settles an attempt that ended before its first event. Returns the error to fail
        over on, or raises what must not be retried (the request's own errors, cancel)."""
        label = attempt.slot.target.label
        if isinstance(exc, BackendError):
            error = exc
        elif isinstance(exc, TimeoutError):
            error = BackendTimeout(
                f"{label}: no first token in {time.monotonic() - attempt.started:.1f} s"
            )
        elif isinstance(exc, StopAsyncIteration):
            error = BackendError(f"{label}: the stream ended without an event")
        else:
            # The request's fault (the target answered) or the caller left: no failover,
            # and no verdict on the target beyond "it answered".
            self._settle(attempt, None, answered=isinstance(exc, SalonError))
            await attempt.events.aclose()
            raise exc
        self._settle(attempt, error)
        await attempt.events.aclose()
        if self._metrics is not None:
            self._metrics.failover(label)
        log.info("route %s: %s failed before the first token: %s", self.name, label, error)
        return error

    # -- the first event: hedged ---------------------------------------------------------

    async def _first_hedged(
        self, request: CompletionRequest, started: float
    ) -> tuple[_Attempt, StreamEvent]:
        tried: set[int] = set()
        last: BackendError | None = None
        racing: dict[asyncio.Task[StreamEvent], _Attempt] = {}
        spare = True  # another target may still be started
        try:
            while True:
                if not racing or (spare and self._hedge_due(racing)):
                    attempt = self._open(request, tried, started)
                    if attempt is not None:
                        racing[asyncio.create_task(_first_event(attempt.events))] = attempt
                    elif not racing:
                        raise self._exhausted(last, tried)
                    else:
                        spare = False
                done, _ = await asyncio.wait(
                    racing,
                    timeout=self._wake_in(racing, spare),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in [t for t in racing if t in done]:  # in start order
                    attempt = racing.pop(task)
                    outcome = _outcome(task)
                    if outcome is None:
                        self._measure(attempt)
                        return attempt, task.result()
                    last = await self._failed_first(attempt, outcome)
                await self._expire(racing)
        finally:
            await self._cancel(racing)

    def _hedge_due(self, racing: dict[asyncio.Task[StreamEvent], _Attempt]) -> bool:
        if len(racing) != 1:
            return False
        (attempt,) = racing.values()
        return time.monotonic() - attempt.started >= self.policy.hedge_after_s

    def _wake_in(self, racing: dict[asyncio.Task[StreamEvent], _Attempt], spare: bool) -> float:
        wake = min(a.deadline for a in racing.values())
        if spare and len(racing) == 1:
            (attempt,) = racing.values()
            wake = min(wake, attempt.started + self.policy.hedge_after_s)
        return max(0.0, wake - time.monotonic())

    async def _expire(self, racing: dict[asyncio.Task[StreamEvent], _Attempt]) -> None:
        now = time.monotonic()
        for task in [t for t, a in racing.items() if a.deadline <= now]:
            attempt = racing.pop(task)
            task.cancel()
            # wait(), not `await task`: it never raises the task's CancelledError, so a
            # cancellation of this request itself still propagates.
            await asyncio.wait([task])
            await self._failed_first(attempt, TimeoutError())

    async def _cancel(self, racing: dict[asyncio.Task[StreamEvent], _Attempt]) -> None:
        """The losers: cancelled, closed, and settled by what they had shown."""
        if not racing:
            return
        for task in racing:
            task.cancel()
        await asyncio.wait(racing)
        for task, attempt in racing.items():
            outcome = _outcome(task)
            if isinstance(outcome, BackendError):
                self._settle(attempt, outcome)
            else:  # a first event (alive) or cancelled before one (no verdict)
                self._settle(attempt, None, answered=outcome is None)
            await attempt.events.aclose()
        racing.clear()

    # -- choosing and accounting ---------------------------------------------------------

    def _open(self, request: CompletionRequest, tried: set[int], started: float) -> _Attempt | None:
        now = time.monotonic()
        left = started + self.policy.budget_s - now
        if len(tried) >= self.policy.max_attempts or left <= 0:
            return None
        slot = self._pick(request.session_key, tried, now)
        if slot is None:
            return None
        tried.add(slot.index)
        trial = slot.breaker.start(now)
        if trial:
            self._observe(slot)  # half-open shows only now: the breaker changes lazily
        slot.in_flight += 1
        events = slot.target.backend.stream(replace(request, model=slot.target.model))
        deadline = now + min(self.policy.first_token_timeout_s, left)
        return _Attempt(slot, events, now, deadline, trial)

    def _pick(self, session_key: str | None, tried: set[int], now: float) -> _Slot | None:
        # A half-open target is ready for its one trial: it has no load, so it is usually
        # chosen, and a failed trial costs one failover (with probes on, it rarely happens:
        # a failing probe keeps the breaker open, a passing one closes it).
        ready = [s for s in self._slots if s.index not in tried and s.breaker.admits(now)]
        if not ready:
            return None
        if session_key is not None:
            return max(ready, key=lambda s: _affinity(session_key, s.target.label))
        return min(ready, key=lambda s: (s.in_flight, s.ttft_s, s.index))

    def _measure(self, attempt: _Attempt) -> None:
        ttft = time.monotonic() - attempt.started
        slot = attempt.slot
        slot.ttft_s = ttft if slot.ttft_s == 0 else slot.ttft_s + TTFT_ALPHA * (ttft - slot.ttft_s)

    def _settle(
        self, attempt: _Attempt, failure: BackendError | None, *, answered: bool = True
    ) -> None:
        """An attempt's one verdict on its target: failed, answered, or none (cancelled)."""
        if attempt.settled:
            return
        attempt.settled = True
        slot = attempt.slot
        slot.in_flight -= 1
        before = slot.breaker.state
        if failure is not None:
            slot.breaker.failed(time.monotonic())
        elif answered:
            slot.breaker.succeeded()
        else:
            slot.breaker.abandoned(attempt.trial)
        if slot.breaker.state is not before:
            self._changed(slot, failure)

    def _changed(self, slot: _Slot, failure: BackendError | None) -> None:
        self._observe(slot)
        state = slot.breaker.state
        if state is BreakerState.OPEN:
            log.warning(
                "route %s: circuit open for %s for %.0f s after %d failure(s): %s",
                self.name,
                slot.target.label,
                self.policy.cooldown_s,
                slot.breaker.failures,
                failure,
            )
            self._start_probe(slot)
        elif state is BreakerState.CLOSED:
            log.warning("route %s: %s is back (circuit closed)", self.name, slot.target.label)

    def _observe(self, slot: _Slot) -> None:
        if self._metrics is not None:
            self._metrics.breaker(slot.target.label, int(slot.breaker.state))

    def _exhausted(self, last: BackendError | None, tried: set[int]) -> BackendError:
        if last is None:  # nothing was called: every breaker is open (or busy with a trial)
            now = time.monotonic()
            wait = max(1, math.ceil(min(s.breaker.retry_after(now) for s in self._slots)))
            who = self._slots[0].target.label if len(self._slots) == 1 else self.name
            return CircuitOpen(f"{who}: circuit open, retry after {wait} s", wait)
        if len(tried) == 1 and len(self._slots) == 1:
            return last
        kind: type[BackendError] = BackendError  # the last one's kind: 503, 504 or 502
        if isinstance(last, BackendTimeout | BackendUnavailable):
            kind = BackendTimeout if isinstance(last, BackendTimeout) else BackendUnavailable
        error = kind(
            f"{self.name}: {len(tried)} target(s) failed before the first token; "
            f"last: {last.message}"
        )
        error.__cause__ = last
        return error

    # -- active health checks ------------------------------------------------------------

    def _start_probe(self, slot: _Slot) -> None:
        interval = self.policy.probe_interval_s
        if slot.target.probe is None or interval <= 0 or self._closed:
            return
        if slot.probing is None or slot.probing.done():
            slot.probing = asyncio.get_running_loop().create_task(
                self._probe_loop(slot, slot.target.probe, interval),
                name=f"probe {self.name} {slot.target.label}",
            )

    async def _probe_loop(self, slot: _Slot, probe: Probe, interval: float) -> None:
        while not slot.breaker.closed:
            await asyncio.sleep(interval)
            if slot.breaker.closed:  # a real request closed it meanwhile
                return
            try:
                async with asyncio.timeout(self.policy.probe_timeout_s):
                    healthy = await probe()
            except Exception:  # a probe's failure is an answer, not an error of ours
                healthy = False
            if healthy:
                slot.breaker.succeeded()
                self._changed(slot, None)
            else:  # still down: keep it open so no user request is spent on it
                slot.breaker.trip(time.monotonic())


async def _first_event(events: AsyncGenerator[StreamEvent, None]) -> StreamEvent:
    return await anext(events)


def _outcome(task: asyncio.Task[StreamEvent]) -> BaseException | None:
    """A finished task's exception (CancelledError when cancelled), None for an event."""
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()


def _affinity(session_key: str, label: str) -> int:
    # Rendezvous hashing: stable across processes (crc32, not hash()), and a target's
    # absence moves only the sessions that preferred it.
    return zlib.crc32(f"{session_key}\x00{label}".encode())


def models_probe(base_url: str, api_key: str | None = None) -> Probe:
    """An OpenAI-compatible server's health check: `GET {base_url}/models`. Any answer but
    5xx or 429 means the server is up (404: a server without that route). The router bounds
    its time (`probe_timeout_s`) and cancels it on close."""
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def probe() -> bool:
        # A session per probe: probes run only while a breaker is open, seconds apart.
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            return r.status < 500 and r.status != 429

    return probe
