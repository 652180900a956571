"""The OpenAI-compatible use case: a stateless completion relayed from a backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from salon.backends.registry import BackendRegistry
from salon.chat.safety import SafetyGate
from salon.domain import (
    ChatMessage,
    CompletionRequest,
    Finished,
    FinishReason,
    SamplingParams,
    StreamEvent,
    TextDelta,
    Usage,
)
from salon.errors import InvalidRequest


class Gateway:
    def __init__(self, registry: BackendRegistry, safety: SafetyGate | None = None) -> None:
        self._registry = registry
        # Opt-in, as in ChatService: without a gate every request is relayed.
        self._safety = safety

    def models(self) -> list[str]:
        return self._registry.ids

    @property
    def default_model(self) -> str:
        return self._registry.default

    def stream(
        self,
        model_id: str,
        messages: list[ChatMessage],
        params: SamplingParams,
        session_key: str | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Resolves the model now (an unknown model fails before any byte is sent);
        the returned iterator relays the backend's events one for one. A request the
        safety policy refuses is answered by salon itself, the backend never called."""
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        route = self._registry.resolve(model_id)
        if self._safety is not None:
            verdict = self._safety.check_messages(messages)
            if verdict is not None and verdict.blocked:
                return _answer(verdict.decision.message or "I can't help with that.")
        request = CompletionRequest(route.name, tuple(messages), params, session_key)
        return route.backend.stream(request)


async def _answer(text: str) -> AsyncGenerator[StreamEvent, None]:
    """salon's own reply, shaped as a backend stream (one delta, then the end)."""
    yield TextDelta(text)
    yield Finished(FinishReason.STOP, Usage(0, 0))
