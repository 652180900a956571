"""The seam every text backend implements, and the one helper built on it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from salon.domain import CompletionRequest, FinishReason, StreamEvent, TextDelta, Usage


class TextBackend(Protocol):
    """A source of streamed chat completions.

    `stream` yields `TextDelta`s as the model produces them and ends with exactly one
    `Finished`. Transport and model failures are raised as `salon.errors.BackendError`
    subclasses (mapped once, inside the adapter); cancelling the iterator stops generation.
    """

    def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    reason: FinishReason
    usage: Usage


async def complete(backend: TextBackend, request: CompletionRequest) -> Completion:
    """The non-streaming call: collect the stream."""
    parts: list[str] = []
    async for event in backend.stream(request):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return Completion("".join(parts), event.reason, event.usage)
    raise RuntimeError("backend stream ended without a Finished event")
