"""Types shared by every layer: what a chat turn is, and what a backend streams back."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Ask for the log-probabilities of this many most likely tokens at each output position
    # (OpenAI's `logprobs` + `top_logprobs`); a backend that cannot give them ignores it.
    top_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One generation asked of a backend.

    `model` is the backend's own model name (the part after `provider:`).
    `session_key` lets a backend keep per-conversation state (the embedded model's KV cache,
    an engine's cache-aware routing); it never changes what is generated.
    When the last message is from the assistant, the backend continues that message.
    """

    model: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    session_key: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One output position: its most likely tokens and their log-probabilities."""

    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text, relayed as soon as the backend produced it."""

    text: str
    # One entry per token of `text`, only when the request asked for `top_logprobs` and the
    # backend gave them.
    logprobs: tuple[TokenLogprobs, ...] = ()


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every successful stream."""

    reason: FinishReason
    usage: Usage


StreamEvent = TextDelta | Finished


class MessageStatus(StrEnum):
    """Where an assistant message stands. User messages are always COMPLETE."""

    STREAMING = "streaming"
    COMPLETE = "complete"
    STOPPED = "stopped"  # the user pressed stop; the text so far is kept
    INCOMPLETE = "incomplete"  # the server died mid-generation; the flushed text is kept
    ERROR = "error"  # the backend failed; the text so far is kept with the error
