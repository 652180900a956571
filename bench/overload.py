"""Overload: what admission control does when more streams arrive than a model can serve.

In one run, on loopback:

1. the mock upstream (its own process) with a fixed per-stream duration: `--ttft-ms`
   before the first token, then `--chunks` chunks `--delay-ms` apart, so every stream holds
   one of salon's slots for a known time;
2. `salon serve` (its own process, one worker, SQLite in a temp dir) with provider `up` at
   that mock and `limits`: `--slots` concurrent generations, `--queue` waiting places;
3. unloaded: `--unloaded` streams one after the other (time to first token, hold time);
   the capacity is slots / hold time, in streams per second;
4. open-loop Poisson arrivals (one aiohttp client, uvloop) at each `--levels` multiple of
   that capacity for `--duration` seconds.

For the admitted streams it reports time to first token p50/p99 against the unloaded p99
(aim: p99 within 2×); for the refused ones the share, the status codes, the time from the
request to the refusal p50/p99 (aim ≤ 50 ms) and whether Retry-After came with it; and any
errors (a failed stream, a refusal without Retry-After, a non-429/503 status).

    python bench/overload.py                     # 1× and 4×, 20 s each; prints the section
    python bench/overload.py --write             # ... and writes it into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from gateway import CONTENT, PROMPT, fmt, machine, machine_busy_s, own_cpu_s, percentile
from harness import (
    Proc,
    admin_key,
    make_workdir,
    run_async,
    salon_env,
    serve_salon,
    start_upstream,
)

AIM_TTFT_RATIO, AIM_REFUSAL_MS = 2.0, 50.0


@dataclass
class Outcome:
    status: int = 0  # 0: no HTTP answer
    ttft_ms: float | None = None  # admitted: to the first content chunk
    answer_ms: float = 0.0  # to the response head (for a refusal: the time to refusal)
    total_ms: float = 0.0
    retry_after: str | None = None
    error: str | None = None


@dataclass
class Level:
    name: str
    rate: float  # arrivals per second
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0
    salon_cpu: float = 0.0  # cores
    other_cpu: float = 0.0  # cores busy outside the benchmark

    @property
    def admitted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and o.error is None]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in (429, 503)]

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None or o.status not in (200, 429, 503)]

    def ttft(self, q: float) -> float:
        return percentile([o.ttft_ms for o in self.admitted if o.ttft_ms is not None], q)

    def refusal(self, q: float) -> float:
        return percentile([o.answer_ms for o in self.refused], q)


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], chunks: int
) -> Outcome:
    outcome = Outcome()
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            outcome.status = response.status
            outcome.answer_ms = (time.perf_counter() - started) * 1000
            outcome.retry_after = response.headers.get("Retry-After")
            if response.status != 200:
                await response.read()
                if response.status in (429, 503) and not outcome.retry_after:
                    outcome.error = "refused without Retry-After"
                return outcome
            buffer, content, done = b"", 0, False
            async for raw in response.content.iter_any():
                buffer += raw
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: [DONE]"):
                        done = True
                    elif CONTENT.search(event):
                        content += 1
                        if outcome.ttft_ms is None:
                            outcome.ttft_ms = (time.perf_counter() - started) * 1000
                    elif b'"error"' in event:
                        outcome.error = "error event: " + event[:200].decode(errors="replace")
            if outcome.error is None and (not done or content != chunks):
                outcome.error = f"incomplete ({content} chunks, done={done})"
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome.error = type(exc).__name__
    outcome.total_ms = (time.perf_counter() - started) * 1000
    return outcome


async def run_levels(
    url: str,
    key: str,
    chunks: int,
    unloaded: int,
    slots: int,
    multiples: Sequence[float],
    duration_s: float,
    salon: Proc,
    seed: int,
) -> tuple[Level, list[Level], float]:
    body = json.dumps({"model": "up:mock", "messages": PROMPT, "stream": True}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(5):  # warm-up: connections, code paths
            await one_stream(session, url, body, headers, chunks)
        base = Level("unloaded", 0.0)
        started = time.perf_counter()
        for _ in range(unloaded):
            base.outcomes.append(await one_stream(session, url, body, headers, chunks))
        base.elapsed_s = time.perf_counter() - started
        holds = [o.total_ms for o in base.admitted]
        hold_s = sum(holds) / len(holds) / 1000 if holds else 0.2
        capacity = slots / hold_s
        print(
            f"unloaded: TTFT p50 {base.ttft(50):.1f} ms p99 {base.ttft(99):.1f} ms, stream "
            f"{hold_s * 1000:.0f} ms → capacity {capacity:.1f} streams/s",
            flush=True,
        )
        levels = []
        rng = random.Random(seed)
        for multiple in multiples:
            level = Level(f"{multiple:g}×", multiple * capacity)
            tasks: list[asyncio.Task[Outcome]] = []
            cpu_before, busy_before, own_before = salon.cpu_s(), machine_busy_s(), own_cpu_s()
            started = time.perf_counter()
            next_at = started
            while next_at < started + duration_s:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one_stream(session, url, body, headers, chunks)))
                next_at += rng.expovariate(level.rate)
            level.outcomes = list(await asyncio.gather(*tasks))
            level.elapsed_s = time.perf_counter() - started
            salon_cpu = salon.cpu_s() - cpu_before
            own = own_cpu_s() - own_before
            level.salon_cpu = salon_cpu / level.elapsed_s
            busy = machine_busy_s() - busy_before
            # The mock upstream's CPU counts as "other" here; it is small (a sleep per chunk).
            level.other_cpu = max(0.0, busy - own - salon_cpu) / level.elapsed_s
            print(summary(level, base), flush=True)
            levels.append(level)
            await asyncio.sleep(hold_s * 2)  # let the last streams drain
    return base, levels, capacity


def summary(level: Level, base: Level) -> str:
    share = len(level.refused) / max(1, len(level.outcomes))
    return (
        f"{level.name:>4}: {len(level.outcomes)} requests ({level.rate:.0f}/s), admitted "
        f"{len(level.admitted)}, TTFT p50 {level.ttft(50):.1f} p99 {level.ttft(99):.1f} ms "
        f"({level.ttft(99) / base.ttft(99):.2f}× unloaded p99); refused {share:.0%} in "
        f"p50 {level.refusal(50):.1f} p99 {level.refusal(99):.1f} ms; errors {len(level.errors)}"
    )


def section(
    args: argparse.Namespace, base: Level, levels: list[Level], capacity: float, command: str
) -> str:
    holds = [o.total_ms for o in base.admitted]
    hold = sum(holds) / len(holds) if holds else 0.0
    lines = [
        "| load | arrivals/s | requests | admitted | TTFT p50 ms | TTFT p99 ms | p99 vs unloaded "
        "| refused | refusal p50 ms | refusal p99 ms | Retry-After | statuses | errors "
        "| salon CPU | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
        f"| unloaded (1 at a time) | – | {len(base.outcomes)} | {len(base.admitted)} "
        f"| {fmt(base.ttft(50))} | {fmt(base.ttft(99))} | 1.00 | 0 % | – | – | – | 200 "
        f"| {len(base.errors)} | – | – |",
    ]
    notes = []
    for level in levels:
        refused = level.refused
        share = len(refused) / max(1, len(level.outcomes))
        with_retry = sum(1 for o in refused if o.retry_after)
        statuses: dict[int, int] = {}
        for o in level.outcomes:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        ratio = level.ttft(99) / base.ttft(99)
        lines.append(
            f"| {level.name} capacity | {level.rate:.0f} | {len(level.outcomes)} "
            f"| {len(level.admitted)} | {fmt(level.ttft(50))} | {fmt(level.ttft(99))} "
            f"| {ratio:.2f} | {share:.0%} | {fmt(level.refusal(50))} | {fmt(level.refusal(99))} "
            f"| {with_retry}/{len(refused)} "
            f"| {', '.join(f'{k}×{v}' for k, v in sorted(statuses.items()))} "
            f"| {len(level.errors)} | {level.salon_cpu:.2f} | {level.other_cpu:.2f} |"
        )
        ok_ttft = ratio <= AIM_TTFT_RATIO
        ok_refusal = not refused or level.refusal(99) <= AIM_REFUSAL_MS
        notes.append(
            f"- {level.name}: admitted p99 TTFT {ratio:.2f}× the unloaded p99 (aim ≤ "
            f"{AIM_TTFT_RATIO:g}×: {'met' if ok_ttft else 'missed'}); refusals p99 "
            f"{fmt(level.refusal(99))} ms (aim ≤ {AIM_REFUSAL_MS:g} ms: "
            f"{'met' if ok_refusal else 'missed'}), Retry-After on {with_retry} of "
            f"{len(refused)}."
        )
        kinds: dict[str, int] = {}
        for o in level.errors:
            kinds[o.error or f"http {o.status}"] = kinds.get(o.error or f"http {o.status}", 0) + 1
        if kinds:
            notes.append(f"- {level.name} errors: {kinds}")
    title = "Overload" if args.max_wait is None else "Overload, queue bounded by expected wait"
    return f"""## {title}

