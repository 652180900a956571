"""`OpenAIHttpBackend` against the mock upstream over real loopback HTTP, and the official
`openai` package against a real `salon serve` whose provider is that mock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from salon.backends.mock_upstream import FAIL_AFTER, WORDS, RunningUpstream, running_upstream
from salon.backends.openai_http import OpenAIHttpBackend
from salon.domain import (
    ChatMessage,
    CompletionRequest,
    Finished,
    FinishReason,
    SamplingParams,
    StreamEvent,
    TextDelta,
)
from salon.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextTooLong,
    InvalidRequest,
    UnknownModel,
)
from tests.integration import conftest_server
from tests.integration.conftest_server import SalonServer, free_port

# The shared fixtures this module uses (pytest finds fixtures by module attribute).
mock_upstream_thread = conftest_server.mock_upstream_thread
salon_with_upstream = conftest_server.salon_with_upstream

ANSWER = "".join(WORDS[i % len(WORDS)] for i in range(20))
HELLO = (ChatMessage("user", "Hello there, how are you?"),)


def request(model: str = "mock", **params: Any) -> CompletionRequest:
    return CompletionRequest(model, HELLO, SamplingParams(**params))


async def collect(
    backend: OpenAIHttpBackend, req: CompletionRequest
) -> tuple[list[str], Finished | None]:
    texts: list[str] = []
    finished: Finished | None = None
    async for event in backend.stream(req):
        if isinstance(event, TextDelta):
            texts.append(event.text)
        else:
            finished = event
    return texts, finished


async def failing(
    backend: OpenAIHttpBackend, req: CompletionRequest
) -> tuple[list[str], Exception]:
    """The texts received before the stream failed, and the error it failed with."""
    texts: list[str] = []
    try:
        async for event in backend.stream(req):
            if isinstance(event, TextDelta):
                texts.append(event.text)
    except Exception as exc:
        return texts, exc
    raise AssertionError(f"the stream did not fail (got {texts!r})")


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    async with running_upstream(chunks=20) as running:
        yield running


@pytest.fixture
async def backend(upstream: RunningUpstream) -> AsyncIterator[OpenAIHttpBackend]:
    adapter = OpenAIHttpBackend(upstream.base_url, read_timeout_s=5.0)
    yield adapter
    await adapter.close()


# -- the adapter over loopback -----------------------------------------------------------


async def test_chunks_are_relayed_one_for_one(backend: OpenAIHttpBackend) -> None:
    events: list[StreamEvent] = [event async for event in backend.stream(request())]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 20
    assert [d.text for d in deltas] == [WORDS[i % len(WORDS)] for i in range(20)]
    assert len(events) == 21 and isinstance(events[-1], Finished)
    assert events[-1].reason is FinishReason.STOP
    assert events[-1].usage.completion_tokens == 20
    assert events[-1].usage.prompt_tokens > 0


async def test_the_request_carries_the_parameters(
    backend: OpenAIHttpBackend, upstream: RunningUpstream
) -> None:
    await collect(backend, request(temperature=0.3, top_p=0.9, seed=7, stop=("zzz",)))
    body = upstream.state.requests[-1]
    assert body["model"] == "mock"
    assert body["messages"] == [{"role": "user", "content": HELLO[0].content}]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    sampling = (body["temperature"], body["top_p"], body["seed"], body["stop"])
    assert sampling == (0.3, 0.9, 7, ["zzz"])
    assert "max_tokens" not in body


async def test_events_split_across_reads_with_crlf_are_parsed(backend: OpenAIHttpBackend) -> None:
    texts, finished = await collect(backend, request("fragmented"))
    assert texts == [WORDS[i % len(WORDS)] for i in range(20)]
    assert finished is not None and finished.reason is FinishReason.STOP


async def test_max_tokens_ends_with_length(
    backend: OpenAIHttpBackend, upstream: RunningUpstream
) -> None:
    texts, finished = await collect(backend, request(max_tokens=5))
    assert upstream.state.requests[-1]["max_tokens"] == 5
    assert len(texts) == 5
    assert finished is not None and finished.reason is FinishReason.LENGTH
    assert finished.usage.completion_tokens == 5


async def test_stop_sequence_ends_with_stop(backend: OpenAIHttpBackend) -> None:
    texts, finished = await collect(backend, request(stop=(" is",)))
    assert "".join(texts) == "Sure, here"
    assert finished is not None and finished.reason is FinishReason.STOP


async def test_continuing_an_assistant_message_asks_for_prefill(
    backend: OpenAIHttpBackend, upstream: RunningUpstream
) -> None:
    messages = (*HELLO, ChatMessage("assistant", "I am"))
    await collect(backend, CompletionRequest("mock", messages))
    body = upstream.state.requests[-1]
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False


async def test_a_server_not_declared_to_continue_gets_no_prefill_fields(
    upstream: RunningUpstream,
) -> None:
    """OpenAI itself answers 400 to a field it does not know: none is sent unless declared."""
    adapter = OpenAIHttpBackend(upstream.base_url, continues=False)
    try:
        messages = (*HELLO, ChatMessage("assistant", "I am"))
        await collect(adapter, CompletionRequest("mock", messages))
    finally:
        await adapter.close()
    body = upstream.state.requests[-1]
    assert "continue_final_message" not in body and "add_generation_prompt" not in body
    assert body["messages"][-1] == {"role": "assistant", "content": "I am"}


async def test_many_concurrent_streams_share_the_client(backend: OpenAIHttpBackend) -> None:
    results = await asyncio.gather(*(collect(backend, request()) for _ in range(50)))
    assert all(len(texts) == 20 and finished is not None for texts, finished in results)


async def test_cancelling_the_stream_closes_the_upstream_connection() -> None:
    async with running_upstream(chunks=200, delay_ms=5) as slow:
        adapter = OpenAIHttpBackend(slow.base_url)
        try:
            stream = adapter.stream(request())
            for _ in range(3):
                await anext(stream)
            await stream.aclose()
            deadline = time.monotonic() + 5
            while slow.state.disconnected == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert slow.state.disconnected == 1
            assert slow.state.completed == 0
        finally:
            await adapter.close()


async def test_the_api_key_is_sent() -> None:
    async with running_upstream(api_key="upstream-secret") as guarded:
        good = OpenAIHttpBackend(guarded.base_url, "upstream-secret")
        bad = OpenAIHttpBackend(guarded.base_url, "wrong")
        try:
            texts, finished = await collect(good, request())
            assert len(texts) == 20 and finished is not None
            _, error = await failing(bad, request())
            assert type(error) is BackendError
            assert "credentials" in str(error)
        finally:
            await good.close()
            await bad.close()


@pytest.mark.parametrize(
    ("model", "error_type", "partial"),
    [
        ("die-mid-stream", BackendUnavailable, FAIL_AFTER),
        ("malformed", BackendError, FAIL_AFTER),
        ("truncated", BackendError, 20),
        ("error-in-stream", BackendError, FAIL_AFTER),
        ("error-500", BackendUnavailable, 0),
        ("error-503", BackendUnavailable, 0),
        ("error-429", BackendUnavailable, 0),
        ("error-401", BackendError, 0),
        ("error-404", UnknownModel, 0),
        ("error-400", InvalidRequest, 0),
        ("context-too-long", ContextTooLong, 0),
    ],
)
async def test_failure_modes_map_to_salon_errors(
    backend: OpenAIHttpBackend, model: str, error_type: type[Exception], partial: int
) -> None:
    texts, error = await failing(backend, request(model))
    assert type(error) is error_type, repr(error)
    assert len(texts) == partial


@pytest.mark.parametrize(("model", "partial"), [("hang", 0), ("hang-mid-stream", FAIL_AFTER)])
async def test_silence_longer_than_the_read_timeout_is_a_timeout(
    upstream: RunningUpstream, model: str, partial: int
) -> None:
    adapter = OpenAIHttpBackend(upstream.base_url, read_timeout_s=0.3)
    try:
        started = time.monotonic()
        texts, error = await failing(adapter, request(model))
        elapsed = time.monotonic() - started
    finally:
        await adapter.close()
    assert type(error) is BackendTimeout, repr(error)
    assert len(texts) == partial
    assert 0.25 < elapsed < 3.0


async def test_connection_refused_is_unavailable_at_once() -> None:
    adapter = OpenAIHttpBackend(f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=5.0)
    try:
        started = time.monotonic()
        _, error = await failing(adapter, request())
        elapsed = time.monotonic() - started
    finally:
        await adapter.close()
    assert type(error) is BackendUnavailable, repr(error)
    assert elapsed < 1.0


# -- the official openai package against salon serve -------------------------------------


@pytest.fixture(scope="module")
def client(salon_with_upstream: SalonServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{salon_with_upstream.base_url}/v1",
        api_key=salon_with_upstream.api_key,
        max_retries=0,
        timeout=20.0,
    ) as made:
        yield made


HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi"}]


def test_openai_lists_models(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "up:mock"
    assert "up:die-mid-stream" in ids


def test_openai_non_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="up:mock", messages=HI)
    assert completion.object == "chat.completion"
    assert completion.model == "up:mock"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 20
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 20


def test_openai_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="up:mock",
        messages=HI,
        stream=True,
        stream_options={"include_usage": True},
    )
    contents: list[str] = []
    reasons: list[str] = []
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            if choice.delta.content:
                contents.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
    assert len(contents) == 20  # one chunk out for each chunk in
    assert "".join(contents) == ANSWER
    assert reasons == ["stop"]
    assert usage is not None and usage.completion_tokens == 20


def test_openai_streaming_without_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="up:mock", messages=HI, stream=True)
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sse_events_are_relayed_one_for_one(salon_with_upstream: SalonServer) -> None:
    body = {"model": "up:mock", "messages": HI, "stream": True}
    body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {salon_with_upstream.api_key}"}
    url = f"{salon_with_upstream.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:21]]
    assert contents == [WORDS[i % len(WORDS)] for i in range(20)]
    assert chunks[21]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[22]["choices"] == [] and chunks[22]["usage"]["completion_tokens"] == 20
    assert len(chunks) == 23


def test_a_client_that_leaves_stops_the_upstream_stream(
    salon_with_upstream: SalonServer, mock_upstream_thread: RunningUpstream
) -> None:
    state = mock_upstream_thread.state
    before = (state.disconnected, state.completed)
    body = {"model": "up:slow", "messages": HI, "stream": True}
    headers = {"Authorization": f"Bearer {salon_with_upstream.api_key}"}
    url = f"{salon_with_upstream.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        received = 0
        for line in response.iter_lines():
            received += '"content": "' in line and '"content": ""' not in line
            if received == 3:
                break
    deadline = time.monotonic() + 5  # the slow answer would take 2 s more
    while state.disconnected == before[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.disconnected == before[0] + 1
    assert state.completed == before[1]


def test_openai_max_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="up:mock", messages=HI, max_tokens=4)
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "".join(WORDS[:4])
    stream = client.chat.completions.create(
        model="up:mock",
        messages=HI,
        max_completion_tokens=3,
        stream=True,
    )
    chunks = list(stream)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_stop_seed_temperature_reach_the_upstream(
    client: openai.OpenAI, mock_upstream_thread: RunningUpstream
) -> None:
    completion = client.chat.completions.create(
        model="up:mock",
        messages=HI,
        stop=[" is"],
        seed=42,
        temperature=0.2,
        top_p=0.5,
    )
    assert completion.choices[0].message.content == "Sure, here"
    assert completion.choices[0].finish_reason == "stop"
    body = mock_upstream_thread.state.requests[-1]
    assert (body["stop"], body["seed"], body["temperature"], body["top_p"]) == (
        [" is"],
        42,
        0.2,
        0.5,
    )
    assert body["model"] == "mock"


def test_openai_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="up:nope", messages=HI)
    assert caught.value.code == "model_not_found"


def test_openai_bad_key_is_authentication_error(salon_with_upstream: SalonServer) -> None:
    with openai.OpenAI(
        base_url=f"{salon_with_upstream.base_url}/v1", api_key="sk-salon-wrong", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="up:mock", messages=HI)


@pytest.mark.parametrize(
    "overrides",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"temperature": 5},
        {"n": 3},
        {"stop": ["a", "b", "c", "d", "e"]},
    ],
    ids=["empty-messages", "bad-role", "temperature", "n", "too-many-stops"],
)
def test_openai_bad_requests(client: openai.OpenAI, overrides: dict[str, object]) -> None:
    arguments: dict[str, object] = {"model": "up:mock", "messages": HI, **overrides}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**arguments)  # type: ignore[call-overload]
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body.get("message")


def test_malformed_json_body_is_bad_request(salon_with_upstream: SalonServer) -> None:
    response = httpx.post(
        f"{salon_with_upstream.base_url}/v1/chat/completions",
        content=b'{"model": "up:mock", "messages": [',
        headers={
            "Authorization": f"Bearer {salon_with_upstream.api_key}",
            "Content-Type": "application/json",
        },
        timeout=10,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_openai_context_too_long_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="up:context-too-long", messages=HI)
    assert caught.value.code == "context_length_exceeded"


@pytest.mark.parametrize(("model", "status"), [("up:error-500", 503), ("up:hang", 504)])
def test_openai_upstream_down_before_the_first_token(
    client: openai.OpenAI, model: str, status: int
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=model, messages=HI, stream=stream)
        assert caught.value.status_code == status


@pytest.mark.parametrize("model", ["up:die-mid-stream", "up:malformed", "up:truncated"])
def test_openai_mid_stream_failure_ends_the_stream_with_an_error(
    client: openai.OpenAI, model: str
) -> None:
    stream = client.chat.completions.create(model=model, messages=HI, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received  # the text before the failure arrived
    assert caught.value.message
    # A non-streaming request fails as a whole.
    with pytest.raises(openai.APIStatusError) as whole:
        client.chat.completions.create(model=model, messages=HI)
    assert whole.value.status_code >= 500


def test_salon_stays_healthy_after_the_failures(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="up:mock", messages=HI)
    assert completion.choices[0].message.content == ANSWER
