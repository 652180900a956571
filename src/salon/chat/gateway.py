"""The OpenAI-compatible use case: a stateless completion relayed from a backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from salon.backends.registry import BackendRegistry
from salon.domain import ChatMessage, CompletionRequest, SamplingParams, StreamEvent
from salon.errors import InvalidRequest


class Gateway:
    def __init__(self, registry: BackendRegistry) -> None:
        self._registry = registry

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
        the returned iterator relays the backend's events one for one."""
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        route = self._registry.resolve(model_id)
        request = CompletionRequest(route.name, tuple(messages), params, session_key)
        return route.backend.stream(request)
