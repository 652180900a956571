"""Gateway overhead: what salon adds to a streamed chat completion.

In one run, on loopback:

1. the mock upstream (`python -m salon.backends.mock_upstream`, its own process);
2. `salon serve` (its own process, one worker, SQLite in a temp dir, log level warning)
   with a provider `up` pointing at the mock; a user and an API key made with the CLI;
3. for each concurrency, a bounded closed-loop load of streaming requests (20 content
   chunks each) from this process (one aiohttp client, uvloop), first against the
   upstream directly, then through salon.

It reports time to first token (the first chunk with content) p50/p99, streams/s,
chunks/s and errors for each, the TTFT salon adds, and the CPU each server spent per
stream; and writes the table into docs/benchmarks.md between `<!-- bench:gateway -->`
markers.

    python bench/gateway.py                      # 1, 4, 16, 64 streams, 5 s each
    python bench/gateway.py --concurrency 1,16 --duration 3 --no-write
    python bench/gateway.py --litellm            # also LiteLLM's proxy, if installed

Aims: added TTFT p50 <= 1 ms and p99 <= 10 ms at 1 stream; >= 1,000 streams/s on one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from harness import (
    TICKS,
    Proc,
    admin_key,
    free_port,
    make_workdir,
    run_async,
    salon_env,
    serve_salon,
    spawn,
    start_upstream,
    wait_http,
)

# A content chunk: `"content": "<at least one character>` (any JSON spacing).
CONTENT = re.compile(rb'"content":\s?"(?!")')
PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short answer about the weather in a few words."},
]
AIM_P50_MS, AIM_P99_MS, AIM_STREAMS_S = 1.0, 10.0, 1000.0


# -- the load ----------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    concurrency: int
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    streams: int = 0
    chunks: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    server_cpu_ms: dict[str, float] = field(default_factory=dict)  # per stream
    client_cpu_ms: float = 0.0  # per stream, this load generator
    other_cpu: float = 0.0  # cores busy with processes that are not part of the bench

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    @property
    def streams_s(self) -> float:
        return self.streams / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def chunks_s(self) -> float:
        return self.chunks / self.elapsed_s if self.elapsed_s else 0.0

    def ttft(self, q: float) -> float:
        return percentile(self.ttft_ms, q)


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


def wait_quiet(limit_s: float, below_cores: float = 0.2, window_s: float = 2.0) -> None:
    """Waits (at most `limit_s`) until the machine has been nearly idle for `window_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = machine_busy_s()
        time.sleep(window_s)
        busy = (machine_busy_s() - before) / window_s
        if busy < below_cores:
            return
        print(f"waiting for a quiet machine ({busy:.2f} cores busy)", flush=True)


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # .../v1/chat/completions
    model: str
    headers: dict[str, str]
    procs: tuple[Proc, ...]  # the server processes whose CPU is counted


async def one_stream(
    session: aiohttp.ClientSession, target: Target, body: bytes, expect: int, result: Result | None
) -> None:
    started = time.perf_counter()
    first: float | None = None
    content = 0
    done = False
    try:
        async with session.post(target.url, data=body, headers=target.headers) as response:
            if response.status != 200:
                await response.read()
                if result is not None:
                    result.error(f"http {response.status}")
                return
            buffer = b""
            async for raw in response.content.iter_any():
                buffer += raw
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: [DONE]"):
                        done = True
                    elif CONTENT.search(event):
                        content += 1
                        if first is None:
                            first = time.perf_counter()
                    elif b'"error"' in event and result is not None:
                        result.error("error event")
                        return
    except (aiohttp.ClientError, TimeoutError) as exc:
        if result is not None:
            result.error(type(exc).__name__)
        return
    if result is None:
        return
    if not done or content != expect or first is None:
        result.error(f"incomplete ({content} chunks, done={done})")
        return
    end = time.perf_counter()
    result.streams += 1
    result.chunks += content
    result.ttft_ms.append((first - started) * 1000)
    result.total_ms.append((end - started) * 1000)


async def closed_loop(
    target: Target,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    chunks: int,
    max_streams: int,
) -> Result:
    """`concurrency` workers, each sending its next request when the previous one ends;
    warm-up first, then `duration_s` measured (or `max_streams` streams, if fewer)."""
    body = json.dumps(
        {
            "model": target.model,
            "messages": PROMPT,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"Content-Type": "application/json", **target.headers}
    target = Target(target.name, target.url, target.model, headers, target.procs)
    result = Result(target.name, concurrency)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def worker(until: float, measured: Result | None, budget: list[int]) -> None:
            while time.perf_counter() < until and budget[0] > 0:
                budget[0] -= 1
                await one_stream(session, target, body, chunks, measured)

        warm_until = time.perf_counter() + warmup_s
        warm_budget = [max(concurrency * 20, 200)]
        await asyncio.gather(*(worker(warm_until, None, warm_budget) for _ in range(concurrency)))
        cpu_before = {p.name: p.cpu_s() for p in target.procs}
        all_before, own_before = machine_busy_s(), own_cpu_s()
        started = time.perf_counter()
        budget = [max_streams]
        until = started + duration_s
        await asyncio.gather(*(worker(until, result, budget) for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - started
        count = max(result.streams + result.errors, 1)
        servers = {p.name: p.cpu_s() - cpu_before[p.name] for p in target.procs}
        result.server_cpu_ms = {name: used * 1000 / count for name, used in servers.items()}
        own = own_cpu_s() - own_before
        result.client_cpu_ms = own * 1000 / count
        busy = machine_busy_s() - all_before
        result.other_cpu = max(0.0, busy - own - sum(servers.values())) / result.elapsed_s
    return result


# -- LiteLLM (optional) --------------------------------------------------------------------


def start_litellm(
    upstream_url: str, workdir: Path, logs: Path, python: str = sys.executable
) -> tuple[Proc, Target] | None:
    """LiteLLM's proxy, run by `python` — best a venv of its own, since its pins would
    otherwise move salon's dependencies: `python3 -m venv /tmp/litellm-venv &&
    /tmp/litellm-venv/bin/pip install 'litellm[proxy]'`."""
    probe = subprocess.run([python, "-c", "import litellm.proxy"], capture_output=True)
    if probe.returncode != 0:
        print(f"LiteLLM is not importable by {python}; skipping it (pip install 'litellm[proxy]')")
        return None
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: mock\n"
        "    litellm_params:\n"
        "      model: openai/mock\n"
        f"      api_base: {upstream_url}\n"
        "      api_key: not-needed\n"
        "litellm_settings:\n"
        "  set_verbose: false\n"
    )
    port = free_port()
    # Authenticated, as salon is: LiteLLM refuses to start without a master key.
    key = "sk-bench-" + os.urandom(16).hex()
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "PYTHONUNBUFFERED": "1",
        "LITELLM_MASTER_KEY": key,
    }
    argv = [
        python, "-c", "from litellm.proxy.proxy_cli import run_server; run_server()",
        "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
    proc = spawn("litellm", argv, env, logs)
    took = wait_http(proc, f"http://127.0.0.1:{port}/health/liveliness", timeout_s=120)
    print(f"litellm proxy ready in {took:.1f} s")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    return proc, Target("litellm", url, "mock", {"Authorization": f"Bearer {key}"}, (proc,))


# -- report --------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    return "–" if value != value else f"{value:,.{digits}f}"  # NaN → dash


def table(results: list[Result], baseline: str = "direct") -> str:
    by = {(r.target, r.concurrency): r for r in results}
    levels = sorted({r.concurrency for r in results})
    targets = list(dict.fromkeys(r.target for r in results))
    lines = [
        "| streams | target | TTFT p50 ms | TTFT p99 ms | added p50 ms | added p99 ms "
        "| streams/s | chunks/s | vs direct | errors | CPU ms/stream | other load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for level in levels:
        base = by.get((baseline, level))
        for name in targets:
            r = by.get((name, level))
            if r is None:
                continue
            added50 = added99 = ratio = float("nan")
            if base is not None and name != baseline:
                added50 = r.ttft(50) - base.ttft(50)
                added99 = r.ttft(99) - base.ttft(99)
                ratio = r.streams_s / base.streams_s if base.streams_s else float("nan")
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.server_cpu_ms.items())
            cpu += f", client {r.client_cpu_ms:.2f}"
            lines.append(
                f"| {level} | {name} | {fmt(r.ttft(50))} | {fmt(r.ttft(99))} "
                f"| {fmt(added50)} | {fmt(added99)} | {fmt(r.streams_s, 0)} "
                f"| {fmt(r.chunks_s, 0)} | {fmt(ratio)} | {r.errors} | {cpu} "
                f"| {r.other_cpu:.2f} |"
            )
    return "\n".join(lines)


def report(result: Result, attempt: int) -> None:
    print(
        f"{result.target:>7} c={result.concurrency:<3} #{attempt + 1} "
        f"{result.streams_s:7.0f} streams/s  TTFT p50 {result.ttft(50):7.2f} ms  "
        f"p99 {result.ttft(99):7.2f} ms  errors {result.errors}  CPU ms/stream "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.server_cpu_ms.items())
        + f", client {result.client_cpu_ms:.2f}; other load {result.other_cpu:.2f} cores",
        flush=True,
    )


def quietest(results: list[Result], repeat: int) -> list[Result]:
    """Of the repeated rounds (direct and salon back to back), per concurrency level the
    round with the least load from processes outside the bench."""
    chosen: list[Result] = []
    width = len({r.target for r in results})
    for level in dict.fromkeys(r.concurrency for r in results):
        runs = [r for r in results if r.concurrency == level]
        rounds = [runs[i * width : (i + 1) * width] for i in range(repeat)]
        chosen += min(rounds, key=lambda round_: max(r.other_cpu for r in round_))
    return chosen


def verdict(results: list[Result]) -> list[str]:
    by = {(r.target, r.concurrency): r for r in results}
    lines = []
    one, base = by.get(("salon", 1)), by.get(("direct", 1))
    if one and base:
        added50, added99 = one.ttft(50) - base.ttft(50), one.ttft(99) - base.ttft(99)
        ok50, ok99 = added50 <= AIM_P50_MS, added99 <= AIM_P99_MS
        lines.append(
            f"- Added TTFT at 1 stream: p50 {added50:+.2f} ms (aim ≤ {AIM_P50_MS:g}: "
            f"{'met' if ok50 else 'missed'}), p99 {added99:+.2f} ms (aim ≤ {AIM_P99_MS:g}: "
            f"{'met' if ok99 else 'missed'})."
        )
    salon = [r for r in results if r.target == "salon"]
    if salon:
        best = max(salon, key=lambda r: r.streams_s)
        ok = best.streams_s >= AIM_STREAMS_S
        lines.append(
            f"- Peak throughput through salon (one worker): {best.streams_s:,.0f} streams/s at "
            f"{best.concurrency} streams (aim ≥ {AIM_STREAMS_S:,.0f}): {'met' if ok else 'missed'}."
        )
    if salon:
        busiest = max(salon, key=lambda r: r.concurrency)
        cpu = busiest.server_cpu_ms.get("salon", 0.0)
        if cpu:
            lines.append(
                f"- CPU: salon spent {cpu:.2f} ms per stream at {busiest.concurrency} streams, "
                f"so one worker with a core to itself would relay about {1000 / cpu:,.0f} "
                "streams/s (a projection from CPU time, not a measurement)."
            )
    lines += _against_litellm(by, sorted({r.concurrency for r in salon}))
    if any(r.errors for r in results):
        kinds = {f"{r.target}@{r.concurrency}": r.error_kinds for r in results if r.errors}
        lines.append(f"- Errors: {kinds}")
    return lines


def _against_litellm(by: dict[tuple[str, int], Result], levels: list[int]) -> list[str]:
    """The issue's aims against LiteLLM at each concurrency: salon's added p99 at most a
    third of LiteLLM's, and at least three times its throughput."""
    lines = []
    for n in levels:
        salon, litellm, base = by.get(("salon", n)), by.get(("litellm", n)), by.get(("direct", n))
        if not (salon and litellm and base):
            continue
        ours = salon.ttft(99) - base.ttft(99)
        theirs = litellm.ttft(99) - base.ttft(99)
        speed = salon.streams_s / litellm.streams_s if litellm.streams_s else float("inf")
        ok = ours <= theirs / 3 and speed >= 3
        lines.append(
            f"- vs LiteLLM at {n} streams: added p99 {ours:+.2f} ms vs {theirs:+.2f} ms "
            f"({ours / theirs if theirs > 0 else 0:.2f}×, aim ≤ 0.33), throughput "
            f"{speed:.1f}× (aim ≥ 3): {'met' if ok else 'missed'}."
        )
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for module in ("aiohttp", "uvicorn", "starlette", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{module} {version(module)}")
    return f"{os.cpu_count()} × {cpu}, Python {platform.python_version()}, {', '.join(versions)}"


# -- main ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    parser.add_argument("--max-streams", type=int, default=200_000, help="cap per run")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds per level; the table keeps the round with the least outside load",
    )
    parser.add_argument("--litellm", action="store_true", help="also LiteLLM proxy, if installed")
    parser.add_argument(
        "--litellm-python", default=sys.executable, help="the interpreter that has LiteLLM"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each round, wait up to S seconds for the machine to be idle",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="before the load, keep the servers up this many seconds (to attach a profiler)",
    )
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    workdir, logs = make_workdir("gateway")
    procs: list[Proc] = []
    try:
        upstream, upstream_url, _ = start_upstream(logs, "--chunks", str(args.chunks))
        procs.append(upstream)

        env = salon_env(workdir / "data", upstream_url)
        key = admin_key(env)
        salon, salon_url, took = serve_salon(env, logs)
        procs.append(salon)
        print(f"salon serve ready in {took:.1f} s (pid {salon.process.pid}); logs in {logs}")

        targets = [
            Target("direct", f"{upstream_url}/chat/completions", "mock", {}, (upstream,)),
            Target(
                "salon",
                f"{salon_url}/v1/chat/completions",
                "up:mock",
                {"Authorization": f"Bearer {key}"},
                (salon, upstream),
            ),
        ]
        if args.litellm:
            started = start_litellm(upstream_url, workdir, logs, args.litellm_python)
            if started is not None:
                procs.append(started[0])
                targets.append(started[1])
        if args.hold:
            print(f"holding {args.hold:.0f} s: salon pid {salon.process.pid}", flush=True)
            time.sleep(args.hold)

        rss_start = salon.rss_mb()
        results: list[Result] = []
        for level in levels:
            for attempt in range(args.repeat):
                if args.wait_quiet:
                    wait_quiet(args.wait_quiet)
                for target in targets:
                    load = closed_loop(
                        target, level, args.duration, args.warmup, args.chunks, args.max_streams
                    )
                    result = run_async(load)
                    results.append(result)
                    report(result, attempt)
        if args.repeat > 1:
            results = quietest(results, args.repeat)
        rss_end = salon.rss_mb()
        for proc in procs:
            if proc.process.poll() is not None:
                print(f"{proc.name} died:\n{proc.log_tail()}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    command = "python bench/gateway.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    notes = "\n".join(verdict(results))
    rounds = ""
    if args.repeat > 1:
        rounds = f", {args.repeat} rounds each, the quietest kept"
    section = f"""## Gateway overhead

Streaming chat completions ({args.chunks} content chunks each) from one closed-loop aiohttp
client (uvloop) on the same machine, against the mock upstream directly (`direct`) and
through `salon serve` (one worker, SQLite, log level warning) relaying to that upstream.
TTFT = time from sending the request to the first chunk with content. "added" = salon's
TTFT minus direct TTFT at the same concurrency; "vs direct" = streams/s ratio. CPU ms/stream
= user+system time of each process (servers and this load generator) during the measured
window, per stream. "other load" = cores kept busy by processes outside the benchmark
meanwhile (the machine is shared; above ~0.1 the numbers are pessimistic). Each level ran
{args.duration:g} s after {args.warmup:g} s of warm-up{rounds}.

Command: `{command.strip()}`
Machine: {machine()}; {datetime.now(UTC):%Y-%m-%d}. salon RSS {rss_start:.0f} MB before the
load, {rss_end:.0f} MB after.

{table(results)}

{notes}
"""
    bench_report.publish("gateway", section, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
