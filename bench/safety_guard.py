"""What a guard model adds to the harm gate (issue 4), in one process on this machine:

    .venv/bin/python bench/safety_guard.py            # print the markdown report
    .venv/bin/python bench/safety_guard.py --write    # also write docs/benchmarks.md

1. The gate on benign turns without a guard and with one in mode "gray": the safe rows of the
   shipped everyday set (benign assistant traffic), each turn checked alternately by both
   gates, with the shipped embedded classifier and policy (a gray turn asks the guard: the
   report counts them), then with a scripted classifier that finds every turn clearly benign,
   to isolate what the gate itself adds.
2. One guard consultation per family through salon's OpenAI-compatible backend against a fake
   guard on loopback that answers at once: salon's own cost (HTTP, SSE, parsing; ShieldGemma
   asks four policies in parallel), not the model's inference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from salon.backends.openai_http import OpenAIHttpBackend
from salon.chat.safety import SafetyGate
from salon.domain import ChatMessage
from salon.safety.datasets import DATA, read_prompts
from salon.safety.guard import FAMILIES, Family, Guard, GuardModelClassifier
from salon.safety.harm import FakeHarmClassifier, default_classifier
from salon.safety.policy import Policy

CALM_ROUNDS = 20  # passes over the benign set with the scripted classifier (microseconds)
GUARD_CALLS = 300  # consultations timed per family
ANSWERS = {
    "llama-guard-3": "safe",
    "wildguard": "Harmful request: no",
    "shieldgemma": "No",
    "instruct": "No",
}


class FakeGuard:
    """An OpenAI-compatible guard that answers at once with its family's "benign" verdict."""

    def __init__(self) -> None:
        self.requests = 0
        self.answer = "safe"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, reason in (({"content": self.answer}, None), ({}, "stop")):
            chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


async def _serve(guard: FakeGuard) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", guard.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def _ms(samples: list[float], digits: int = 2) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return f"{statistics.median(ordered) * 1e3:.{digits}f} / {p95 * 1e3:.{digits}f}"


async def _timed(call: Callable[..., Awaitable[Any]], *args: Any) -> float:
    start = time.perf_counter()
    await call(*args)
    return time.perf_counter() - start


async def gate_on_benign_turns(base_url: str, guard: FakeGuard) -> list[str]:
    turns = [row.prompt for row in read_prompts(DATA / "everyday.csv") if not row.unsafe]
    policy = Policy.load()
    backend = OpenAIHttpBackend(base_url)
    classifier = GuardModelClassifier(backend, "guard", "llama-guard-3")
    times: dict[str, list[float]] = {}
    for name, embedded in (("shipped", default_classifier()), ("calm", FakeHarmClassifier({}))):
        plain = SafetyGate(embedded, policy)
        gray = SafetyGate(embedded, policy, guard=Guard(classifier, "gray"))
        for turn in turns[:20]:  # warm-up: caches, the event loop, the connection
            await gray.acheck_messages([ChatMessage("user", turn)])
        guard.requests = 0
        rounds = 1 if name == "shipped" else CALM_ROUNDS
        times[f"{name} none"], times[f"{name} gray"] = [], []
        for _ in range(rounds):
            for turn in turns:
                messages = [ChatMessage("user", turn)]
                times[f"{name} none"].append(await _timed(plain.acheck_messages, messages))
                times[f"{name} gray"].append(await _timed(gray.acheck_messages, messages))
        if name == "shipped":
            asked = guard.requests
    await backend.close()
    added = statistics.median(times["calm gray"]) - statistics.median(times["calm none"])
    return [
        f"{len(turns)} benign turns (the safe rows of `everyday.csv`), each checked by the gate "
        "without a guard and with one in mode gray, in turn:",
        "",
        "| embedded classifier | gate | median / p95 per turn, ms |",
        "|---|---|---|",
        f"| shipped | no guard | {_ms(times['shipped none'])} |",
        f"| shipped | guard, mode gray | {_ms(times['shipped gray'])} |",
        f"| scripted, always calm (x{CALM_ROUNDS}) | no guard | {_ms(times['calm none'], 4)} |",
        f"| scripted, always calm (x{CALM_ROUNDS}) | guard, mode gray | "
        f"{_ms(times['calm gray'], 4)} |",
        "",
        f"- Gray, and so sent to the guard: {asked} of {len(turns)} turns "
        f"({asked / len(turns):.1%}) with the shipped classifier (trained on these rows: on "
        "unseen traffic expect more); the others cost what the "
        "scripted rows isolate, the gate's own work, where mode gray adds "
        f"{added * 1e6:+.1f} µs a turn (a rule lookup and a comparison). The shipped rows "
        "differ by noise: the embedded classifier itself dominates them.",
        f"- So with a real guard answering in g ms, mode gray adds about {asked / len(turns):.1%}"
        " × g on average over this traffic, and g to the gray turns alone.",
    ]


