"""Memory: saved memories and the retrieval of what a user said before.

- Saving: explicit requests ("remember that ...") and facts found in a turn are saved as
  typed memories; one about a subject that already has a current memory supersedes it.
- Retrieval: hybrid (lexical + MiniLM embeddings) over current memories and the user's past
  messages, held per user in an in-memory index that catches up with the store by revision
  (so several processes stay consistent) and answers in milliseconds.
- Everything heavy (embedding, model extraction) runs off the reply's path: in a thread, in
  the background, and model extraction only while no reply is being generated.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from salon.backends.embeddings import Embedder
from salon.personalization.extract import (
    Candidate,
    ForgetRequest,
    explicit_request,
    extraction_messages,
    grounded,
    parse_extraction,
    rule_based,
)
from salon.personalization.recall_index import Item, RecallIndex
from salon.personalization.stack import Recalled
from salon.store.memories import (
    CURRENT,
    SUPERSEDED,
    MemoryRecord,
    MemoryStore,
    NewMemory,
    NewRecallItem,
    RecallRow,
)

log = logging.getLogger(__name__)

# What enters a turn's context, in characters (≈ 4 per token): enough for a handful of
# memories and snippets without crowding out the conversation on an 8k-token model.
MEMORY_BUDGET_CHARS = 1200
HISTORY_BUDGET_CHARS = 1200
HISTORY_SNIPPET_CHARS = 300
# Below these scores an item is not worth its tokens (scores are the index's fused ones).
MIN_MEMORY_SCORE = 0.2
MIN_HISTORY_SCORE = 0.35
# A new memory this close to a current one (cosine) says nothing new.
DUPLICATE_COSINE = 0.93
# How sure retrieval must be before "forget that ..." deletes a memory.
FORGET_MIN_SCORE = 0.3
# Only so much of a message is indexed: the start of a long paste says what it is about.
INDEX_CHARS = 2000
# Questions rarely hold what a later question needs (facts are stated), yet they resemble
# other questions — in French, Spanish and German strongly so with MiniLM. A message that is
# only questions ranks below statements of equal similarity. Measured on the memory suite.
# "Only questions" is judged clause by clause (`_parts`): "Je suis végétarienne, une idée de
# plat ?" states a fact before it asks, as people write in every language, and is a statement.
QUESTION_WEIGHT = 0.7
# Search asks the index for more than it returns, so the re-ranking above can reorder them.
OVERFETCH = 3
_SENTENCE = re.compile(r"(?<=[.!?…])\s+|\n+")
# Clause breaks inside a question sentence: , ; : and dashes between spaces.
_CLAUSE = re.compile(r"[,;:]\s+|\s+[—–-]\s+")
_WORDS = re.compile(r"\w+")
_FIRST_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)?")
MIN_STATEMENT_WORDS = 3
# Words a question opens with (en, fr, es, de, it, pt, nl): a clause opening with one asks.
_OPENER_TEXT = (
    "how what when where why who whom whose which do does did can could would should "
    "is are was were will shall may might any anything "
    "comment quoi quel quelle quels quelles où quand pourquoi qui combien est-ce peux "
    "pouvez puis-je "
    "cómo qué cuál cuáles cuándo dónde quién quiénes cuánto cuánta cuántos puedes podrías "
    "wie was wann wo woher wohin warum wer wen wem welche welcher welches kannst könntest "
    "gibt "
    "come cosa quale quali quando dove perché chi quanto quanta quanti puoi potresti "
    "como qual quais onde porque quem quanto quantos pode podes "
    "hoe wat wanneer waar waarom wie welke kun kan "
    # a condition belongs to the question it qualifies: "and if it fails, does …?"
    "if si wenn falls se"
)
QUESTION_OPENERS = frozenset(_OPENER_TEXT.split())
# Words before the opener that do not change what a clause does: "and how …", "et si …".
_CONNECTIVE_TEXT = (
    "and but so ok okay also then et mais puis alors y pero entonces und aber dann e ma poi "
    "allora mas então en maar dan"
)
CONNECTIVES = frozenset(_CONNECTIVE_TEXT.split())
CACHED_USERS = 64

# Completes a list of (role, content) messages with the conversation's backend.
Complete = Callable[[list[tuple[str, str]]], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Found:
    key: str
    kind: str
    id: int
    text: str
    score: float
    created_at: datetime
    message_ids: tuple[int, ...]
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class Change:
    """What a turn did to memory, for the chat's chip (with undo)."""

    action: str  # "saved" | "updated" | "forgotten"
    memory: MemoryRecord
    previous: MemoryRecord | None = None


