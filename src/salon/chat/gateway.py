"""The OpenAI-compatible use case: a stateless completion relayed from a backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace

from salon.backends.registry import BackendRegistry, ModelRoute
from salon.chat.admission import Admission, Caller
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
    def __init__(
        self,
        registry: BackendRegistry,
        safety: SafetyGate | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._registry = registry
        # Opt-in, as in ChatService: without a gate every request is relayed.
        self._safety = safety
        # Without it (tests, tools) every request is relayed at once, unlimited.
        self._admission = admission

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
        caller: Caller | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Resolves the model now (an unknown model fails before any byte is sent);
        the returned iterator relays the backend's events one for one. A request the
        safety policy refuses is answered by salon itself, the backend never called."""
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        route = self._registry.resolve(model_id)
        request = CompletionRequest(route.name, tuple(messages), params, session_key)
        if self._safety is not None:
            return self._gated(self._safety, route, request, caller)
        return self._relayed(route, request, caller)

    def _relayed(
        self, route: ModelRoute, request: CompletionRequest, caller: Caller | None
    ) -> AsyncGenerator[StreamEvent, None]:
        if self._admission is None or caller is None:
            return route.backend.stream(request)
        return self._admitted(self._admission, caller, route, request)

    async def _gated(
        self,
        safety: SafetyGate,
        route: ModelRoute,
        request: CompletionRequest,
        caller: Caller | None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """The gate first — in a worker thread, with the guard model if one is configured —
        on the first `anext`, like admission: a refused request never reaches the backend."""
        verdict = await safety.acheck_messages(request.messages)
        if verdict is not None and verdict.blocked:
            events = _answer(verdict.decision.message or "I can't help with that.")
        else:
            events = self._relayed(route, request, caller)
        async with aclosing(events) as relayed:
            async for event in relayed:
                yield event

    async def _admitted(
        self, admission: Admission, caller: Caller, route: ModelRoute, request: CompletionRequest
    ) -> AsyncGenerator[StreamEvent, None]:
        """The backend's events, once the caller's limits allow and a slot is free: all of
        it happens on the first `anext`, which the API awaits before answering, so a
        refusal is a proper HTTP error. The slot is held until this generator closes."""
        model_id = await admission.admit(caller, route.id)
        if model_id != route.id:  # over the token quota: the fallback model answers
            route = self._registry.resolve(model_id)
            request = replace(request, model=route.name)
        produced, usage = 0, None
        async with admission.slot(route.id, caller.user_id):
            try:
                async with aclosing(route.backend.stream(request)) as events:
                    async for event in events:
                        if isinstance(event, TextDelta):
                            produced += 1
                        else:
                            usage = event.usage
                        yield event
            finally:
                # Backends without usage: one chunk ≈ one token, as the metrics count.
                await admission.spend(caller, usage.completion_tokens if usage else produced)


async def _answer(text: str) -> AsyncGenerator[StreamEvent, None]:
    """salon's own reply, shaped as a backend stream (one delta, then the end)."""
    yield TextDelta(text)
    yield Finished(FinishReason.STOP, Usage(0, 0))
