from __future__ import annotations

import pytest

from salon.backends.base import complete
from salon.backends.fakes import FakeBackend
from salon.domain import ChatMessage, CompletionRequest, FinishReason, SamplingParams
from salon.errors import BackendUnavailable, UnknownModel


def _request(
    model: str, *messages: ChatMessage, max_tokens: int | None = None
) -> CompletionRequest:
    return CompletionRequest(model, messages, SamplingParams(max_tokens=max_tokens))


async def test_echo_and_length_limit() -> None:
    fake = FakeBackend(0)
    done = await complete(fake, _request("echo", ChatMessage("user", "a b c")))
    assert (done.text, done.reason) == ("You said: a b c", FinishReason.STOP)
    cut = await complete(fake, _request("slow", ChatMessage("user", "x"), max_tokens=3))
    assert (cut.text, cut.reason, cut.usage.completion_tokens) == ("w1 w2 w3", FinishReason.STOP, 3)


async def test_slow_continues_an_answer() -> None:
    fake = FakeBackend(0)
    request = _request(
        "slow", ChatMessage("user", "x"), ChatMessage("assistant", "w1 w2"), max_tokens=4
    )
    assert (await complete(fake, request)).text == " w3 w4"


async def test_failures() -> None:
    fake = FakeBackend(0)
    with pytest.raises(BackendUnavailable):
        await complete(fake, _request("down", ChatMessage("user", "x")))
    with pytest.raises(BackendUnavailable):
        await complete(fake, _request("fail", ChatMessage("user", "x")))
    with pytest.raises(UnknownModel):
        await complete(fake, _request("nope", ChatMessage("user", "x")))
