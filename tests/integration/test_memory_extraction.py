"""Memory extraction by the chat model, on a real database with a scripted backend: it runs
after the answer, extends the very conversation the model just processed (so its cached
prefix serves the next turn), supersedes what changed, gives the model up the moment a new
reply needs it (the rules stand in), and never runs on a backend that must not receive
personal data."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from salon.backends.embeddings import HashingEmbedder
from salon.backends.registry import ModelRoute
from salon.chat.jobs import Delta, JobRunner
from salon.chat.service import ChatLimits, ChatService, utcnow
from salon.domain import CompletionRequest, Finished, FinishReason, StreamEvent, TextDelta, Usage
from salon.personalization.memory import MemoryService
from salon.personalization.service import Personalizer
from salon.store.conversations import ConversationStore
from salon.store.memories import CURRENT, SUPERSEDED, MemoryStore
from salon.store.profiles import ProfileStore
from salon.store.tables import users

MARKER = "You save long-term memories about the USER"


class Scripted:
    """Answers chat turns with a short reply; answers extraction requests with `facts`
    (JSON lines), after `extraction_delay_s`. Records every request and cancellation."""

    def __init__(self, facts: list[str], extraction_delay_s: float = 0.0) -> None:
        self.facts = list(facts)
        self.extraction_delay_s = extraction_delay_s
        self.calls: list[CompletionRequest] = []
        self.cancelled = 0

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        self.calls.append(request)
        extracting = MARKER in request.messages[-1].content
        try:
            if extracting:
                await asyncio.sleep(self.extraction_delay_s)
                text = self.facts.pop(0) if self.facts else ""
            else:
                text = "Noted, happy to help with that."
            for i in range(0, len(text), 8):
                await asyncio.sleep(0.001)
                yield TextDelta(text[i : i + 8])
            yield Finished(FinishReason.STOP, Usage(10, 10))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def close(self) -> None:
        return None


class Registry:
    def __init__(self, backend: Scripted, personal_data: bool = True) -> None:
        self.route = ModelRoute("s:m", "s", "m", backend, personal_data)  # type: ignore[arg-type]

    @property
    def ids(self) -> list[str]:
        return [self.route.id]

    @property
    def default(self) -> str:
        return self.route.id

    def resolve(self, model_id: str | None) -> ModelRoute:
        return self.route


async def _setup(
    engine: AsyncEngine, backend: Scripted, *, personal_data: bool = True, grace_s: float = 0.1
) -> tuple[ChatService, MemoryService, str, str]:
    user_id = str(uuid.uuid4())
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=user_id,
                username=f"u{user_id[:8]}",
                password_hash="x",
                role="user",
                created_at=datetime.now(UTC),
            )
        )
    store = ConversationStore(engine)
    memory = MemoryService(MemoryStore(engine), HashingEmbedder, utcnow)
    personalizer = Personalizer(ProfileStore(engine), memory, utcnow)
    chat = ChatService(
        store,
        Registry(backend, personal_data),  # type: ignore[arg-type]
        JobRunner(store, 0.02, utcnow),
        ChatLimits(extraction="model", extraction_grace_s=grace_s),
        personalizer=personalizer,
    )
    conversation = await chat.create_conversation(user_id, None, None)
    return chat, memory, user_id, conversation.id


async def _say(chat: ChatService, user_id: str, cid: str, text: str) -> float:
    """Post a turn and read its answer to the end; returns the time to its first delta."""
    started = asyncio.get_running_loop().time()
    turn = await chat.post(user_id, cid, text, parent_id=None, use_leaf=True, model=None)
    first = None
    async for event in await chat.follow(user_id, turn.assistant_message.id, 0):
        if first is None and isinstance(event, Delta):
            first = asyncio.get_running_loop().time() - started
    assert first is not None
    return first


async def test_the_model_extracts_after_the_answer_on_the_same_prefix(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(
        [
            '{"kind": "fact", "subject": "home_city", "text": "I live in Lyon", "language": "en"}',
            '{"kind": "fact", "subject": "home_city", "text": "I live in Oslo", "language": "en"}',
        ]
    )
    chat, memory, user_id, cid = await _setup(engine, backend)
    await _say(chat, user_id, cid, "We are settling in nicely here in Lyon, any bakery tips?")
    await memory.drain()

    turn, extraction = backend.calls
    # The extraction prompt is the turn's own prompt + the answer + the request: the
    # model's cached prefix covers everything before the request.
    assert extraction.messages[: len(turn.messages)] == turn.messages
    assert extraction.messages[len(turn.messages)].role == "assistant"
    assert MARKER in extraction.messages[-1].content
    (saved,) = await memory.list_memories(user_id)
    assert (saved.text, saved.subject, saved.origin) == ("I live in Lyon", "home_city", "extracted")
    assert saved.source_message_id is not None

    await _say(chat, user_id, cid, "Big change: we moved to Oslo last week!")
    await memory.drain()
    versions = {(m.text, m.status) for m in await memory.list_memories(user_id, history=True)}
    assert versions == {("I live in Oslo", CURRENT), ("I live in Lyon", SUPERSEDED)}


async def test_a_new_reply_takes_the_model_from_a_running_extraction(
    engine: AsyncEngine,
) -> None:
    # The interrupted extraction never answers; the next turn's own extraction finds nothing.
    backend = Scripted([""], extraction_delay_s=2.0)
    chat, memory, user_id, cid = await _setup(engine, backend)
    await _say(chat, user_id, cid, "I live in Lyon and I need a gift idea for my sister")
    while len(backend.calls) < 2:  # the extraction has started and is waiting on the model
        await asyncio.sleep(0.01)
    ttft = await _say(chat, user_id, cid, "Something under 30 euros please")
    await memory.drain()
    assert ttft < 1.0  # not the 2 s the extraction would have held the model
    assert backend.cancelled == 1
    # The rules stood in for the model on the interrupted turn.
    assert [m.text for m in await memory.list_memories(user_id)] == ["I live in Lyon"]


async def test_no_extraction_by_a_model_that_must_not_get_personal_data(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(['{"kind": "fact", "subject": null, "text": "x", "language": "en"}'])
    chat, memory, user_id, cid = await _setup(engine, backend, personal_data=False)
    await _say(chat, user_id, cid, "I live in Lyon, what's on this weekend?")
    await memory.drain()
    assert len(backend.calls) == 1  # the turn only
    assert [m.text for m in await memory.list_memories(user_id)] == ["I live in Lyon"]  # rules


async def test_a_quick_follow_up_finds_the_model_free(engine: AsyncEngine) -> None:
    """Extraction waits for the model to have been idle a moment: a user who answers at
    once is never queued behind it (nor behind its cancellation)."""
    backend = Scripted(["", ""])
    chat, memory, user_id, cid = await _setup(engine, backend, grace_s=1.0)
    await _say(chat, user_id, cid, "I live in Lyon, what's on this weekend?")
    await _say(chat, user_id, cid, "And next weekend?")
    await memory.drain()
    kinds = ["extract" if MARKER in c.messages[-1].content else "turn" for c in backend.calls]
    assert kinds == ["turn", "turn", "extract", "extract"]
    assert backend.cancelled == 0
