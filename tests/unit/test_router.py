"""The router over small scripted backends (fakes of the network boundary): failover before
the first token only, circuit breakers, active probes, choice, stickiness and hedging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import pytest

from salon.backends.base import complete
from salon.backends.registry import BackendRegistry
from salon.backends.router import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Router,
    Target,
)
from salon.domain import (
    ChatMessage,
    CompletionRequest,
    Finished,
    FinishReason,
    StreamEvent,
    TextDelta,
    Usage,
)
from salon.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextTooLong,
    InvalidRequest,
    SalonError,
    UnknownModel,
)
from salon.observability.metrics import Metrics
from salon.settings import RoutePolicy, RouteSettings, Settings

HI = (ChatMessage("user", "hi"),)
WORDS = ("one", " two", " three")
# Long enough that a test which waited on it could not pass the fail-fast bounds.
HANG_TIMEOUT_S = 0.5


@dataclass(eq=False)
class Scripted:
    """A TextBackend whose behaviour a test sets: answer, fail before or after the first
    token, hang, or hold its stream open until released."""

    name: str
    fail: SalonError | None = None  # raised before the first token
    fail_after: int | None = None  # tokens sent before a BackendUnavailable
    hang: bool = False
    ttft_s: float = 0.0
    hold: asyncio.Event | None = None  # set by the test to let the stream finish
    calls: list[CompletionRequest] = field(default_factory=list)
    closed: int = 0  # streams ended (finished, failed, cancelled or closed)
    firsts: int = 0  # streams that sent their first token

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        self.calls.append(request)
        try:
            if self.ttft_s:
                await asyncio.sleep(self.ttft_s)
            if self.hang:
                await asyncio.Event().wait()
            if self.fail is not None:
                raise self.fail
            for i, word in enumerate(WORDS):
                if self.fail_after == i:
                    raise BackendUnavailable(f"{self.name} died mid-stream")
                self.firsts += i == 0
                yield TextDelta(f"{self.name}:{word}")
                if i == 0 and self.hold is not None:
                    await self.hold.wait()
            yield Finished(FinishReason.STOP, Usage(1, len(WORDS)))
        finally:
            self.closed += 1

    async def close(self) -> None:
        return None


def router(*backends: Scripted, **policy: Any) -> Router:
    targets = [Target(f"{b.name}:m", b, f"model-{b.name}") for b in backends]
    return Router("pool:test", targets, RoutePolicy(**policy))


def said(name: str) -> str:
    """The whole answer of the target named `name`."""
    return "".join(f"{name}:{word}" for word in WORDS)


def ask(session_key: str | None = None) -> CompletionRequest:
    return CompletionRequest("pool-model", HI, session_key=session_key)


async def answer(r: Router, session_key: str | None = None) -> str:
    return (await complete(r, ask(session_key))).text


async def elapsed(coro: Awaitable[object]) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


# -- failover before the first token only ----------------------------------------------------


async def test_a_failure_before_the_first_token_fails_over_to_the_next_target() -> None:
    a, b = Scripted("a", fail=BackendUnavailable("connection refused")), Scripted("b")
    r = router(a, b)
    assert await answer(r) == said("b")
    assert len(a.calls) == 1 and len(b.calls) == 1
    assert b.calls[0].model == "model-b"  # each target is asked for its own model name
    assert a.closed == 1


async def test_a_target_that_hangs_before_the_first_token_times_out_and_fails_over() -> None:
    a, b = Scripted("a", hang=True), Scripted("b")
    r = router(a, b, first_token_timeout_s=0.1)
    took = await elapsed(answer(r))
    assert 0.1 <= took < 0.1 + HANG_TIMEOUT_S
    assert a.closed == 1 and len(b.calls) == 1  # the hung stream was cancelled


async def test_after_the_first_token_a_failure_ends_the_stream_without_failover() -> None:
    a, b = Scripted("a", fail_after=2), Scripted("b")
    r = router(a, b)
    received: list[str] = []
    with pytest.raises(BackendUnavailable, match="died mid-stream"):
        async with aclosing(r.stream(ask())) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    received.append(event.text)
    assert received == ["a:one", "a: two"]  # the partial text reached the caller, once
    assert not b.calls


@pytest.mark.parametrize(
    "error", [InvalidRequest("bad"), ContextTooLong("too long"), UnknownModel("no such")]
)
async def test_errors_about_the_request_are_raised_at_once(error: SalonError) -> None:
    a, b = Scripted("a", fail=error), Scripted("b")
    r = router(a, b, failures_to_open=1)
    with pytest.raises(type(error)):
        await answer(r)
    assert not b.calls
    assert r.states()["a:m"] is BreakerState.CLOSED  # the target answered: it is alive


async def test_every_target_failing_raises_one_error_of_the_last_kind() -> None:
    a = Scripted("a", fail=BackendUnavailable("refused"))
    b = Scripted("b", fail=BackendTimeout("slow"))
    with pytest.raises(BackendTimeout, match="2 target"):
        await answer(router(a, b))


async def test_max_attempts_bounds_the_targets_tried() -> None:
    down = [Scripted(n, fail=BackendUnavailable("down")) for n in "abc"]
    with pytest.raises(BackendUnavailable):
        await answer(router(*down, max_attempts=2))
    assert [len(d.calls) for d in down] == [1, 1, 0]


async def test_the_time_budget_stops_further_attempts() -> None:
    a, b, c = Scripted("a", hang=True), Scripted("b", hang=True), Scripted("c")
    r = router(a, b, c, first_token_timeout_s=0.1, budget_s=0.15)
    with pytest.raises(BackendTimeout):
        await answer(r)
    assert not c.calls  # a took 0.1 s, b got the 0.05 s left, c none


# -- circuit breakers ------------------------------------------------------------------------


def test_breaker_transitions() -> None:
    breaker = CircuitBreaker(failures_to_open=2, cooldown_s=10)
    breaker.failed(0)
    assert breaker.admits(0) and breaker.state is BreakerState.CLOSED
    breaker.succeeded()  # consecutive failures only
    breaker.failed(1)
    breaker.failed(2)
    assert breaker.state is BreakerState.OPEN and not breaker.admits(11.9)
    assert breaker.retry_after(5) == 7
    assert breaker.admits(12) and breaker.current(12) is BreakerState.HALF_OPEN
    assert breaker.start(12)  # the one trial
    assert not breaker.admits(12)
    breaker.failed(13)  # the trial failed: open again, for a whole cooldown
    assert breaker.state is BreakerState.OPEN and not breaker.admits(22)
    assert breaker.start(23)
    breaker.abandoned(trial=True)  # the caller left: another trial may go
    assert breaker.admits(23)
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


async def test_an_open_breaker_skips_a_dead_target_at_once() -> None:
    dead, good = Scripted("dead", hang=True), Scripted("good")
    r = router(dead, good, first_token_timeout_s=HANG_TIMEOUT_S, failures_to_open=2)
    slow = [await elapsed(answer(r)) for _ in range(2)]  # each waits for the dead one
    assert r.states()["dead:m"] is BreakerState.OPEN
    fast = await elapsed(answer(r))
    print(f"\ndead+good: {min(slow) * 1000:.0f} ms while closed, {fast * 1000:.1f} ms open")
    assert min(slow) >= HANG_TIMEOUT_S
    assert fast < 0.05
    assert len(dead.calls) == 2 and len(good.calls) == 3


async def test_a_single_target_fails_fast_while_its_breaker_is_open() -> None:
    dead = Scripted("dead", fail=BackendUnavailable("refused"))
    r = router(dead, failures_to_open=3, cooldown_s=30)
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="refused"):
            await answer(r)
    start = time.perf_counter()
    with pytest.raises(CircuitOpen, match=r"dead:m: circuit open, retry after (29|30) s") as c:
        await answer(r)
    took = time.perf_counter() - start
    print(f"\nsingle dead target, breaker open: failed in {took * 1000:.2f} ms")
    assert took < 0.05
    assert isinstance(c.value, BackendUnavailable) and c.value.retry_after_s in (29, 30)
    assert len(dead.calls) == 3  # not called again


async def test_after_the_cooldown_one_trial_closes_the_breaker() -> None:
    target = Scripted("a", fail=BackendUnavailable("refused"))
    r = router(target, failures_to_open=1, cooldown_s=0.05, probe_interval_s=0)
    with pytest.raises(BackendUnavailable):
        await answer(r)
    with pytest.raises(CircuitOpen):
        await answer(r)
    await asyncio.sleep(0.06)
    assert r.states()["a:m"] is BreakerState.HALF_OPEN
    target.fail = None  # recovered
    hold = target.hold = asyncio.Event()
    trial = asyncio.create_task(answer(r))
    while not target.firsts:
        await asyncio.sleep(0.001)
    with pytest.raises(CircuitOpen):  # only one trial at a time
        await answer(r)
    hold.set()
    assert (await trial).startswith("a:one")
    assert r.states()["a:m"] is BreakerState.CLOSED
    target.hold = None
    assert await answer(r)


async def test_a_failed_trial_opens_the_breaker_again() -> None:
    target = Scripted("a", fail=BackendUnavailable("refused"))
    r = router(target, failures_to_open=1, cooldown_s=0.05, probe_interval_s=0)
    with pytest.raises(BackendUnavailable):
        await answer(r)
    await asyncio.sleep(0.06)
    with pytest.raises(BackendUnavailable, match="refused"):
        await answer(r)  # the trial
    with pytest.raises(CircuitOpen):
        await answer(r)
    assert len(target.calls) == 2


async def test_a_probe_closes_the_breaker_without_a_user_request() -> None:
    healthy = asyncio.Event()
    probes: list[float] = []

    async def probe() -> bool:
        probes.append(time.monotonic())
        return healthy.is_set()

    dead = Scripted("a", fail=BackendUnavailable("refused"))
    r = Router(
        "pool:test",
        [Target("a:m", dead, "m", probe)],
        RoutePolicy(failures_to_open=1, cooldown_s=0.05, probe_interval_s=0.02),
    )
    with pytest.raises(BackendUnavailable):
        await answer(r)
    await asyncio.sleep(0.1)  # past the cooldown, but failing probes keep it open
    assert len(probes) >= 2 and r.states()["a:m"] is BreakerState.OPEN
    healthy.set()
    await asyncio.sleep(0.05)
    assert r.states()["a:m"] is BreakerState.CLOSED
    assert len(dead.calls) == 1  # recovered without spending a request on it
    dead.fail = None
    assert await answer(r)
    await r.close()


async def test_close_cancels_a_running_probe() -> None:
    started = asyncio.Event()

    async def probe() -> bool:
        started.set()
        await asyncio.Event().wait()
        return True

    dead = Scripted("a", fail=BackendUnavailable("refused"))
    r = Router(
        "pool:test",
        [Target("a:m", dead, "m", probe)],
        RoutePolicy(failures_to_open=1, probe_interval_s=0.01, probe_timeout_s=60),
    )
    with pytest.raises(BackendUnavailable):
        await answer(r)
    await asyncio.wait_for(started.wait(), 1)
    took = await elapsed(r.close())
    assert took < 0.05
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("probe ")]


async def test_breaker_state_and_failovers_are_measured() -> None:
    metrics = Metrics()
    a, b = Scripted("a", fail=BackendUnavailable("refused")), Scripted("b")
    targets = [Target("a:m", a, "m"), Target("b:m", b, "m")]
    r = Router("pool:test", targets, RoutePolicy(failures_to_open=1), metrics=metrics.route("p"))
    labels = {"route": "p", "target": "a:m"}
    assert metrics.registry.get_sample_value("salon_route_breaker_state", labels) == 0
    assert await answer(r)
    assert metrics.registry.get_sample_value("salon_route_breaker_state", labels) == 2
    assert metrics.registry.get_sample_value("salon_route_failovers_total", labels) == 1
    await r.close()


# -- choice ----------------------------------------------------------------------------------


async def test_the_least_loaded_target_is_chosen() -> None:
    backends = [Scripted(n) for n in "abc"]
    r = router(*backends)
    holds = []
    for _ in range(2):  # two long streams: on a, then on b (a is busy)
        hold = asyncio.Event()
        for backend in backends:
            backend.hold = hold
        holds.append((hold, asyncio.create_task(answer(r))))
        while sum(b.firsts for b in backends) < len(holds):
            await asyncio.sleep(0.001)
    for backend in backends:
        backend.hold = None
    assert await answer(r) == said("c")
    assert [len(b.calls) for b in backends] == [1, 1, 1]
    for hold, task in holds:
        hold.set()
        await task


async def test_ties_are_broken_by_time_to_first_token() -> None:
    slow, fast = Scripted("slow", ttft_s=0.03), Scripted("fast")
    r = router(slow, fast)
    await answer(r)  # both unmeasured: the first in order
    await answer(r)  # slow is measured now, fast is not yet: try fast
    for _ in range(3):
        await answer(r)
    assert (len(slow.calls), len(fast.calls)) == (1, 4)


async def test_a_session_sticks_to_one_target_and_sessions_spread() -> None:
    backends = [Scripted(n) for n in "abcd"]
    r = router(*backends)
    chosen: dict[str, str] = {}
    for i in range(40):
        key = f"conversation-{i}"
        first = (await answer(r, key)).split(":")[0]
        again = [(await answer(r, key)).split(":")[0] for _ in range(2)]
        assert again == [first, first]
        chosen[key] = first
    assert len(set(chosen.values())) == 4  # spread over all four
    for backend in backends:
        assert all(c.session_key for c in backend.calls)  # forwarded to the engine


async def test_a_session_moves_only_while_its_target_is_down() -> None:
    a, b, c = Scripted("a"), Scripted("b"), Scripted("c")
    r = router(a, b, c, failures_to_open=1, cooldown_s=0.05, probe_interval_s=0)
    keys = [f"k{i}" for i in range(30)]
    before = {k: (await answer(r, k))[0] for k in keys}
    b.fail = BackendUnavailable("down")
    during = {k: (await answer(r, k))[0] for k in keys}
    assert "b" not in during.values()
    assert all(during[k] == before[k] for k in keys if before[k] != "b")  # others stay put
    b.fail = None
    await asyncio.sleep(0.06)
    await answer(r, next(k for k in keys if before[k] == "b"))  # the trial closes it
    after = {k: (await answer(r, k))[0] for k in keys}
    assert after == before


# -- hedging ---------------------------------------------------------------------------------


async def test_a_late_first_token_is_hedged_and_the_loser_cancelled() -> None:
    late, quick = Scripted("late", ttft_s=0.3), Scripted("quick")
    r = router(late, quick, hedge_after_s=0.03)
    took = await elapsed(answer(r))
    assert took < 0.2
    assert len(late.calls) >= 1 and late.closed == len(late.calls)  # cancelled, closed
    assert late.firsts == 0  # nothing of it was produced, let alone relayed


async def test_hedging_relays_only_the_winner() -> None:
    a, b = Scripted("a", ttft_s=0.05), Scripted("b", ttft_s=0.06)
    r = router(a, b, hedge_after_s=0.01)
    assert await answer(r) == said("a")
    assert len(b.calls) == 1 and b.closed == 1


async def test_no_hedge_when_the_first_token_is_on_time() -> None:
    a, b = Scripted("a"), Scripted("b")
    r = router(a, b, hedge_after_s=0.2)
    assert await answer(r) == said("a")
    assert not b.calls


async def test_a_hedged_request_still_fails_over() -> None:
    a, b = Scripted("a", fail=BackendUnavailable("refused")), Scripted("b", hang=True)
    c = Scripted("c")
    r = router(a, b, c, hedge_after_s=0.02, first_token_timeout_s=0.1)
    assert await answer(r) == said("c")
    assert b.closed == 1  # the hung one: hedged against, cancelled when c answered


async def test_hedging_with_nothing_left_to_hedge_waits_for_the_one_stream() -> None:
    only = Scripted("a", ttft_s=0.05)
    r = router(only, hedge_after_s=0.01)
    assert await answer(r) == said("a")


async def test_cancelling_a_hedged_request_cancels_and_frees_both_targets() -> None:
    a, b = Scripted("a", hang=True), Scripted("b", hang=True)
    r = router(a, b, hedge_after_s=0.01, failures_to_open=1)
    task = asyncio.create_task(answer(r))
    while len(b.calls) < 1:  # both are racing
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (a.closed, b.closed) == (1, 1)
    assert set(r.states().values()) == {BreakerState.CLOSED}  # no verdict on either


async def test_cancelling_a_request_before_its_first_token_frees_the_target() -> None:
    a = Scripted("a", hang=True)
    r = router(a, failures_to_open=1)
    task = asyncio.create_task(answer(r))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.closed == 1 and r.states()["a:m"] is BreakerState.CLOSED  # no verdict


# -- configuration ---------------------------------------------------------------------------


def test_route_settings_share_the_router_defaults() -> None:
    route = RouteSettings(targets=["a:x"])
    assert route.model_dump(exclude={"targets"}) == RoutePolicy().model_dump()
    with pytest.raises(ValueError, match="provider:model"):
        RouteSettings(targets=["no-colon"])


async def test_the_registry_builds_a_router_for_a_route_id() -> None:
    settings = Settings(
        models=["pool:echo", "fake:echo"],
        providers={"remote": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        routes={
            "pool:echo": {"targets": ["fake:down", "fake:echo"], "failures_to_open": 1},
            "pool:mixed": {"targets": ["fake:echo", "remote:x"]},
        },
    )
    registry = BackendRegistry(settings, metrics=Metrics())
    route = registry.resolve("pool:echo")
    assert isinstance(route.backend, Router) and route.personal_data
    done = await complete(route.backend, CompletionRequest(route.name, HI))
    assert done.text == "You said: hi"  # fake:down failed over to fake:echo
    assert route.backend.states() == {
        "fake:down": BreakerState.OPEN,
        "fake:echo": BreakerState.CLOSED,
    }
    await registry.close()
    mixed = Settings(
        models=["pool:mixed"],
        providers={"remote": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        routes={"pool:mixed": {"targets": ["fake:echo", "remote:x"]}},
    )
    # One target may not receive personal data: neither may the route. Nor is it trusted to
    # continue an answer salon starts, since the hosted one may start anew.
    assert not BackendRegistry(mixed).resolve("pool:mixed").personal_data
    assert not BackendRegistry(mixed).resolve("pool:mixed").continues
    assert route.continues  # fake targets only
    vllm = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "continues_answers": True}
    declared = Settings(
        models=["pool:mixed"],
        providers={"remote": vllm},
        routes={"pool:mixed": {"targets": ["fake:echo", "remote:x"]}},
    )
    assert BackendRegistry(declared).resolve("pool:mixed").continues
    assert not BackendRegistry(declared).resolve_internal("remote:y").personal_data
    assert BackendRegistry(declared).resolve_internal("remote:y").continues


def test_backend_error_is_the_failover_rule() -> None:
    # The rule is by type: every BackendError fails over, nothing else does.
    for error in (BackendUnavailable, BackendTimeout, BackendError):
        assert issubclass(error, BackendError)
    for error in (InvalidRequest, ContextTooLong, UnknownModel):
        assert not issubclass(error, BackendError)
