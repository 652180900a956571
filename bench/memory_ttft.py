"""Does memory extraction cost the next reply anything? Time to first token of a user's
next turn with model extraction on vs off, on the embedded model, in the same run.

Three timings per mode:
- "right after": the next message is sent the moment the previous answer ends — extraction
  waits for the model to have been idle for a moment (3 s), so it has not started;
- "during extraction": sent 4 s after — the extraction is running and must give the model
  up (llama.cpp stops between prompt batches of 256 tokens);
- "after it finished": the next message comes once the extraction is done — its prompt
  extended the conversation, so the model's cached prefix should still serve the next turn.

    python bench/memory_ttft.py [--model embedded:qwen2.5-coder-1.5b-instruct] [--rounds 4]
    python bench/memory_ttft.py --write     # also into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from salon.app import services
from salon.chat.jobs import Delta
from salon.domain import SamplingParams
from salon.settings import PersonalizationSettings, Settings

FIRST = (
    "I just moved to Oslo for work, I'm a nurse at the university hospital. "
    "Can you suggest one thing to do this weekend? Two sentences."
)
NEXT = "Thanks. And what should I pack for it? Two sentences."
SAMPLING = SamplingParams(max_tokens=80, temperature=0.0, seed=1)


async def _ttft(chat: object, user_id: str, conversation_id: str, text: str) -> float:
    started = time.perf_counter()
    turn = await chat.post(  # type: ignore[attr-defined]
        user_id, conversation_id, text, parent_id=None, use_leaf=True, model=None
    )
    first = None
    async for event in await chat.follow(user_id, turn.assistant_message.id, 0):  # type: ignore[attr-defined]
        if first is None and isinstance(event, Delta):
            first = time.perf_counter() - started
    return first if first is not None else float("nan")


WHEN = ("right after", "during extraction", "after it finished")


async def _round(settings: Settings, mode: str, when: str) -> float:
    config = PersonalizationSettings(extraction=mode, enforce=False)
    scoped = settings.model_copy(update={"personalization": config})
    async with services(scoped, sampling=SAMPLING) as built:
        user = await built.accounts.create_user(
            f"u{time.monotonic_ns()}", "bench-pass-1", admin=False
        )
        conversation = await built.chat.create_conversation(user.id, None, None)
        await _ttft(built.chat, user.id, conversation.id, FIRST)
        memory = built.personalizer.memory
        if when == "during extraction":
            await asyncio.sleep(4.0)
        elif when == "after it finished" and memory is not None:
            await memory.drain()
        return await _ttft(built.chat, user.id, conversation.id, NEXT)


async def run(model: str, rounds: int) -> str:
    rows = []
    with tempfile.TemporaryDirectory(prefix="salon-bench-") as scratch:
        base = Settings(data_dir=Path(scratch), models=[model])
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for when in WHEN:
                for mode in ("off", "model"):
                    value = await _round(base, mode, when)
                    results.setdefault((mode, when), []).append(value)
                    print(f"  {mode:5} {when}: {value * 1000:.0f} ms", flush=True)
        for when in WHEN:
            off = statistics.median(results[("off", when)])
            on = statistics.median(results[("model", when)])
            rows.append(f"| {when} | {off * 1000:.0f} ms | {on * 1000:.0f} ms | {on / off:.2f} |")
    return "\n".join(
        [
            "## Memory extraction and the next reply's time to first token (issue 3)",
            "",
            f"Command: `python bench/memory_ttft.py --rounds {rounds}`. Next-turn time to first "
            f"token, `{model}`, median of {rounds} rounds (each a fresh process, 2 threads):",
            "",
            "| next message sent | extraction off | extraction by the model | ratio |",
            "|---|---|---|---|",
            *rows,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    table = asyncio.run(run(args.model, args.rounds))
    print(table)
    if args.write:
        bench_report.write_section("memory-ttft", table)


if __name__ == "__main__":
    main()
