"""Embedded backend: what `EmbeddedBackend` costs over xllamacpp, and what KV reuse buys.

In one process, with the same model file and the same runtime settings:

1. decode speed: the same prompt, seed and token budget, generated through
   `EmbeddedBackend.stream` and through `xllamacpp.Server.handle_chat_completions` called
   directly, interleaved (`--repeats` pairs; medians, and the median of per-pair ratios).
   Decode tok/s is (completion tokens - 1) / (last token time - first token time), so prompt
   evaluation is left out. Aim: backend >= 95 % of direct.
2. time to first token on turns 1, 5 and 10 of one conversation (each reply is appended to
   the history; one session key, so one slot). Repeated with a different system prompt each
   time so turn 1 is always cold; medians, and the median of per-conversation ratios.
   Aim: turn 10 <= 1.3 x turn 1.

    python bench/embedded.py                                   # SmolLM2-135M
    python bench/embedded.py --model qwen2.5-coder-1.5b-instruct --tokens 128

Prints a markdown section (table + command line) for docs/benchmarks.md; `markdown()` returns it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xllamacpp

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from salon.backends.embedded import EmbeddedBackend, resolve_threads, runtime_params
from salon.backends.model_files import builtin_catalog
from salon.domain import ChatMessage, CompletionRequest, Finished, SamplingParams, TextDelta
from salon.settings import EmbeddedSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("SALON_TEST_MODEL_CACHE") or REPO / ".cache" / "models")
DECODE_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
TOPICS = [
    "rivers",
    "volcanoes",
    "deserts",
    "glaciers",
    "islands",
    "forests",
    "canyons",
    "lakes",
    "mountains",
    "coral reefs",
]


@dataclass
class DecodeSample:
    tokens: int
    seconds: float

    @property
    def tok_s(self) -> float:
        return (self.tokens - 1) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TurnSample:
    turn: int
    ttft_s: float
    prompt_tokens: int
    evaluated_tokens: int  # what llama.cpp actually ran; the rest came from the KV cache


class TimingsTap(logging.Handler):
    """Collects llama.cpp's per-generation accounting that the backend logs at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.last = getattr(record, "llama_timings", None) or self.last

    def __enter__(self) -> TimingsTap:
        backend_logger = logging.getLogger("salon.backends.embedded")
        backend_logger.addHandler(self)
        backend_logger.setLevel(logging.DEBUG)
        # DEBUG here must not also turn on llama.cpp's own stderr log.
        logging.getLogger("salon.backends.embedded.llama").setLevel(logging.WARNING)
        backend_logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("salon.backends.embedded").removeHandler(self)


@dataclass
class BenchResult:
    model: str
    threads: int
    tokens: int
    backend: list[DecodeSample] = field(default_factory=list)
    direct: list[DecodeSample] = field(default_factory=list)
    turns: list[list[TurnSample]] = field(default_factory=list)  # one list per conversation
    # Other processes on a small machine skew every number here; report what they were doing.
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    load_after: float = 0.0

    @property
    def backend_tok_s(self) -> float:
        return statistics.median(s.tok_s for s in self.backend)

    @property
    def direct_tok_s(self) -> float:
        return statistics.median(s.tok_s for s in self.direct)

    @property
    def decode_ratio(self) -> float:
        # Per adjacent pair, then the median: runs seconds apart share the machine's load,
        # which on a small shared box swings far more than the difference being measured.
        pairs = zip(self.backend, self.direct, strict=True)
        return statistics.median(b.tok_s / d.tok_s for b, d in pairs)

    def ttft(self, turn: int) -> float:
        return statistics.median(c[turn - 1].ttft_s for c in self.turns)

    def prompt_tokens(self, turn: int) -> int:
        return self.turns[0][turn - 1].prompt_tokens

    def evaluated_tokens(self, turn: int) -> int:
        return max(c[turn - 1].evaluated_tokens for c in self.turns)

    @property
    def ttft_ratio(self) -> float:
        return statistics.median(c[9].ttft_s / c[0].ttft_s for c in self.turns)


# -- decode: through the backend and direct


def _decode_request(model: str, tokens: int) -> CompletionRequest:
    params = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1234)
    return CompletionRequest(model, (ChatMessage("user", DECODE_PROMPT),), params)


async def backend_decode(backend: EmbeddedBackend, model: str, tokens: int) -> DecodeSample:
    stamps: list[float] = []
    completion = 0
    async for event in backend.stream(_decode_request(model, tokens)):
        if isinstance(event, TextDelta):
            stamps.append(time.perf_counter())
        elif isinstance(event, Finished):
            completion = event.usage.completion_tokens
    return DecodeSample(completion, stamps[-1] - stamps[0])