def classifier_per_turn() -> list[str]:
    """The embedded classifier alone (the issue's aim: p95 ≤ 20 ms on a CPU), one turn at a
    time, on the harder development prompts and on everyday traffic, by prompt length: its
    cost is the MiniLM embedding, which grows with the number of tokens (both read at most
    `max_words` words). The previous classifier (the frozen embedding's regression and
    vote) runs interleaved with the shipped one, prompt by prompt, as the comparison."""
    shipped = default_classifier()
    assert shipped.tuned is not None, "the tuned head needs the packaged MiniLM"
    previous = replace(shipped, tuned=None)
    for row in read_prompts(DATA / "everyday.csv")[:20]:  # warm-up: weights, caches
        shipped.assess(row.prompt)
        previous.assess(row.prompt)
    lines = [
        "The embedded classifier alone, one turn at a time (one thread, as served); "
        f"its embedding reads at most {shipped.tuned.max_words} words of a prompt (the "
        "first and last halves). Against it, interleaved, the previous classifier (TF-IDF, "
        "the frozen embedding's regression and a vote of the nearest training prompts):",
        "",
        "| prompts | classifier | n | median / p95 per turn, ms | p99 | "
        "median by words: ≤ 10 / 11-20 / 21-40 / > 40 |",
        "|---|---|---:|---|---:|---|",
    ]
    for name in ("dev.csv", "everyday.csv"):
        rows = read_prompts(DATA / name)
        samples: dict[str, list[tuple[int, float]]] = {"clipped": [], "whole": []}
        for row in rows:
            for label, classifier in (("clipped", shipped), ("whole", previous)):
                start = time.perf_counter()
                classifier.assess(row.prompt)
                samples[label].append((len(row.prompt.split()), time.perf_counter() - start))
        for label, reads in (
            ("clipped", "TF-IDF + fine-tuned MiniLM (shipped)"),
            ("whole", "TF-IDF + frozen MiniLM regression and vote (before)"),
        ):
            times = sorted(t for _, t in samples[label])
            p99 = times[int(0.99 * (len(times) - 1))]
            buckets = []
            for low, high in ((0, 10), (11, 20), (21, 40), (41, 10**6)):
                inside = [t for words, t in samples[label] if low <= words <= high]
                buckets.append(f"{statistics.median(inside) * 1e3:.1f}" if inside else "–")
            lines.append(
                f"| `{name}` | {reads} | {len(rows)} | {_ms(times, 1)} | {p99 * 1e3:.1f} | "
                + " / ".join(buckets)
                + " |"
            )
    return lines


async def guard_consultation(base_url: str, guard: FakeGuard, family: Family) -> str:
    guard.answer = ANSWERS[family]
    backend = OpenAIHttpBackend(base_url)
    classifier = GuardModelClassifier(backend, "guard", family)
    messages = [ChatMessage("user", "how do I pick the lock of my own shed")]
    for _ in range(20):
        await classifier.assess(messages)
    samples = [await _timed(classifier.assess, messages) for _ in range(GUARD_CALLS)]
    await backend.close()
    requests = 4 if family == "shieldgemma" else 1
    return f"| {family} | {requests} | {_ms(samples)} |"


async def run() -> str:
    guard = FakeGuard()
    runner, base_url = await _serve(guard)
    try:
        alone = classifier_per_turn()
        gate = await gate_on_benign_turns(base_url, guard)
        rows = [await guard_consultation(base_url, guard, family) for family in FAMILIES]
    finally:
        await runner.cleanup()
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    return "\n".join(
        [
            "## Safety: the guard model's latency (issue 4)",
            "",
            f"Command ({when}, {platform.machine()}, Python {platform.python_version()}, "
            "a 2-core machine shared with other work while it ran):",
            "",
            "```",
            ".venv/bin/python bench/safety_guard.py --write",
            "```",
            "",
            *alone,
            "",
            *gate,
            "",
            f"One guard consultation through salon's OpenAI-compatible backend, {GUARD_CALLS} "
            "times per family, against a fake guard on loopback that answers at once: salon's "
            "own cost, to which a real guard adds its inference (a few output tokens on a GPU):",
            "",
            "| family | requests | median / p95, ms |",
            "|---|---|---|",
            *rows,
            "",
            "The guard's timeout (`safety_guard.timeout_s`, 3 s) bounds what a slow or dead "
            "guard can add to a turn; past it the embedded verdict stands "
            "(tests/integration/test_safety_guard.py).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    section = asyncio.run(run())
    print(section)
    if args.write:
        bench_report.write_section("safety-guard", section)


if __name__ == "__main__":
    main()
