"""The memory suite's runner on a hand-made set whose metrics are known in advance."""

from __future__ import annotations

import json
from pathlib import Path

from salon.backends.embeddings import HashingEmbedder
from salon.evals.memory_suite import (
    DEFAULT_CASES,
    HELDOUT_CASES,
    load_cases,
    memory_table,
    run_memory_suite,
)

# Ann: a question worded exactly like one message finds it first (p1); a question worded like
# the weather message while the evidence is the colour message finds it, but not first (p2);
# a locker code she asked to forget must come back in no form: neither the memory, nor the
# message it was saved from, nor the request to forget it (p3). Bob is asked about Ann's
# locker (p4): nothing of hers may come back.
ANN = [
    ("a-c1-m1", "2026-03-01T10:00:00Z", "My favourite colour is teal"),
    ("a-c1-m2", "2026-03-01T10:01:00Z", "The weather in Oslo is cold today"),
    ("a-c1-m3", "2026-03-01T10:02:00Z", "Remember that my locker code is 5521"),
    ("a-c2-m1", "2026-03-05T09:00:00Z", "Forget that my locker code is 5521"),
]
BOB = [("b-c1-m1", "2026-03-02T10:00:00Z", "Can you explain Python decorators?")]
PROBES = [
    ("p1", "ann", "recall", "My favourite colour is teal", ["a-c1-m1"]),
    ("p2", "ann", "recall", "The weather in Oslo is cold today", ["a-c1-m1"]),
    ("p3", "ann", "forget", "What is my locker code?", ["a-c1-m3", "a-c2-m1"]),
    ("p4", "bob", "isolation", "my locker code is 5521", ["a-c1-m3"]),
]


def _user(uid: str, messages: list[tuple[str, str, str]]) -> dict[str, object]:
    by_conv: dict[str, list[dict[str, str]]] = {}
    for mid, at, text in messages:
        by_conv.setdefault(mid.rsplit("-", 1)[0], []).append({"id": mid, "at": at, "text": text})
    conversations = [{"id": c, "title": c, "messages": m} for c, m in by_conv.items()]
    language = "fr" if uid == "bob" else "en"  # only for the by-language line
    return {"id": uid, "name": uid, "language": language, "conversations": conversations}


def _write_cases(path: Path) -> Path:
    cases = {
        "_doc": "tiny hand-made set",
        "probe_at": "2026-03-10T12:00:00Z",
        "users": [_user("ann", ANN), _user("bob", BOB)],
        "ops": [],
        "probes": [
            {"id": i, "user": u, "type": t, "question": q, "evidence": e}
            for i, u, t, q, e in PROBES
        ],
    }
    path.write_text(json.dumps(cases), encoding="utf-8")
    return path


async def test_metrics_match_a_hand_computed_set(tmp_path: Path) -> None:
    cases = _write_cases(tmp_path / "cases.json")
    report = await run_memory_suite(cases=cases, embedder=HashingEmbedder(), k=5)

    ranks = {r.probe.id: r.rank for r in report.results}
    assert ranks["p1"] == 1
    assert ranks["p2"] is not None and 1 < ranks["p2"] <= 5  # only 4 items: always in the top 5
    recall = report.row("recall")
    assert (recall.n, recall.recall_at) == (2, {1: 0.5, 5: 1.0, 10: 1.0})
    forget = report.row("forget")
    # The locker memory was deleted: the message it came from left retrieval with it, and
    # the "forget that ..." request itself was never indexed.
    assert (forget.n, forget.still_current, forget.leaked, forget.leaked_history) == (1, 0, 0, 0)
    assert forget.recall_at == {1: None, 5: None, 10: None}
    isolation = report.row("isolation")
    assert (isolation.n, isolation.leaked) == (1, 0)
    assert report.messages_indexed == 5  # replayed (the forget request is then not kept)
    assert report.memories_current == 0  # saved, then forgotten
    assert report.failures() == []

    table = memory_table(report)
    assert "| recall | 2 | 50.0 % | 100.0 % | 100.0 % | 0 | 0 | 0 | 0 |" in table
    assert "| forget | 1 | — | — | — | 0 | 0 | 0 | 0 |" in table
    # Bob (fr) has only an isolation probe: nothing findable, so no French entry.
    assert report.by_language == {"en": (2, 2)}
    assert "Evidence recall@5 by the user's language: en 2/2 (100.0 %)." in table


def test_the_shipped_cases_are_well_formed() -> None:
    cases = load_cases(DEFAULT_CASES)  # raises on a probe naming an unknown message
    assert len(cases.messages) >= 8
    assert sum(len(m) for m in cases.messages.values()) >= 300
    assert len(cases.probes) >= 80
    assert {p.type for p in cases.probes} == {"recall", "update", "forget", "isolation", "temporal"}
    assert all(p.stale for p in cases.probes if p.type == "update")


def test_the_heldout_cases_are_well_formed_and_apart() -> None:
    shipped, heldout = load_cases(DEFAULT_CASES), load_cases(HELDOUT_CASES)
    assert set(heldout.messages).isdisjoint(shipped.messages)  # other users
    assert {"it", "pt"} <= set(heldout.languages.values())
    assert not {"it", "pt"} & set(shipped.languages.values())  # languages the tuning never saw
    assert len(heldout.probes) >= 30
    assert {p.type for p in heldout.probes} == {
        "recall",
        "update",
        "forget",
        "isolation",
        "temporal",
    }
    assert all(p.stale for p in heldout.probes if p.type == "update")
