"""Soak: steady mixed load through salon for minutes; does its memory stay flat?

In one run, on loopback: the mock upstream (its own process), `salon serve` (its own process,
one worker, SQLite in a temp dir) with provider `up` at that mock, and `--concurrency`
closed-loop workers (one aiohttp client, uvloop) sending a mix of /v1 requests for
`--minutes`:

    60 %  streamed to the end (with usage)        10 %  streamed, max_tokens 5
    15 %  not streamed                             10 %  streamed, the client leaves after
     5 %  an upstream that fails mid-stream              3 chunks (salon must stop it)
          (`malformed`: an error event is the expected answer)

salon's resident memory (VmRSS) is sampled every `--sample` seconds. It reports the growth
from the end of the warm-up (`--warmup-share` of the run) to the end (aim: ≤ 5 %), the
requests per kind, and every unexpected answer (aim: none).

    python bench/soak.py --minutes 20            # the issue's soak; --write for the docs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from gateway import CONTENT, PROMPT, machine
from harness import Proc, admin_key, make_workdir, run_async, salon_env, serve_salon, start_upstream

AIM_GROWTH = 0.05
MIX = (
    ("stream", 60),
    ("whole", 15),
    ("short", 10),
    ("leave", 10),
    ("malformed", 5),
)


@dataclass
class Soak:
    done: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s, RSS MB)


async def one(session: aiohttp.ClientSession, url: str, key: str, kind: str, soak: Soak) -> None:
    body: dict[str, object] = {"model": "up:mock", "messages": PROMPT, "stream": True}
    if kind == "stream":
        body["stream_options"] = {"include_usage": True}
    elif kind == "whole":
        body["stream"] = False
    elif kind == "short":
        body["max_tokens"] = 5
    elif kind == "malformed":
        body["model"] = "up:malformed"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        async with session.post(url, data=json.dumps(body), headers=headers) as response:
            if response.status != 200:
                soak.errors[f"{kind}: http {response.status}"] += 1
                await response.read()
                return
            if kind == "whole":
                answer = await response.json()
                if answer["choices"][0]["message"]["content"]:
                    soak.done[kind] += 1
                else:
                    soak.errors[f"{kind}: empty"] += 1
                return
            content, done, error = 0, False, False
            async for line in response.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif CONTENT.search(line):
                    content += 1
                    if kind == "leave" and content == 3:
                        soak.done[kind] += 1
                        return  # leaving the block closes the connection mid-stream
                elif line.startswith(b"data: ") and b'"error"' in line:
                    error = True
            expected = {"stream": 20, "short": 5, "malformed": 3}.get(kind, 20)
            ok = done and content == expected and error == (kind == "malformed")
            if ok:
                soak.done[kind] += 1
            else:
                soak.errors[f"{kind}: {content} chunks, done={done}, error={error}"] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        soak.errors[f"{kind}: {type(exc).__name__}"] += 1


async def load(
    url: str,
    key: str,
    concurrency: int,
    seconds: float,
    sample_s: float,
    salon: Proc,
    seed: int,
    pause_s: float,
) -> Soak:
    soak = Soak()
    kinds = [kind for kind, _ in MIX]
    weights = [weight for _, weight in MIX]
    rng = random.Random(seed)
    started = time.monotonic()
    until = started + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def worker() -> None:
            while time.monotonic() < until:
                await one(session, url, key, rng.choices(kinds, weights)[0], soak)
                await asyncio.sleep(pause_s)  # a breath, so a shared machine keeps a core

        async def sampler() -> None:
            while True:
                now = time.monotonic() - started
                soak.samples.append((now, salon.rss_mb()))
                print(
                    f"{now:6.0f} s  RSS {soak.samples[-1][1]:6.1f} MB  requests "
                    f"{sum(soak.done.values())}  errors {sum(soak.errors.values())}",
                    flush=True,
                )
                if now >= seconds:
                    return
                await asyncio.sleep(min(sample_s, max(0.0, seconds - now)))

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    soak.samples.append((time.monotonic() - started, salon.rss_mb()))
    return soak


def section(args: argparse.Namespace, soak: Soak, command: str) -> str:
    warm_s = args.minutes * 60 * args.warmup_share
    after = [rss for t, rss in soak.samples if t >= warm_s]
    base, end = after[0], soak.samples[-1][1]
    peak = max(after)
    growth = (end - base) / base
    total = sum(soak.done.values()) + sum(soak.errors.values())
    mix = ", ".join(f"{kind} {soak.done[kind]}" for kind, _ in MIX)
    ok = growth <= AIM_GROWTH and not soak.errors
    samples = " ".join(f"{rss:.0f}" for _, rss in soak.samples)
    errors = dict(soak.errors) if soak.errors else "none"
    short = " (a short run: the issue asks for 20 minutes)" if args.minutes < 20 else ""
    return f"""## Soak

Steady mixed /v1 load through `salon serve` (one worker, SQLite) in front of the mock
upstream: {args.concurrency} closed-loop workers ({args.pause_ms:g} ms pause between two
requests) for {args.minutes:g} minutes, each request
drawn from {", ".join(f"{kind} {weight} %" for kind, weight in MIX)} ("leave": the client
disconnects after 3 chunks; "malformed": an upstream that breaks mid-stream, whose error
event is the expected answer). salon's RSS sampled every {args.sample:g} s; growth is
measured from the end of the warm-up ({warm_s:.0f} s) to the end.

Command: `{command}`
Machine: {machine()}; {datetime.now(UTC):%Y-%m-%d}.

- Requests: {total:,} ({total / (args.minutes * 60):.0f}/s): {mix}.
- RSS: {soak.samples[0][1]:.1f} MB at the start, {base:.1f} MB after warm-up, {end:.1f} MB
  at the end (peak after warm-up {peak:.1f} MB): growth {growth:+.1%} (aim ≤
  {AIM_GROWTH:.0%}).
- Unexpected answers: {errors}.
- Verdict: {"met" if ok else "missed"}{short}.
- RSS samples, MB: {samples}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--warmup-share", type=float, default=0.25, help="of the run")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--pause-ms", type=float, default=50.0, help="per worker, between requests")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args(argv)

    workdir, logs = make_workdir("soak")
    procs: list[Proc] = []
    try:
        upstream, upstream_url, _ = start_upstream(logs, "--chunks", "20", "--delay-ms", "2")
        procs.append(upstream)
        env = salon_env(workdir / "data", upstream_url)
        env["SALON_MODELS"] = "up:mock,up:malformed"
        env["SALON_LIMITS__MAX_CONCURRENT"] = str(args.concurrency * 2)
        key = admin_key(env)
        salon, salon_url, _ = serve_salon(env, logs)
        procs.append(salon)
        print(f"salon serve ready (pid {salon.process.pid}); logs in {logs}", flush=True)
        url = f"{salon_url}/v1/chat/completions"
        coroutine = load(
            url, key, args.concurrency, args.minutes * 60, args.sample, salon, args.seed,
            args.pause_ms / 1000,
        )  # fmt: skip
        soak = run_async(coroutine)
    finally:
        for proc in reversed(procs):
            proc.stop()
    command = "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = section(args, soak, command.strip())
    bench_report.publish("soak", text, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