@dataclass
class _UserIndex:
    index: RecallIndex
    rev: int = 0
    meta: dict[str, RecallRow] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class MemoryService:
    def __init__(
        self,
        store: MemoryStore,
        embedder: Callable[[], Embedder],
        clock: Callable[[], datetime],
        *,
        undo_window: timedelta = timedelta(hours=1),
    ) -> None:
        self._store = store
        self._make_embedder = embedder
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self._clock = clock
        self._undo_window = undo_window
        self._indexes: OrderedDict[str, _UserIndex] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._model_turn = asyncio.Lock()  # one model extraction at a time

    @property
    def store(self) -> MemoryStore:
        return self._store

    # -- embeddings ----------------------------------------------------------------------

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            with self._embedder_lock:
                if self._embedder is None:
                    self._embedder = self._make_embedder()
        return self._embedder

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        # ~5-10 ms a sentence of numpy: off the event loop.
        return await asyncio.to_thread(lambda: self._get_embedder().embed(list(texts)))

    async def warm_up(self) -> None:
        """Build the embedder, so that a missing or broken model shows at start-up. MiniLM
        reads its weights on first use (embeddings.MiniLM): an idle server does not hold
        them."""
        await asyncio.to_thread(self._get_embedder)

    async def _vector(self, text: str) -> bytes:
        return bytes((await self.embed([text]))[0].astype(np.float32).tobytes())

    # -- saving --------------------------------------------------------------------------

    async def act_on(
        self,
        user_id: str,
        conversation_id: str,
        message_id: int,
        text: str,
        *,
        use_rules: bool,
        explicit: bool = True,
    ) -> list[Change]:
        """A user message: act on an explicit request ("remember that ...", "forget
        that ...") and, with `use_rules`, save what the high-precision rules find."""
        request = explicit_request(text) if explicit else None
        if isinstance(request, ForgetRequest):
            return await self._forget(user_id, request.query, message_id)
        candidates = request or (rule_based(text) if use_rules else [])
        return await self.save(
            user_id, candidates, source_message_id=message_id, conversation_id=conversation_id
        )

    async def extract_with_model(
        self,
        user_id: str,
        conversation_id: str,
        message_id: int,
        user_text: str,
        reply: str,
        complete: Complete,
    ) -> list[Change]:
        """Ask the chat model which durable facts the turn revealed; the rules stand in
        when the model's answer cannot be used."""
        if explicit_request(user_text) is not None:
            return []  # already handled, instantly, by observe()
        current = await self._store.list_memories(user_id, limit=50)
        prompt = extraction_messages(
            user_text, reply, [(m.kind, m.subject, m.text) for m in current]
        )
        async with self._model_turn:
            try:
                answer = await complete(prompt)
                candidates = [c for c in parse_extraction(answer) if grounded(c, user_text)]
            except Exception as exc:  # a failed side job must never reach the user
                log.warning("memory extraction by the model failed: %s", exc)
                candidates = rule_based(user_text)
        return await self.save(
            user_id, candidates, source_message_id=message_id, conversation_id=conversation_id
        )

    async def save(
        self,
        user_id: str,
        candidates: Sequence[Candidate],
        *,
        source_message_id: int | None = None,
        conversation_id: str | None = None,
        origin: str | None = None,
    ) -> list[Change]:
        changes: list[Change] = []
        for candidate in candidates:
            vector = (await self.embed([candidate.text]))[0]
            if await self._is_duplicate(user_id, candidate, vector):
                continue
            new = NewMemory(
                candidate.kind,
                candidate.text,
                candidate.language,
                origin or ("explicit" if candidate.explicit else "extracted"),
                candidate.subject,
                source_message_id,
                conversation_id,
            )
            record, old = await self._store.add(user_id, new, _blob(vector), self._clock())
            changes.append(Change("updated" if old else "saved", record, old))
        return changes

    async def _is_duplicate(self, user_id: str, candidate: Candidate, vector: np.ndarray) -> bool:
        hits = await self._search(user_id, candidate.text, vector, 3, kinds={"memory"})
        for key, _score, semantic in hits:
            row = self._meta(user_id, key)
            same_text = row is not None and _norm(row.text) == _norm(candidate.text)
            if same_text or semantic >= DUPLICATE_COSINE:
                return True
        return False

    async def _forget(self, user_id: str, query: str, message_id: int) -> list[Change]:
        found = await self.search(user_id, query, 1, kinds={"memory"})
        if not found or found[0].score < FORGET_MIN_SCORE:
            return []
        record = await self._store.delete(
            user_id, found[0].id, self._clock(), by_message=message_id
        )
        return [Change("forgotten", record)]

    # -- managing ------------------------------------------------------------------------

    async def add_by_hand(self, user_id: str, kind: str, text: str, language: str) -> Change:
        new = NewMemory(kind, text, language, "user", None)
        record, old = await self._store.add(user_id, new, await self._vector(text), self._clock())
        return Change("saved", record, old)

    async def edit(self, user_id: str, memory_id: int, text: str) -> MemoryRecord:
        return await self._store.revise(
            user_id, memory_id, text, await self._vector(text), self._clock()
        )

    async def delete(self, user_id: str, memory_id: int) -> MemoryRecord:
        return await self._store.delete(user_id, memory_id, self._clock())

    async def restore(self, user_id: str, memory_id: int) -> MemoryRecord:
        record = await self._store.get(user_id, memory_id)
        return await self._store.restore(
            user_id, memory_id, await self._vector(record.text), self._clock()
        )

    async def undo(self, user_id: str, memory_id: int) -> MemoryRecord | None:
        """Undo a save: the memory goes, the one it replaced comes back."""
        record = await self._store.get(user_id, memory_id)
        previous_vector = None
        if record.supersedes_id is not None:
            previous = await self._store.get(user_id, record.supersedes_id)
            previous_vector = await self._vector(previous.text)
        return await self._store.undo_add(user_id, memory_id, previous_vector, self._clock())

    async def list_memories(
        self, user_id: str, *, query: str | None = None, history: bool = False
    ) -> list[MemoryRecord]:
        statuses = (CURRENT, SUPERSEDED) if history else (CURRENT,)
        return await self._store.list_memories(user_id, statuses=statuses, query=query)

    async def purge(self) -> int:
        return await self._store.purge(self._clock() - self._undo_window)

    # -- retrieval -----------------------------------------------------------------------

    async def index_messages(
        self, user_id: str, messages: Sequence[tuple[int, str, str, datetime]]
    ) -> None:
        """(message id, conversation id, text, created at) of user messages to search. A
        request to forget something is not itself something to recall."""
        kept = [
            (mid, conv, text[:INDEX_CHARS], created)
            for mid, conv, text, created in messages
            if text.strip() and not isinstance(explicit_request(text), ForgetRequest)
        ]
        if not kept:
            return
        # What a message states is what a later question needs: its statements alone are
        # embedded when it mixes statements and questions.
        vectors = await self.embed([statements(text) or text for _, _, text, _ in kept])
        items = [
            NewRecallItem("message", mid, text, _blob(vector), created, conv)
            for (mid, conv, text, created), vector in zip(kept, vectors, strict=True)
        ]
        await self._store.index(user_id, items)

    async def search(
        self, user_id: str, query: str, k: int, *, kinds: set[str] | None = None
    ) -> list[Found]:
        """The `k` best items, a memory and the message it was saved from counted once:
        they say the same thing, and a second copy would only push another item out."""
        vector = (await self.embed([query]))[0]
        found: list[Found] = []
        seen: set[int] = set()  # message ids already represented
        for key, score, _semantic in await self._search(user_id, query, vector, 2 * k, kinds=kinds):
            row = self._meta(user_id, key)
            if row is None:
                continue
            item = await self._found(user_id, key, row, score)
            if seen.intersection(item.message_ids):
                continue
            seen.update(item.message_ids)
            found.append(item)
            if len(found) == k:
                break
        return found

    async def recall(
        self,
        user_id: str,
        message: str,
        *,
        use_memories: bool,
        use_history: bool,
        exclude_conversation: str | None,
    ) -> tuple[list[Recalled], list[Recalled]]:
        """What the next turn's context gets: relevant memories and earlier messages,
        each within its budget, best first."""
        kinds = {kind for kind, on in (("memory", use_memories), ("message", use_history)) if on}
        if not kinds:
            return [], []
        vector = (await self.embed([message]))[0]
        hits = await self._search(user_id, message, vector, 24, kinds=kinds)
        rows = [(row, score) for key, score, _ in hits if (row := self._meta(user_id, key))]
        memory_ids = [row.ref_id for row, _ in rows if row.kind == "memory"]
        sources = await self._store.sources(user_id, memory_ids)
        memories: list[Recalled] = []
        history: list[Recalled] = []
        budgets = {"memory": MEMORY_BUDGET_CHARS, "message": HISTORY_BUDGET_CHARS}
        for row, score in rows:
            is_memory = row.kind == "memory"
            if not is_memory and (
                row.conversation_id == exclude_conversation or row.ref_id in sources.values()
            ):
                continue  # already in the conversation, or said better by its memory
            text = row.text if is_memory else _snippet(row.text)
            floor = MIN_MEMORY_SCORE if is_memory else MIN_HISTORY_SCORE
            if score < floor or len(text) > budgets[row.kind]:
                continue
            budgets[row.kind] -= len(text)
            target = memories if is_memory else history
            target.append(
                Recalled(f"{row.kind}:{row.ref_id}", row.kind, text, row.created_at, score)
            )
        return memories, history

    async def _found(self, user_id: str, key: str, row: RecallRow, score: float) -> Found:
        message_ids: tuple[int, ...] = (row.ref_id,) if row.kind == "message" else ()
        if row.kind == "memory":
            try:
                record = await self._store.get(user_id, row.ref_id)
            except Exception:  # erased meanwhile
                record = None
            if record is not None and record.source_message_id is not None:
                message_ids = (record.source_message_id,)
        return Found(
            key,
            row.kind,
            row.ref_id,
            row.text,
            round(score, 4),
            row.created_at,
            message_ids,
            row.conversation_id,
        )

    async def _search(
        self,
        user_id: str,
        query: str,
        vector: np.ndarray,
        k: int,
        *,
        kinds: set[str] | None,
    ) -> list[tuple[str, float, float]]:
        state = await self._synced(user_id)
        hits = state.index.search(query, vector, k * OVERFETCH, now=self._clock(), kinds=kinds)
        ranked = []
        for hit in hits:
            row = state.meta.get(hit.key)
            weight = (
                QUESTION_WEIGHT
                if row and row.kind == "message" and _only_questions(row.text)
                else 1.0
            )
            ranked.append((hit.key, hit.score * weight, hit.semantic))
        ranked.sort(key=lambda item: item[1], reverse=True)
        return ranked[:k]

    def _meta(self, user_id: str, key: str) -> RecallRow | None:
        state = self._indexes.get(user_id)
        return state.meta.get(key) if state else None

    async def _synced(self, user_id: str) -> _UserIndex:
        """The user's index, caught up with the store (one indexed query when nothing
        changed)."""
        state = self._indexes.get(user_id)
        if state is None:
            dim = self._get_embedder().dim
            state = self._indexes[user_id] = _UserIndex(RecallIndex(dim))
            while len(self._indexes) > CACHED_USERS:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(user_id)
        async with state.lock:
            rev, rows = await self._store.changes(user_id, state.rev)
            if rows:
                await asyncio.to_thread(_apply, state, rows)
            state.rev = rev
        return state

    # -- background work -----------------------------------------------------------------

    def spawn(self, work: Awaitable[Any], what: str) -> None:
        """Run side work without holding up the reply; failures are logged, never raised."""

        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("memory: %s failed", what)

        task = asyncio.create_task(run(), name=f"memory-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the background work (tests, evaluation and shutdown)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))


def _apply(state: _UserIndex, rows: Sequence[RecallRow]) -> None:
    removed = [f"{r.kind}:{r.ref_id}" for r in rows if r.removed or r.vector is None]
    # (A hidden message keeps its text in the store for a restore, never in the index.)
    state.index.remove(removed)
    for key in removed:
        state.meta.pop(key, None)
    live = [r for r in rows if not r.removed and r.vector is not None]
    items = []
    for row in live:
        key = f"{row.kind}:{row.ref_id}"
        assert row.vector is not None
        vector = np.frombuffer(row.vector, dtype=np.float32)
        items.append(Item(key, row.kind, row.text, row.created_at, vector))
        state.meta[key] = row
    state.index.add(items)


def _blob(vector: np.ndarray) -> bytes:
    return bytes(np.asarray(vector, dtype=np.float32).tobytes())


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!")


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) <= HISTORY_SNIPPET_CHARS:
        return flat
    return flat[: HISTORY_SNIPPET_CHARS - 1].rstrip() + "…"


