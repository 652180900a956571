"""Conversations, turns, branches and generations: the use cases behind the web app."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from salon.backends.registry import BackendRegistry, ModelRoute
from salon.chat.jobs import Clock, Delta, Ended, JobEvent, JobRunner
from salon.chat.safety import GateVerdict, Recovery, SafetyGate
from salon.domain import ChatMessage, CompletionRequest, MessageStatus
from salon.errors import Conflict, InvalidRequest
from salon.store.conversations import (
    ConversationRecord,
    ConversationStore,
    MessageRecord,
    NewMessage,
)

NEW_TITLE = "New chat"
# How far back the context reaches; a budget in characters keeps the prompt in bounds
# without a tokenizer round-trip (≈ 3–4 characters per token).
CONTEXT_MESSAGES = 200
RESTARTABLE = {MessageStatus.INCOMPLETE, MessageStatus.STOPPED, MessageStatus.ERROR}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ChatLimits:
    max_message_chars: int = 100_000
    context_max_chars: int = 24_000
    system_prompt: str | None = None
    # How long a follower waits on a generation that another process runs before
    # calling it lost (it polls the store meanwhile).
    orphan_timeout_s: float = 120.0
    poll_interval_s: float = 0.5


@dataclass(frozen=True, slots=True)
class Turn:
    user_message: MessageRecord
    assistant_message: MessageRecord


class ChatService:
    def __init__(
        self,
        store: ConversationStore,
        registry: BackendRegistry,
        runner: JobRunner,
        limits: ChatLimits,
        clock: Clock = utcnow,
        safety: SafetyGate | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runner = runner
        self._limits = limits
        self._clock = clock
        # Opt-in: without a gate every turn goes to the model, as before. `SafetyGate()`
        # is the embedded classifier and the shipped policy, loaded on first use.
        self._safety = safety

    # -- conversations -------------------------------------------------------------------

    async def create_conversation(
        self, user_id: str, title: str | None, model: str | None
    ) -> ConversationRecord:
        if model is not None:
            self._registry.resolve(model)
        now = self._clock()
        record = ConversationRecord(
            str(uuid.uuid4()), user_id, _title(title) or NEW_TITLE, model, None, now, now
        )
        return await self._store.create(record)

    async def conversations(
        self,
        user_id: str,
        *,
        query: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[ConversationRecord]:
        return await self._store.search(user_id, query=query, limit=limit, before=before)

    async def conversation(self, user_id: str, conversation_id: str) -> ConversationRecord:
        return await self._store.get(user_id, conversation_id)

    async def rename_or_switch_model(
        self, user_id: str, conversation_id: str, title: str | None, model: str | None
    ) -> ConversationRecord:
        values: dict[str, object] = {}
        if title is not None:
            if not _title(title):
                raise InvalidRequest("the title must not be empty", param="title")
            values["title"] = _title(title)
        if model is not None:
            self._registry.resolve(model)
            values["model"] = model
        return await self._store.update(user_id, conversation_id, values)

    async def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        await self._store.get(user_id, conversation_id)
        for job in self._runner.running_in(conversation_id):
            await self._runner.stop(job.message_id)
        await self._store.delete(user_id, conversation_id)

    async def branch(
        self, user_id: str, conversation_id: str, message_id: int
    ) -> ConversationRecord:
        await self._store.get(user_id, conversation_id)
        leaf = await self._store.newest_leaf_under(user_id, message_id)
        if leaf.conversation_id != conversation_id:
            raise InvalidRequest("that message belongs to another conversation")
        await self._store.touch(conversation_id, self._clock(), leaf.id)
        return await self._store.get(user_id, conversation_id)

    async def page(
        self, user_id: str, conversation_id: str, before: int | None, limit: int
    ) -> tuple[list[MessageRecord], bool]:
        conversation = await self._store.get(user_id, conversation_id)
        if before is not None:
            end = (await self._store.message(user_id, before)).parent_id
        else:
            end = conversation.current_leaf_id
        if end is None:
            return [], False
        return await self._store.path(user_id, conversation_id, end, limit)

    # -- turns ---------------------------------------------------------------------------

    async def post(
        self,
        user_id: str,
        conversation_id: str,
        content: str,
        *,
        parent_id: int | None,
        use_leaf: bool,
        model: str | None,
    ) -> Turn:
        """A user message and the answer it starts. `use_leaf` appends to the active
        branch; otherwise `parent_id` says where (an edit makes a new branch)."""
        self._check_content(content)
        conversation = await self._store.get(user_id, conversation_id)
        route = self._registry.resolve(model or conversation.model)
        parent = conversation.current_leaf_id if use_leaf else parent_id
        history = await self._history(user_id, conversation_id, parent, follows_answer=True)
        title = _title(content) if conversation.title == NEW_TITLE else None
        context = [*history, ChatMessage("user", content)]
        verdict = self._check(context)
        user_message, assistant = await self._store.append(
            user_id,
            conversation_id,
            parent,
            [NewMessage("user", content, MessageStatus.COMPLETE), _answer(route, verdict)],
            self._clock(),
            title=title,
        )
        if not _blocked(verdict):
            self._start(assistant, route, context, recovery=self._recovery(verdict))
        return Turn(
            await self._store.message(user_id, user_message.id),
            await self._store.message(user_id, assistant.id),
        )

    async def regenerate(self, user_id: str, message_id: int) -> MessageRecord:
        """A new answer beside an existing one; the new one becomes the active branch."""
        old = await self._assistant(user_id, message_id)
        conversation = await self._store.get(user_id, old.conversation_id)
        route = self._registry.resolve(conversation.model or old.model)
        history = await self._history(user_id, old.conversation_id, old.parent_id)
        verdict = self._check(history)
        (assistant,) = await self._store.append(
            user_id,
            old.conversation_id,
            old.parent_id,
            [_answer(route, verdict)],
            self._clock(),
        )
        if not _blocked(verdict):
            self._start(assistant, route, history, recovery=self._recovery(verdict))
        return await self._store.message(user_id, assistant.id)

    async def resume(self, user_id: str, message_id: int) -> MessageRecord:
        """Continue an answer that was stopped, interrupted or failed, in place."""
        message = await self._assistant(user_id, message_id)
        if message.status not in RESTARTABLE or self._runner.get(message_id):
            raise Conflict(
                f"this answer is {message.status.value}; only a stopped, "
                "incomplete or failed answer can be continued"
            )
        route = self._registry.resolve(message.model)
        history = await self._history(user_id, message.conversation_id, message.parent_id)
        if message.content:
            history.append(ChatMessage("assistant", message.content))
        await self._store.restart(message_id, self._clock())
        self._start(message, route, history, initial_text=message.content)
        await self._store.touch(message.conversation_id, self._clock(), None)
        return await self._store.message(user_id, message_id)

    async def stop(self, user_id: str, message_id: int) -> MessageRecord:
        message = await self._assistant(user_id, message_id)
        stopped = await self._runner.stop(message_id)
        if not stopped and message.status == MessageStatus.STREAMING:
            # Its job runs nowhere we can reach (a process that died): settle it here.
            await self._store.finish(
                message_id,
                content=message.content,
                status=MessageStatus.STOPPED,
                error=None,
                usage=None,
                now=self._clock(),
            )
        return await self._store.message(user_id, message_id)

    # -- following a generation ----------------------------------------------------------

    async def follow(self, user_id: str, message_id: int, have: int) -> AsyncIterator[JobEvent]:
        """The message's text after offset `have`, live while it is generated, then how
        it ended. Checks ownership before anything is sent."""
        message = await self._assistant(user_id, message_id)
        return self._follow(message, have)

    async def _follow(self, message: MessageRecord, have: int) -> AsyncIterator[JobEvent]:
        job = self._runner.get(message.id)
        if job is not None:
            async for event in job.follow(have):
                yield event
            return
        async for event in self._follow_store(message, have):
            yield event

    async def _follow_store(self, message: MessageRecord, have: int) -> AsyncIterator[JobEvent]:
        """A generation this process does not run: the store tells how it goes."""
        idle_since = self._clock()
        while True:
            if len(message.content) > have:
                yield Delta(len(message.content), message.content[have:])
                have = len(message.content)
                idle_since = self._clock()
            if message.status != MessageStatus.STREAMING:
                yield Ended(have, message.status, message.error, None)
                return
            if self._clock() - idle_since > timedelta(seconds=self._limits.orphan_timeout_s):
                yield Ended(have, MessageStatus.INCOMPLETE, "the generation was lost", None)
                return
            await asyncio.sleep(self._limits.poll_interval_s)
            message = await self._store.message(message.user_id, message.id)
            job = self._runner.get(message.id)
            if job is not None:  # continued here meanwhile
                async for event in job.follow(have):
                    yield event
                return

    async def message(self, user_id: str, message_id: int) -> MessageRecord:
        return await self._store.message(user_id, message_id)

    # -- helpers -------------------------------------------------------------------------

    def _start(
        self,
        assistant: MessageRecord,
        route: ModelRoute,
        history: list[ChatMessage],
        initial_text: str = "",
        recovery: Recovery | None = None,
    ) -> None:
        messages = self._fit(history)
        request = CompletionRequest(
            model=route.name, messages=tuple(messages), session_key=assistant.conversation_id
        )
        self._runner.start(
            assistant.id, assistant.conversation_id, route, request, initial_text, recovery
        )

    def _check(self, messages: list[ChatMessage]) -> GateVerdict | None:
        return self._safety.check_messages(messages) if self._safety else None

    def _recovery(self, verdict: GateVerdict | None) -> Recovery | None:
        return self._safety.recovery(verdict) if self._safety else None

    def _fit(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """The newest messages that fit the budget, the operator's instructions first."""
        budget = self._limits.context_max_chars
        kept: list[ChatMessage] = []
        for message in reversed(history):
            if kept and len(message.content) > budget:
                break
            kept.append(message)
            budget -= len(message.content)
        kept.reverse()
        if self._limits.system_prompt:
            kept.insert(0, ChatMessage("system", self._limits.system_prompt))
        return kept

    async def _history(
        self,
        user_id: str,
        conversation_id: str,
        end_id: int | None,
        *,
        follows_answer: bool = False,
    ) -> list[ChatMessage]:
        if end_id is None:
            return []
        path, _ = await self._store.path(user_id, conversation_id, end_id, CONTEXT_MESSAGES)
        if not path or path[-1].id != end_id:
            raise InvalidRequest(
                "parent_id is not a message of this conversation", param="parent_id"
            )
        if follows_answer and path[-1].role != "assistant":
            raise InvalidRequest("a message must follow an answer", param="parent_id")
        # An answer that failed before its first word says nothing to the model.
        return [
            ChatMessage("user" if m.role == "user" else "assistant", m.content)
            for m in path
            if m.content or m.role == "user"
        ]

    async def _assistant(self, user_id: str, message_id: int) -> MessageRecord:
        message = await self._store.message(user_id, message_id)
        if message.role != "assistant":
            raise InvalidRequest("that is not an answer", param="message_id")
        return message

    def _check_content(self, content: str) -> None:
        if not content.strip():
            raise InvalidRequest("the message is empty", param="content")
        if len(content) > self._limits.max_message_chars:
            raise InvalidRequest(
                f"the message is longer than {self._limits.max_message_chars} characters",
                param="content",
            )


def _blocked(verdict: GateVerdict | None) -> bool:
    return verdict is not None and verdict.blocked


def _answer(route: ModelRoute, verdict: GateVerdict | None) -> NewMessage:
    """The assistant message of a turn: to be generated, or, when the safety policy refuses
    the request, salon's own brief refusal, complete at once (the model is never called)."""
    if verdict is not None and verdict.blocked:
        text = verdict.decision.message or "I can't help with that."
        return NewMessage("assistant", text, MessageStatus.COMPLETE, route.id, verdict.note())
    return NewMessage("assistant", "", MessageStatus.STREAMING, route.id)


def _title(text: str | None) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= 80 else line[:79].rstrip() + "…"
