"""The memory suite of ``salon eval personalization``: evidence recall@k of memory search.

Synthetic users (``data/memory_cases.json``, documented in its ``_doc`` field) are replayed
into a real database the way the chat does it: every user message is stored, indexed
(``index_messages``) and acted on (``act_on`` with the rules, so "remember that ..." and
"forget that ..." take effect), with the service's clock at the message's timestamp. Then
each probe question goes through ``MemoryService.search`` with the clock at the probe's date.

A probe is answered when any of the first k results comes from one of its evidence messages
(a message item is its own source; a memory item is sourced from the message it was saved
from). Beside recall, the suite counts what must never happen: a superseded fact returned as
a current memory (``stale_returned``), a superseded or forgotten fact still current in the
store whether or not this query surfaced it (``still_current``), a forgotten fact or another
user's data returned (``leaked``), and - reported apart, see the cases' doc - a forgotten
fact's raw message returned from history (``leaked_history``).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from salon.backends.embeddings import Embedder, default_embedder
from salon.domain import MessageStatus
from salon.errors import NotFound
from salon.personalization.memory import Found, MemoryService
from salon.store.accounts import AccountStore, UserRecord
from salon.store.conversations import ConversationRecord, ConversationStore, NewMessage
from salon.store.db import create_engine, migrate
from salon.store.memories import MemoryStore

DEFAULT_CASES = Path(__file__).parent / "data" / "memory_cases.json"
# Users in languages and phrasing the shipped cases lack (Italian, Portuguese, terse English),
# written before retrieval was tuned on DEFAULT_CASES and kept apart to check that tuning.
HELDOUT_CASES = Path(__file__).parent / "data" / "memory_cases_heldout.json"
RECALL_KS = (1, 5, 10)
# Probe types whose evidence should be found; forget and isolation probes have nothing to
# find, only things that must not come back.
FINDABLE = ("recall", "update", "temporal")
TYPES = (*FINDABLE, "forget", "isolation")


# -- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaseMessage:
    id: str
    conversation: str
    title: str
    at: datetime
    text: str


@dataclass(frozen=True, slots=True)
class CaseOp:
    """A deletion made on the settings page: the memories saved from these messages go."""

    user: str
    at: datetime
    messages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Probe:
    id: str
    user: str
    type: str
    question: str
    evidence: tuple[str, ...]
    stale: tuple[str, ...] = ()
    at: datetime | None = None
    other_user: str | None = None


@dataclass(frozen=True, slots=True)
class Cases:
    names: dict[str, str]  # user id -> user name
    messages: dict[str, list[CaseMessage]]  # user id -> messages, oldest first
    ops: list[CaseOp]
    probes: list[Probe]
    probe_at: datetime
    languages: dict[str, str] = field(default_factory=dict)  # user id -> the user's language


def _when(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp without a timezone: {value!r}")
    return parsed


def _user_messages(user: dict[str, Any]) -> list[CaseMessage]:
    out = [
        CaseMessage(m["id"], conv["id"], conv.get("title", ""), _when(m["at"]), m["text"])
        for conv in user["conversations"]
        for m in conv["messages"]
    ]
    return sorted(out, key=lambda m: m.at)


def _probe(raw: dict[str, Any]) -> Probe:
    if raw["type"] not in TYPES:
        raise ValueError(f"probe {raw['id']}: unknown type {raw['type']!r}")
    return Probe(
        raw["id"],
        raw["user"],
        raw["type"],
        raw["question"],
        tuple(raw["evidence"]),
        tuple(raw.get("stale", ())),
        _when(raw["at"]) if raw.get("at") else None,
        raw.get("other_user"),
    )


def load_cases(path: Path = DEFAULT_CASES) -> Cases:
    raw = cast("dict[str, Any]", json.loads(path.read_text(encoding="utf-8")))
    users = cast("list[dict[str, Any]]", raw["users"])
    ops = [
        CaseOp(op["user"], _when(op["at"]), tuple(op["messages"]))
        for op in raw.get("ops", [])
        if op["op"] == "delete_memories_from"
    ]
    cases = Cases(
        {u["id"]: u.get("name", u["id"]) for u in users},
        {u["id"]: _user_messages(u) for u in users},
        ops,
        [_probe(p) for p in raw["probes"]],
        _when(raw["probe_at"]),
        {u["id"]: u.get("language", "?") for u in users},
    )
    _check(cases)
    return cases


def _check(cases: Cases) -> None:
    """A probe naming a message that does not exist would silently score as a miss."""
    known = {m.id for msgs in cases.messages.values() for m in msgs}
    for probe in cases.probes:
        missing = [i for i in (*probe.evidence, *probe.stale) if i not in known]
        if missing or probe.user not in cases.messages:
            raise ValueError(f"probe {probe.id}: unknown user or messages {missing}")
    for op in cases.ops:
        if any(i not in known for i in op.messages):
            raise ValueError(f"op for {op.user}: unknown messages {op.messages}")


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Returned:
    """One search result, named with the cases' message ids (for failure reports)."""

    kind: str
    text: str
    score: float
    sources: tuple[str, ...]  # case message ids; "?" for a source the replay did not create