def _sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE.split(text) if part.strip()]


def _is_question(sentence: str) -> bool:
    return sentence.endswith(("?", "？")) or sentence.startswith("¿")


def _opens_question(clause: str) -> bool:
    if clause.startswith("¿"):
        return True
    for word in _FIRST_WORD.findall(clause.lower())[:3]:
        if word not in CONNECTIVES:
            return word in QUESTION_OPENERS
    return False


def _parts(text: str) -> list[tuple[str, bool]]:
    """(segment, is a question) for each sentence — and, inside a question, for each clause
    before the last: "I'm vegetarian, any idea for dinner?" states a fact and then asks,
    which is how people write in every language; only clauses that open like a question
    ("how do I …, if …?") stay questions."""
    out: list[tuple[str, bool]] = []
    for sentence in _sentences(text):
        if not _is_question(sentence):
            out.append((sentence, False))
            continue
        clauses = [c.strip() for c in _CLAUSE.split(sentence) if c.strip()]
        for clause in clauses[:-1]:
            out.append((clause, _opens_question(clause)))
        out.append((clauses[-1] if clauses else sentence, True))
    return out


def _substantive(segment: str) -> bool:
    """A statement that can hold a fact: "Salut !", "ok", "merci" cannot."""
    return len(_WORDS.findall(segment)) >= MIN_STATEMENT_WORDS


def statements(text: str) -> str:
    """What `text` states: its statements of a few words or more, without its questions
    ("" when it states nothing)."""
    return " ".join(s for s, question in _parts(text) if not question and _substantive(s))


def _only_questions(text: str) -> bool:
    parts = _parts(text)
    return any(q for _, q in parts) and not any(not q and _substantive(s) for s, q in parts)
