"""Conversations, turns, branches and generations: the use cases behind the web app."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from salon.backends.base import complete
from salon.backends.registry import BackendRegistry, ModelRoute
from salon.chat.admission import Admission, Caller
from salon.chat.jobs import Clock, Ended, GenerationJob, JobEvent, JobRunner
from salon.chat.personal import Enforcement, with_repair
from salon.chat.relay import Catching, channel
from salon.chat.safety import GateVerdict, Recovery, SafetyGate
from salon.domain import ChatMessage, CompletionRequest, MessageStatus, SamplingParams
from salon.errors import Conflict, InvalidRequest
from salon.personalization.checks import CheckResult
from salon.personalization.memory import Change
from salon.personalization.service import Conversationish, Personalizer
from salon.personalization.stack import TurnContext
from salon.store.broadcast import Broadcast, BroadcastUnavailable, Subscription
from salon.store.conversations import (
    ConversationRecord,
    ConversationStore,
    MessageRecord,
    NewMessage,
)
from salon.store.db import database_unavailable
from salon.store.memories import MemoryRecord

log = logging.getLogger(__name__)

NEW_TITLE = "New chat"
# Memory extraction by the model is a short side job.
EXTRACTION_PARAMS = SamplingParams(max_tokens=200, temperature=0.0)
# How far back the context reaches; a budget in characters keeps the prompt in bounds
# without a tokenizer round-trip (≈ 3–4 characters per token).
CONTEXT_MESSAGES = 200
# A follower reading another node's generation live checks the store after this much silence
# (the job may have ended without its last event reaching here, or its node may have died).
LIVE_SILENCE_S = 2.0
RESTARTABLE = {MessageStatus.INCOMPLETE, MessageStatus.STOPPED, MessageStatus.ERROR}
# How an answer is continued on a model that starts a new message after a trailing assistant
# one instead of extending it.
CONTINUE_ASKED = (
    "Continue your previous answer exactly where it stopped. Do not repeat what you already "
    "wrote and do not mention the interruption."
)


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
    # Personalization: enforce checkable settings; how facts are extracted from turns.
    enforce: bool = True
    extraction: str = "rules"  # "model" | "rules" | "off"
    revision_budget_s: float = 30.0
    # How long model extraction waits for the model to be idle before using the rules, and
    # how long the model must have been idle first.
    extraction_patience_s: float = 300.0
    extraction_grace_s: float = 3.0
    # Sampling for the web app's turns (the backend's defaults when unset).
    sampling: SamplingParams = field(default_factory=SamplingParams)


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
        personalizer: Personalizer | None = None,
        admission: Admission | None = None,
        broadcast: Broadcast | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runner = runner
        self._limits = limits
        self._clock = clock
        # Opt-in: without a gate every turn goes to the model, as before. `SafetyGate()`
        # is the embedded classifier and the shipped policy, loaded on first use.
        self._safety = safety
        # Without one, turns get the operator's prompt only (the /v1 gateway's behaviour).
        self._personalizer = personalizer
        self._memory = personalizer.memory if personalizer else None
        self._extraction: asyncio.Task[None] | None = None
        self._starting = 0  # turns between their start and their job's
        # Rate limits, quotas and queue room, checked before a turn stores anything.
        self._admission = admission
        # Joins the nodes: a follower here gets another node's generation live.
        self._broadcast = broadcast

    # -- conversations -------------------------------------------------------------------

    async def create_conversation(
        self,
        user_id: str,
        title: str | None,
        model: str | None,
        *,
        temporary: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> ConversationRecord:
        if model is not None:
            self._registry.resolve(model)
        if settings and self._personalizer is not None:
            settings = await self._personalizer.check_overrides(user_id, settings)
        now = self._clock()
        record = ConversationRecord(
            str(uuid.uuid4()),
            user_id,
            _title(title) or NEW_TITLE,
            model,
            None,
            now,
            now,
            settings or None,
            temporary,
        )
        return await self._store.create(record)

    async def set_conversation_settings(
        self, user_id: str, conversation_id: str, overrides: dict[str, Any]
    ) -> ConversationRecord:
        """Replace the conversation's personalization overrides ({} = the account's)."""
        await self._store.get(user_id, conversation_id)
        checked = (
            await self._personalizer.check_overrides(user_id, overrides)
            if self._personalizer
            else {}
        )
        return await self._store.update(user_id, conversation_id, {"settings": checked or None})

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
        if self._memory is not None:
            await self._memory.store.unindex_conversation(user_id, conversation_id)

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
        route = await self._admit(user_id, self._registry.resolve(model or conversation.model))
        parent = conversation.current_leaf_id if use_leaf else parent_id
        history = await self._history(user_id, conversation_id, parent, follows_answer=True)
        title = _title(content) if conversation.title == NEW_TITLE else None
        context = [*history, ChatMessage("user", content)]
        verdict = await self._check(context)
        # Every read the answer needs happens before the turn is written: if the database
        # goes away right after the write, the answer still starts (and its job retries its
        # final write) instead of staying "streaming" with nobody generating it.
        prepared = (
            None
            if _blocked(verdict)
            else await self._context(user_id, conversation, route, context)
        )
        user_message, assistant = await self._store.append(
            user_id,
            conversation_id,
            parent,
            [NewMessage("user", content, MessageStatus.COMPLETE), _answer(route, verdict)],
            self._clock(),
            title=title,
        )
        if not _blocked(verdict):
            await self._start(
                assistant,
                route,
                context,
                conversation,
                recovery=self._recovery(verdict),
                caution=verdict.instruction if verdict else None,
                prepared=(prepared,),
            )
        self._observe(conversation, user_message, route)
        return await self._turn(user_id, user_message, assistant)

    async def _turn(
        self, user_id: str, user_message: MessageRecord, assistant: MessageRecord
    ) -> Turn:
        """The stored turn as it is now (siblings, text so far); if the database went away
        after the turn was written, what the write returned: the turn *is* stored, and a
        503 would make the client send it again."""
        try:
            return Turn(
                await self._store.message(user_id, user_message.id),
                await self._store.message(user_id, assistant.id),
            )
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            log.warning("turn %s stored; re-reading it failed: database unavailable", assistant.id)
            return Turn(user_message, assistant)

    async def import_messages(
        self, user_id: str, conversation_id: str, messages: Sequence[NewMessage], now: datetime
    ) -> None:
        """Messages that happened elsewhere (an import, an evaluation's history), appended
        to the active branch as they are: nothing is generated."""
        conversation = await self._store.get(user_id, conversation_id)
        await self._store.append(
            user_id, conversation_id, conversation.current_leaf_id, messages, now
        )

    async def regenerate(self, user_id: str, message_id: int) -> MessageRecord:
        """A new answer beside an existing one; the new one becomes the active branch."""
        old = await self._assistant(user_id, message_id)
        conversation = await self._store.get(user_id, old.conversation_id)
        route = await self._admit(user_id, self._registry.resolve(conversation.model or old.model))
        history = await self._history(user_id, old.conversation_id, old.parent_id)
        verdict = await self._check(history)
        (assistant,) = await self._store.append(
            user_id,
            old.conversation_id,
            old.parent_id,
            [_answer(route, verdict)],
            self._clock(),
        )
        if not _blocked(verdict):
            await self._start(
                assistant,
                route,
                history,
                conversation,
                recovery=self._recovery(verdict),
                caution=verdict.instruction if verdict else None,
            )
        return await self._store.message(user_id, assistant.id)

    async def resume(self, user_id: str, message_id: int) -> MessageRecord:
        """Continue an answer that was stopped, interrupted or failed, in place."""
        message = await self._assistant(user_id, message_id)
        if message.status not in RESTARTABLE or self._runner.get(message_id):
            raise Conflict(
                f"this answer is {message.status.value}; only a stopped, "
                "incomplete or failed answer can be continued"
            )
        route = await self._admit(user_id, self._registry.resolve(message.model))
        history = await self._history(user_id, message.conversation_id, message.parent_id)
        if message.content:
            history.append(ChatMessage("assistant", message.content))
            if not route.continues:
                # A model that cannot continue a trailing assistant message (a hosted API)
                # starts a new one: it is asked to carry on from where the answer stopped.
                history.append(ChatMessage("user", CONTINUE_ASKED))
        await self._store.restart(message_id, self._clock())
        conversation = await self._store.get(user_id, message.conversation_id)
        # A continuation is not re-checked: the enforcer never saw the first part.
        await self._start(
            message, route, history, conversation, initial_text=message.content, enforce=False
        )
        await self._store.touch(message.conversation_id, self._clock(), None)
        return await self._store.message(user_id, message_id)

    async def stop(self, user_id: str, message_id: int) -> MessageRecord:
        message = await self._assistant(user_id, message_id)
        stopped = await self._runner.stop(message_id)
        if not stopped and message.status == MessageStatus.STREAMING:
            # Its job runs on another node, or on none (a process that died): settled here,
            # and a node that still runs it stops at its next checkpoint.
            await self._store.settle(message_id, MessageStatus.STOPPED, self._clock())
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
        """A generation this process does not run: live from the node that runs it when a
        broadcast joins the nodes (chat/relay.py), and from the store, which tells how it
        goes in any case."""
        async with AsyncExitStack() as stack:
            position = Catching(have, await self._subscribe(stack, message.id))
            idle_since = self._clock()
            while True:
                if (caught := position.join(message.content)) is not None:
                    yield caught
                    idle_since = self._clock()
                if message.status != MessageStatus.STREAMING:
                    yield Ended(position.have, message.status, message.error, None)
                    return
                if self._clock() - idle_since > timedelta(seconds=self._limits.orphan_timeout_s):
                    lost = "the generation was lost"
                    yield Ended(position.have, MessageStatus.INCOMPLETE, lost, None)
                    return
                if position.live is None:
                    await asyncio.sleep(self._limits.poll_interval_s)
                else:
                    try:
                        async for delta in position.deltas(LIVE_SILENCE_S):
                            yield delta
                            idle_since = self._clock()
                    except BroadcastUnavailable:
                        position.live = None
                message = await self._store.message(message.user_id, message.id)
                job = self._runner.get(message.id)
                if job is not None:  # continued here meanwhile
                    async for event in job.follow(position.have):
                        yield event
                    return

    async def _subscribe(self, stack: AsyncExitStack, message_id: int) -> Subscription | None:
        if self._broadcast is None:
            return None
        try:
            return await stack.enter_async_context(self._broadcast.subscribe(channel(message_id)))
        except BroadcastUnavailable:
            return None

    async def message(self, user_id: str, message_id: int) -> MessageRecord:
        return await self._store.message(user_id, message_id)

    # -- helpers -------------------------------------------------------------------------

    async def _start(
        self,
        assistant: MessageRecord,
        route: ModelRoute,
        history: list[ChatMessage],
        conversation: ConversationRecord,
        *,
        initial_text: str = "",
        recovery: Recovery | None = None,
        enforce: bool = True,
        caution: str | None = None,
        prepared: tuple[TurnContext | None] | None = None,
    ) -> None:
        """`prepared`: the personalization context, when the caller read it already."""
        # From here until the job runs, no extraction may take the model (see _idle), and
        # one already running gives it up now.
        self._starting += 1
        try:
            self._yield_model()
            await self._launch(
                assistant,
                route,
                history,
                conversation,
                initial_text,
                recovery,
                enforce,
                caution,
                prepared,
            )
        finally:
            self._starting -= 1

    async def _launch(
        self,
        assistant: MessageRecord,
        route: ModelRoute,
        history: list[ChatMessage],
        conversation: ConversationRecord,
        initial_text: str,
        recovery: Recovery | None,
        enforce: bool,
        caution: str | None = None,
        prepared: tuple[TurnContext | None] | None = None,
    ) -> None:
        context = (
            prepared[0]
            if prepared is not None
            else await self._context(assistant.user_id, conversation, route, history)
        )
        system = context.system if context else None
        if caution:
            # The safety policy's instruction for an uncertain request goes last, after the
            # operator's and the user's instructions, for this turn only.
            base = system if system is not None else self._limits.system_prompt
            system = "\n\n".join(part for part in (base, caution) if part)
        request = CompletionRequest(
            model=route.name,
            messages=tuple(self._fit(history, system)),
            params=self._limits.sampling,
            session_key=assistant.conversation_id,
        )
        enforcement = None
        if context is not None and enforce and self._limits.enforce and context.constraints:
            enforcement = Enforcement(context.constraints)
        job = self._runner.start(
            assistant.id,
            assistant.conversation_id,
            route,
            request,
            initial_text,
            recovery,
            enforcement,
            self._reviser(assistant, route, request, enforcement),
            user_id=assistant.user_id,
        )
        if not initial_text:
            self._after(job, assistant, route, request, conversation)

    async def _context(
        self,
        user_id: str,
        conversation: ConversationRecord,
        route: ModelRoute,
        history: list[ChatMessage],
    ) -> TurnContext | None:
        if self._personalizer is None:
            return None
        last_user = next((m.content for m in reversed(history) if m.role == "user"), "")
        return await self._personalizer.prepare(
            user_id, _conversationish(conversation), last_user, share_personal=route.personal_data
        )

    def _reviser(
        self,
        original: MessageRecord,
        route: ModelRoute,
        request: CompletionRequest,
        enforcement: Enforcement | None,
    ) -> Callable[[GenerationJob, list[CheckResult]], Awaitable[int | None]] | None:
        """A revision: one new answer beside the first, asked with the failed rules spelt
        out, and only when the first was quick enough that another costs about as much."""
        if enforcement is None:
            return None

        async def revise(job: GenerationJob, failed: list[CheckResult]) -> int | None:
            if time.monotonic() - job.started > self._limits.revision_budget_s:
                return None
            (revision,) = await self._store.append(
                original.user_id,
                original.conversation_id,
                original.parent_id,
                [NewMessage("assistant", "", MessageStatus.STREAMING, route.id)],
                self._clock(),
            )
            retry = replace(request, messages=with_repair(request.messages, failed, job.text()))
            self._runner.start(
                revision.id,
                revision.conversation_id,
                route,
                retry,
                enforcement=enforcement.revision(original.id),
                user_id=original.user_id,
            )
            return revision.id

        return revise

    # -- admission control -----------------------------------------------------------------

    async def _admit(self, user_id: str, route: ModelRoute) -> ModelRoute:
        """Refuses a turn over the user's limits or into a full queue (nothing stored yet);
        returns the route to use: the fallback model's once the user's tokens ran out. The
        job itself waits for a slot (JobRunner)."""
        if self._admission is None:
            return route
        model_id = await self._admission.admit(Caller(user_id), route.id)
        return route if model_id == route.id else self._registry.resolve(model_id)

    # -- personalization -----------------------------------------------------------------

    async def preview(
        self,
        user_id: str,
        conversation_id: str | None,
        draft: str,
        model: str | None,
        *,
        temporary: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> tuple[TurnContext | None, list[ChatMessage]]:
        """Exactly what the model would receive if `draft` were sent now: the same code
        path as a turn, without starting it. Without a conversation: a chat about to be
        created with `temporary` and `settings`."""
        if conversation_id is None:
            if settings and self._personalizer is not None:
                settings = await self._personalizer.check_overrides(user_id, settings)
            now = self._clock()
            conversation = ConversationRecord(
                "", user_id, NEW_TITLE, model, None, now, now, settings or None, temporary
            )
        else:
            conversation = await self._store.get(user_id, conversation_id)
        route = self._registry.resolve(model or conversation.model)
        history = await self._history(user_id, conversation.id, conversation.current_leaf_id)
        history.append(ChatMessage("user", draft))
        context = await self._context(user_id, conversation, route, history)
        return context, self._fit(history, context.system if context else None)

    def _observe(
        self, conversation: ConversationRecord, message: MessageRecord, route: ModelRoute
    ) -> None:
        """A new user message: searchable from now on, and an explicit "remember that" is
        saved at once — in the background, beside the reply, never before it."""
        if self._memory is None or conversation.temporary:
            return
        by_rules = self._limits.extraction == "rules" or (
            self._limits.extraction == "model" and not route.personal_data
        )
        self._memory.spawn(self._observe_now(message, by_rules), "observe")

    async def _observe_now(self, message: MessageRecord, by_rules: bool) -> None:
        assert self._memory is not None and self._personalizer is not None
        profile = await self._personalizer.profile(message.user_id)
        if profile.reference_history:
            await self._memory.index_messages(
                message.user_id,
                [(message.id, message.conversation_id, message.content, message.created_at)],
            )
        if profile.memory_enabled:
            await self._memory.act_on(
                message.user_id,
                message.conversation_id,
                message.id,
                message.content,
                use_rules=by_rules,
            )

    def _after(
        self,
        job: GenerationJob,
        assistant: MessageRecord,
        route: ModelRoute,
        request: CompletionRequest,
        conversation: ConversationRecord,
    ) -> None:
        wanted = self._limits.extraction == "model" and route.personal_data
        if self._memory is None or conversation.temporary or not wanted:
            return
        self._memory.spawn(self._extract_after(job, assistant, route, request), "extract")

    async def _extract_after(
        self,
        job: GenerationJob,
        assistant: MessageRecord,
        route: ModelRoute,
        request: CompletionRequest,
    ) -> None:
        """Once the answer is complete and the model idle, ask the model which durable
        facts the turn revealed. The prompt extends the conversation the model just
        processed, so its cached prefix serves both this and the next turn."""
        assert self._memory is not None and self._personalizer is not None
        if job.task is not None:
            await asyncio.wait({job.task})
        answer = await self._store.message(assistant.user_id, assistant.id)
        if answer.status != MessageStatus.COMPLETE or assistant.parent_id is None:
            return
        if not (await self._personalizer.profile(assistant.user_id)).memory_enabled:
            return
        said = await self._store.message(assistant.user_id, assistant.parent_id)
        prefix = (*request.messages, ChatMessage("assistant", answer.content))

        async def ask(prompt: list[tuple[str, str]]) -> str:
            folded = "\n\n".join(content for _, content in prompt)
            extraction = replace(
                request,
                messages=(*prefix, ChatMessage("user", folded)),
                params=EXTRACTION_PARAMS,
            )
            return (await complete(route.backend, extraction)).text

        args = (assistant.user_id, assistant.conversation_id, said.id, said.content)
        if not await self._idle():
            await self._memory.act_on(*args, use_rules=True)
            return
        self._extraction = asyncio.current_task()
        try:
            await self._memory.extract_with_model(*args, answer.content, ask)
        except asyncio.CancelledError:
            # A reply needs the model: the rules stand in for this turn.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._memory.act_on(*args, use_rules=True, explicit=False)
        finally:
            self._extraction = None

    async def _idle(self) -> bool:
        """Wait (bounded) until no answer has been generated or prepared in this process for
        `extraction_grace_s`: a user who answers at once should find the model free, not
        behind an extraction that must first be cancelled (llama.cpp stops between prompt
        batches, which can take seconds on a CPU)."""
        now = time.monotonic()
        deadline, quiet_since = now + self._limits.extraction_patience_s, now
        while time.monotonic() - quiet_since < self._limits.extraction_grace_s:
            if time.monotonic() > deadline:
                return False
            if self._runner.busy or self._starting:
                quiet_since = time.monotonic()
            await asyncio.sleep(0.1)
        return True

    def _yield_model(self) -> None:
        """A reply is starting: a running extraction gives the model up at once."""
        if self._extraction is not None and not self._extraction.done():
            self._extraction.cancel()

    async def safety_summary(self, days: int) -> list[dict[str, Any]]:
        """For the admin: per model, the share of answers the safety layer blocked, answered
        with caution or recovered over the last `days` days."""
        since = self._clock() - timedelta(days=days)
        rows = await self._store.safety_summary(since)
        return [
            {
                "model": model,
                "answers": total,
                "blocked": acted.get("blocked", 0),
                "recovered": acted.get("recovered", 0),
                "recovery_failed": acted.get("recovery_failed", 0),
                # refusals of turns the classifier cleared that a second reading upheld
                "refusal_kept": acted.get("refusal_kept", 0),
                "caution": acted.get("caution", 0),
                "blocked_rate": round(acted.get("blocked", 0) / total, 4) if total else 0.0,
                "caution_rate": round(acted.get("caution", 0) / total, 4) if total else 0.0,
                "recovered_rate": round(acted.get("recovered", 0) / total, 4) if total else 0.0,
            }
            for model, total, acted in sorted(rows)
        ]

    async def memory_changes(self, user_id: str, message_id: int) -> list[Change]:
        """What was saved from a message (the chat's chip)."""
        if self._memory is None:
            return []
        await self._store.message(user_id, message_id)  # owned, or 404
        records = await self._memory.store.from_messages(user_id, [message_id])
        return [Change(_action(r, message_id), r) for r in records]

    async def _check(self, messages: list[ChatMessage]) -> GateVerdict | None:
        # The async gate: it may consult a guard model (bounded by its timeout).
        return await self._safety.acheck_messages(messages) if self._safety else None

    def _recovery(self, verdict: GateVerdict | None) -> Recovery | None:
        return self._safety.recovery(verdict) if self._safety else None

    def _fit(self, history: list[ChatMessage], system: str | None = None) -> list[ChatMessage]:
        """The newest messages that fit the budget, the instructions first (the operator's
        alone, or the whole personalization stack, which starts with them)."""
        system = system if system is not None else self._limits.system_prompt
        budget = self._limits.context_max_chars - len(system or "")
        kept: list[ChatMessage] = []
        for message in reversed(history):
            if kept and len(message.content) > budget:
                break
            kept.append(message)
            budget -= len(message.content)
        kept.reverse()
        if system:
            kept.insert(0, ChatMessage("system", system))
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


def _action(record: MemoryRecord, message_id: int) -> str:
    if record.forgotten_by == message_id:
        return "forgotten"
    return "saved" if record.supersedes_id is None else "updated"


def _conversationish(conversation: ConversationRecord) -> Conversationish:
    return Conversationish(conversation.id, conversation.settings, conversation.temporary)


def _blocked(verdict: GateVerdict | None) -> bool:
    return verdict is not None and verdict.blocked


def _answer(route: ModelRoute, verdict: GateVerdict | None) -> NewMessage:
    """The assistant message of a turn: to be generated, or, when the safety policy refuses
    the request, salon's own brief refusal, complete at once (the model is never called)."""
    if verdict is not None and verdict.blocked:
        text = verdict.decision.message or "I can't help with that."
        return NewMessage("assistant", text, MessageStatus.COMPLETE, route.id, verdict.note())
    # An uncertain request is answered with the policy's caution: recorded, so the admin's
    # rates and the message itself show it.
    note = verdict.note() if verdict is not None and verdict.instruction else None
    return NewMessage("assistant", "", MessageStatus.STREAMING, route.id, note)


def _title(text: str | None) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= 80 else line[:79].rstrip() + "…"