@dataclass(frozen=True, slots=True)
class ProbeResult:
    probe: Probe
    rank: int | None  # 1-based rank of the first result from the evidence, if any
    stale_returned: bool
    still_current: bool  # the store still holds the stale or forgotten fact as current
    leaked: bool
    leaked_history: bool
    latency_ms: float
    returned: tuple[Returned, ...]

    def hit(self, k: int) -> bool:
        return self.rank is not None and self.rank <= k


@dataclass(frozen=True, slots=True)
class TypeRow:
    type: str
    n: int
    recall_at: dict[int, float | None]  # k -> share of probes answered in the top k
    stale_returned: int  # probes with a superseded fact returned as a memory
    still_current: int  # probes whose stale or forgotten fact is still a current memory
    leaked: int  # probes with a forgotten memory or another user's data returned
    leaked_history: int  # forget probes with the forgotten fact's raw message returned


@dataclass
class MemoryReport:
    rows: list[TypeRow]  # one per probe type present, then "findable" (recall+update+temporal)
    k: int  # depth at which stale results and leaks are counted
    latency_p50_ms: float
    latency_p95_ms: float
    items_indexed: int  # messages indexed plus memories current at the end
    messages_indexed: int
    memories_current: int
    embedder: str
    results: list[ProbeResult] = field(default_factory=list)
    # language -> (findable probes, answered in the top k), from the users' "language"
    by_language: dict[str, tuple[int, int]] = field(default_factory=dict)

    def row(self, kind: str) -> TypeRow:
        return next(r for r in self.rows if r.type == kind)

    def failures(self) -> list[ProbeResult]:
        """Probes that missed their evidence in the top k or let something through."""
        return [
            r
            for r in self.results
            if (r.probe.type in FINDABLE and not r.hit(self.k))
            or r.stale_returned
            or r.still_current
            or r.leaked
            or r.leaked_history
        ]


# -- replay --------------------------------------------------------------------------------