def direct_decode(server: Any, tokens: int) -> DecodeSample:
    stamps: list[float] = []
    usage: dict[str, Any] = {}

    def on_chunk(chunk: dict[str, Any]) -> bool:
        choices = chunk.get("choices") or [{}]
        if (choices[0].get("delta") or {}).get("content"):
            stamps.append(time.perf_counter())
        usage.update(chunk.get("usage") or {})
        return False

    body = {
        "messages": [{"role": "user", "content": DECODE_PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": tokens,
        "temperature": 0.7,
        "seed": 1234,
    }
    server.handle_chat_completions(body, on_chunk)
    return DecodeSample(int(usage["completion_tokens"]), stamps[-1] - stamps[0])


# -- TTFT over the turns of one conversation


async def conversation_ttft(
    backend: EmbeddedBackend,
    model: str,
    turns: int,
    reply_tokens: int,
    variant: int,
    tap: TimingsTap,
) -> list[TurnSample]:
    # Starting with the variant keeps turn 1 cold: only the template's first tokens are shared.
    system = f"{variant}. You are a concise geography tutor. Answer in a few sentences."
    history: list[ChatMessage] = [ChatMessage("system", system)]
    samples: list[TurnSample] = []
    for turn in range(1, turns + 1):
        topic = TOPICS[(turn - 1) % len(TOPICS)]
        history.append(ChatMessage("user", f"Tell me one surprising fact about {topic}."))
        request = CompletionRequest(
            model,
            tuple(history),
            SamplingParams(max_tokens=reply_tokens, temperature=0.7, seed=turn),
            session_key=f"bench-{variant}",
        )
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        prompt_tokens = 0
        async for event in backend.stream(request):
            if isinstance(event, TextDelta):
                first = first or time.perf_counter()
                parts.append(event.text)
            else:
                prompt_tokens = event.usage.prompt_tokens
        assert first is not None, "the model produced no text"
        history.append(ChatMessage("assistant", "".join(parts)))
        evaluated = int(tap.last.get("prompt_n", -1))
        samples.append(TurnSample(turn, first - started, prompt_tokens, evaluated))
    return samples


# -- the run


async def run(
    model: str,
    tokens: int,
    *,
    cache_dir: Path = DEFAULT_CACHE,
    threads: int | None = None,
    repeats: int = 5,
    reply_tokens: int = 48,
    context_size: int = 4096,
) -> BenchResult:
    settings = EmbeddedSettings(threads=threads, context_size=context_size, slots=1)
    progress = lambda message: print(message, file=sys.stderr)  # noqa: E731
    backend = EmbeddedBackend(settings, cache_dir, progress)
    result = BenchResult(model, resolve_threads(settings), tokens)
    try:
        await backend.load(model)
        path = builtin_catalog().resolve_model_path(model, cache_dir)
        with tempfile.TemporaryDirectory(prefix="salon-bench-") as socket_dir:
            server = xllamacpp.Server(runtime_params(settings, path, Path(socket_dir)))
            # One unmeasured round each: first-use allocations are not decode speed.
            await backend_decode(backend, model, 8)
            direct_decode(server, 8)
            for _ in range(repeats):
                result.backend.append(await backend_decode(backend, model, tokens))
                result.direct.append(await asyncio.to_thread(direct_decode, server, tokens))
            del server
        with TimingsTap() as tap:
            for variant in range(repeats):
                samples = await conversation_ttft(backend, model, 10, reply_tokens, variant, tap)
                result.turns.append(samples)
    finally:
        await backend.close()
    result.load_after = os.getloadavg()[0]
    return result


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(result: BenchResult, command: str) -> str:
    lines = [
        f"## Embedded backend: {result.model}",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, {result.threads} threads, "
        f"xllamacpp {xllamacpp.__version__}; medians of {len(result.backend)} runs; "
        f"1-min load average {result.load_before:.1f} before, {result.load_after:.1f} after.",
        "",
        "| measure | value | aim |",
        "|---|---|---|",
        f"| decode, xllamacpp direct | {result.direct_tok_s:.1f} tok/s | |",
        f"| decode, `EmbeddedBackend.stream` | {result.backend_tok_s:.1f} tok/s | |",
        f"| decode ratio backend / direct | {result.decode_ratio:.1%} | >= 95 % "
        f"({_verdict(result.decode_ratio >= 0.95)}) |",
    ]
    for turn in (1, 5, 10):
        lines.append(
            f"| TTFT turn {turn} ({result.prompt_tokens(turn)} prompt tokens, "
            f"at most {result.evaluated_tokens(turn)} evaluated) | "
            f"{result.ttft(turn) * 1000:.0f} ms | |"
        )
    lines += [
        f"| TTFT ratio turn 10 / turn 1 | {result.ttft_ratio:.2f} | <= 1.3 "
        f"({_verdict(result.ttft_ratio <= 1.3)}) |",
        "",
        f"Decode: {result.tokens} tokens requested. Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reply-tokens", type=int, default=48, help="reply length per turn")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            args.model,
            args.tokens,
            cache_dir=args.cache_dir,
            threads=args.threads,
            repeats=args.repeats,
            reply_tokens=args.reply_tokens,
        )
    )
    raw = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "bench/embedded.py", *raw])
    section = markdown(result, command)
    print(section)
    if not args.no_write:
        bench_report.write_section(f"embedded-{args.model}", section)
    return result


if __name__ == "__main__":
    main()