Admission control at and beyond a model's capacity. The mock upstream holds every stream
about {hold:.0f} ms (first token after {args.ttft_ms:g} ms, then {args.chunks} chunks
{args.delay_ms:g} ms apart); salon (`salon serve`, one worker, SQLite) lets
{args.slots} streams generate at once (`limits.max_concurrent`) and {_waiting(args)},
so its capacity is
{args.slots} / {hold / 1000:.3f} s = {capacity:.1f} streams/s. Unloaded: {args.unloaded}
streams one after the other. Each load level: open-loop Poisson arrivals at that multiple
of capacity for {args.duration:g} s, from one aiohttp client (uvloop) on the same machine.
TTFT = request sent → first content chunk, admitted streams only; refusal time = request
sent → the 429/503 response head. "salon CPU" and "other load" are cores busy (salon; and
processes outside the benchmark, the mock upstream included; the machine is shared).

Command: `{command}`
Machine: {machine()}; {datetime.now(UTC):%Y-%m-%d}.

{chr(10).join(lines)}

{chr(10).join(notes)}
"""


def _waiting(args: argparse.Namespace) -> str:
    queue = f"`limits.max_queue`, `queue_timeout_s` {args.queue_timeout:g}"
    if args.max_wait is None:
        return f"{args.queue} wait ({queue})"
    return (
        f"up to {args.queue} wait ({queue}) while a newcomer's expected wait (the average "
        f"hold time × the queue ahead, per slot) is at most {args.max_wait:g} s "
        "(`limits.max_wait_s`)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=8, help="limits.max_concurrent")
    parser.add_argument("--queue", type=int, default=4, help="limits.max_queue")
    parser.add_argument("--queue-timeout", type=float, default=5.0, help="limits.queue_timeout_s")
    parser.add_argument(
        "--max-wait", type=float, default=None, help="limits.max_wait_s (expected-wait bound)"
    )
    parser.add_argument("--chunks", type=int, default=10, help="content chunks per stream")
    parser.add_argument("--ttft-ms", type=float, default=150.0, help="the upstream's TTFT")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="between upstream chunks")
    parser.add_argument("--unloaded", type=int, default=40, help="streams in the baseline")
    parser.add_argument("--levels", default="1,4", help="multiples of capacity, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--seed", type=int, default=7, help="of the arrival times")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args(argv)
    multiples = [float(x) for x in args.levels.split(",") if x.strip()]

    workdir, logs = make_workdir("overload")
    procs: list[Proc] = []
    try:
        upstream, upstream_url, _ = start_upstream(
            logs, "--chunks", str(args.chunks), "--ttft-ms", str(args.ttft_ms),
            "--delay-ms", str(args.delay_ms),
        )  # fmt: skip
        procs.append(upstream)

        env = salon_env(workdir / "data", upstream_url)
        env.update(
            {
                "SALON_LIMITS__MAX_CONCURRENT": str(args.slots),
                "SALON_LIMITS__MAX_QUEUE": str(args.queue),
                "SALON_LIMITS__QUEUE_TIMEOUT_S": str(args.queue_timeout),
            }
        )
        if args.max_wait is not None:
            env["SALON_LIMITS__MAX_WAIT_S"] = str(args.max_wait)
        key = admin_key(env)
        salon, salon_url, took = serve_salon(env, logs)
        procs.append(salon)
        print(f"salon serve ready in {took:.1f} s (pid {salon.process.pid}); logs in {logs}")

        url = f"{salon_url}/v1/chat/completions"
        coroutine = run_levels(
            url, key, args.chunks, args.unloaded, args.slots, multiples, args.duration, salon,
            args.seed,
        )  # fmt: skip
        base, levels, capacity = run_async(coroutine)
    finally:
        for proc in reversed(procs):
            proc.stop()

    command = "python bench/overload.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = section(args, base, levels, capacity, command.strip())
    # The expected-wait bound is measured beside the fixed short queue, not instead.
    name = "overload" if args.max_wait is None else "overload-wait"
    bench_report.publish(name, text, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