class _Clock:
    """The service's clock, moved by the replay to each message's and probe's time."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class _Replayed:
    user_ids: dict[str, str]  # case user -> database user id
    ids: dict[str, int]  # case message id -> database message id
    names: dict[int, str]  # the reverse
    owner: dict[int, str]  # database message id -> case user


async def _create_users(engine: AsyncEngine, cases: Cases, at: datetime) -> dict[str, str]:
    # A random suffix keeps a run on a shared database (database_url) clear of earlier runs.
    run = uuid.uuid4().hex[:8]
    accounts = AccountStore(engine)
    user_ids = {}
    for uid, name in cases.names.items():
        record = UserRecord(f"eval-{uid}-{run}", f"eval-{name}-{run}", "!", "user", at)
        user_ids[uid] = (await accounts.create_user(record, first_is_admin=False)).id
    return user_ids


async def _replay_user(
    service: MemoryService,
    conversations: ConversationStore,
    clock: _Clock,
    user_id: str,
    events: Sequence[CaseMessage | CaseOp],
    replayed: _Replayed,
) -> None:
    conv_ids: dict[str, str] = {}
    parents: dict[str, int] = {}
    for event in events:
        clock.now = event.at
        if isinstance(event, CaseOp):
            await _delete_memories_from(service, user_id, event, replayed)
            continue
        if event.conversation not in conv_ids:
            conv_ids[event.conversation] = await _new_conversation(conversations, user_id, event)
        conv = conv_ids[event.conversation]
        new = NewMessage("user", event.text, MessageStatus.COMPLETE)
        (stored,) = await conversations.append(user_id, conv, parents.get(conv), [new], event.at)
        parents[conv] = stored.id
        replayed.ids[event.id] = stored.id
        replayed.names[stored.id] = event.id
        # What ChatService._observe_now does for each user message, in the same order.
        await service.index_messages(user_id, [(stored.id, conv, event.text, event.at)])
        await service.act_on(user_id, conv, stored.id, event.text, use_rules=True)


async def _new_conversation(
    conversations: ConversationStore, user_id: str, first: CaseMessage
) -> str:
    conv_id = str(uuid.uuid4())
    record = ConversationRecord(conv_id, user_id, first.title, None, None, first.at, first.at)
    await conversations.create(record)
    return conv_id


async def _delete_memories_from(
    service: MemoryService, user_id: str, op: CaseOp, replayed: _Replayed
) -> None:
    sources = {replayed.ids[m] for m in op.messages if m in replayed.ids}
    for record in await service.list_memories(user_id):
        if record.source_message_id in sources:
            await service.delete(user_id, record.id)


async def _replay(
    service: MemoryService,
    engine: AsyncEngine,
    clock: _Clock,
    cases: Cases,
) -> _Replayed:
    first = min(m.at for msgs in cases.messages.values() for m in msgs)
    replayed = _Replayed(await _create_users(engine, cases, first), {}, {}, {})
    conversations = ConversationStore(engine)
    for uid, messages in cases.messages.items():
        ops = [op for op in cases.ops if op.user == uid]
        # Ops sort after a message with the same timestamp: a deletion follows what it deletes.
        events: list[CaseMessage | CaseOp] = sorted(
            [*messages, *ops], key=lambda e: (e.at, isinstance(e, CaseOp))
        )
        user_id = replayed.user_ids[uid]
        await _replay_user(service, conversations, clock, user_id, events, replayed)
        for message in messages:
            replayed.owner[replayed.ids[message.id]] = uid
    return replayed


# -- probing -------------------------------------------------------------------------------


async def _run_probe(
    service: MemoryService,
    clock: _Clock,
    probe: Probe,
    replayed: _Replayed,
    *,
    k: int,
    default_at: datetime,
    current_sources: set[int],
) -> ProbeResult:
    clock.now = probe.at or default_at
    user_id = replayed.user_ids[probe.user]
    depth = max(k, *RECALL_KS)
    started = time.perf_counter()
    found = await service.search(user_id, probe.question, depth)
    latency_ms = (time.perf_counter() - started) * 1000
    evidence = {replayed.ids[i] for i in probe.evidence}
    stale = {replayed.ids[i] for i in probe.stale}
    rank = next((n for n, f in enumerate(found, 1) if evidence.intersection(f.message_ids)), None)
    top = found[:k]
    foreign = [await _is_foreign(service, user_id, probe.user, f, replayed) for f in top]
    forgotten = probe.type == "forget"
    # Retrieval can hide a memory that should have been superseded or deleted; the store
    # cannot: with it still current, any other query may bring it back.
    outdated = evidence if forgotten else stale
    return ProbeResult(
        probe,
        rank if probe.type in FINDABLE else None,
        any(f.kind == "memory" and stale.intersection(f.message_ids) for f in top),
        bool(outdated & current_sources),
        any(foreign)
        or (forgotten and any(f.kind == "memory" and evidence & set(f.message_ids) for f in top)),
        forgotten and any(f.kind == "message" and evidence & set(f.message_ids) for f in top),
        latency_ms,
        tuple(_returned(f, replayed) for f in found),
    )


async def _is_foreign(
    service: MemoryService, user_id: str, case_user: str, found: Found, replayed: _Replayed
) -> bool:
    """Whether a result belongs to someone else: a message of another user, or a memory
    that the store does not give this user."""
    if any(replayed.owner.get(mid, case_user) != case_user for mid in found.message_ids):
        return True
    if found.kind != "memory":
        return False
    try:
        await service.store.get(user_id, found.id)
    except NotFound:
        return True
    return False


def _returned(found: Found, replayed: _Replayed) -> Returned:
    sources = tuple(replayed.names.get(mid, "?") for mid in found.message_ids)
    return Returned(found.kind, found.text, found.score, sources)


async def _current_sources(service: MemoryService, user_id: str) -> set[int]:
    """The messages that the user's current memories were saved from."""
    return {
        m.source_message_id
        for m in await service.list_memories(user_id)
        if m.source_message_id is not None
    }


# -- metrics -------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with ~100 samples it reads plainly)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _row(kind: str, results: Sequence[ProbeResult]) -> TypeRow:
    findable = [r for r in results if r.probe.type in FINDABLE]
    recall_at: dict[int, float | None] = {
        k: (sum(r.hit(k) for r in findable) / len(findable) if findable else None)
        for k in RECALL_KS
    }
    return TypeRow(
        kind,
        len(results),
        recall_at,
        sum(r.stale_returned for r in results),
        sum(r.still_current for r in results),
        sum(r.leaked for r in results),
        sum(r.leaked_history for r in results),
    )


def _rows(results: Sequence[ProbeResult]) -> list[TypeRow]:
    rows = [
        _row(kind, [r for r in results if r.probe.type == kind])
        for kind in TYPES
        if any(r.probe.type == kind for r in results)
    ]
    findable = [r for r in results if r.probe.type in FINDABLE]
    if findable:
        rows.append(_row("findable", findable))
    return rows


# -- entry points --------------------------------------------------------------------------


async def run_memory_suite(
    *,
    cases: Path | None = None,
    embedder: Embedder | None = None,
    database_url: str | None = None,
    k: int = 5,
    now: datetime | None = None,
) -> MemoryReport:
    """Replay the cases into a database (a throwaway SQLite file unless `database_url`) and
    probe memory search. `now` is the clock for probes that carry no date of their own
    (default: the cases' ``probe_at``); stale results and leaks are counted in the top `k`."""
    loaded = load_cases(cases or DEFAULT_CASES)
    chosen = embedder or default_embedder()
    with tempfile.TemporaryDirectory(prefix="salon-memory-eval-") as tmp:
        url = database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'memory.db'}"
        engine = create_engine(url)
        try:
            await migrate(engine)
            return await _run(engine, loaded, chosen, k=k, default_at=now or loaded.probe_at)
        finally:
            await engine.dispose()


async def _run(
    engine: AsyncEngine, cases: Cases, embedder: Embedder, *, k: int, default_at: datetime
) -> MemoryReport:
    clock = _Clock(cases.probe_at)
    service = MemoryService(MemoryStore(engine), lambda: embedder, clock)
    try:
        replayed = await _replay(service, engine, clock, cases)
        await service.drain()
        for user_id in replayed.user_ids.values():
            # Untimed: brings each user's index up to date with the replay's last writes, so
            # the latencies below are those of a search, not of a catch-up.
            await service.search(user_id, "warm up", 1)
        sources = {uid: await _current_sources(service, u) for uid, u in replayed.user_ids.items()}
        results = [
            await _run_probe(
                service,
                clock,
                probe,
                replayed,
                k=k,
                default_at=default_at,
                current_sources=sources[probe.user],
            )
            for probe in cases.probes
        ]
        memories = sum([len(await service.list_memories(u)) for u in replayed.user_ids.values()])
    finally:
        await service.close()
    latencies = [r.latency_ms for r in results]
    return MemoryReport(
        rows=_rows(results),
        k=k,
        latency_p50_ms=_percentile(latencies, 50),
        latency_p95_ms=_percentile(latencies, 95),
        items_indexed=len(replayed.ids) + memories,
        messages_indexed=len(replayed.ids),
        memories_current=memories,
        embedder=getattr(embedder, "name", type(embedder).__name__),
        results=results,
        by_language=_by_language(results, cases.languages, k),
    )


def _by_language(
    results: Sequence[ProbeResult], languages: dict[str, str], k: int
) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for r in results:
        if r.probe.type in FINDABLE:
            lang = languages.get(r.probe.user, "?")
            n, hits = counts.get(lang, (0, 0))
            counts[lang] = (n + 1, hits + r.hit(k))
    return dict(sorted(counts.items()))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def memory_table(report: MemoryReport) -> str:
    """The report as a markdown table, with a line on latency and what was indexed."""
    lines = [
        "| type | n | recall@1 | recall@5 | recall@10 | stale returned | still current "
        "| leaked | leaked (history) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        cells = [row.type, str(row.n), *(_pct(row.recall_at[k]) for k in RECALL_KS)]
        counts = (row.stale_returned, row.still_current, row.leaked, row.leaked_history)
        cells += [str(c) for c in counts]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Search latency p50 {report.latency_p50_ms:.1f} ms, p95 {report.latency_p95_ms:.1f} ms "
        f"over {len(report.results)} searches; {report.items_indexed} items indexed "
        f"({report.messages_indexed} messages, {report.memories_current} current memories); "
        f"embedder {report.embedder}; stale results and leaks counted in the top {report.k}."
    )
    if report.by_language:
        parts = [
            f"{lang} {hits}/{n} ({_pct(hits / n)})"
            for lang, (n, hits) in report.by_language.items()
        ]
        lines.append("")
        lines.append(
            f"Evidence recall@{report.k} by the user's language: " + ", ".join(parts) + "."
        )
    return "\n".join(lines)
