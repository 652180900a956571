"""Following a generation from another node: live over Redis pub/sub vs polling the store.

In one run, on loopback, three salon apps (uvicorn in this process) share one SQLite
database: node `a` runs the generations (fake:slow, one word every `--delay-ms`); node `b`
has Redis (`SALON_REDIS_URL`), node `c` has not. For each of `--streams` generations the
user follows it on `a` (where it runs: the reference for when each character existed), on
`b` and on `c` at once. For every character offset, the lag is when a follower first had
it minus when the follower on `a` had it; reported as p50/p95/max per follower, with the
number of SSE deltas each received and whether each got the whole text.

    python bench/nodes.py            # prints the section
    python bench/nodes.py --write    # ... and writes it into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from gateway import fmt, machine, percentile
from salon.app import create_app
from salon.settings import ProviderSettings, Settings

REDIS_URL = "redis://127.0.0.1:6379/0"


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


async def follow(client: httpx.AsyncClient, message_id: int) -> tuple[list[tuple[int, float]], str]:
    """(offset reached, time) per delta, and the text."""
    arrivals: list[tuple[int, float]] = []
    text: list[str] = []
    async with client.stream("GET", f"/api/messages/{message_id}/stream") as response:
        name = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("id: ") and name == "delta":
                arrivals.append((int(line[4:]), time.perf_counter()))
            elif line.startswith("data: "):
                if name != "delta":
                    break
                text.append(json.loads(line[6:])["text"])
    return arrivals, "".join(text)


def lags(reference: list[tuple[int, float]], follower: list[tuple[int, float]]) -> list[float]:
    """Per character offset: when `follower` first had it minus when `reference` did."""

    def had(arrivals: list[tuple[int, float]]) -> dict[int, float]:
        times: dict[int, float] = {}
        start = 0
        for offset, at in arrivals:
            for position in range(start, offset):
                times[position] = at
            start = max(start, offset)
        return times

    ref, got = had(reference), had(follower)
    return [max(0.0, got[p] - ref[p]) * 1000 for p in ref if p in got]


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    database = f"sqlite+aiosqlite:///{workdir}/salon.db"
    prefix = f"salon-bench-{uuid.uuid4().hex[:8]}:"

    def settings(node: str, redis: bool) -> Settings:
        return Settings(
            data_dir=workdir,
            database_url=database,
            node_name=node,
            models=["fake:slow"],
            providers={"fake": ProviderSettings(kind="fake", fake_delay_s=args.delay_ms / 1000)},
            personalization={"embedder": "hashing", "extraction": "off"},
            redis_url=REDIS_URL if redis else None,
            redis_key_prefix=prefix,
        )

    results: dict[str, list[float]] = {"b": [], "c": []}
    deltas: dict[str, int] = {"a": 0, "b": 0, "c": 0}
    whole: dict[str, int] = {"a": 0, "b": 0, "c": 0}
    async with (
        serving(settings("a", True)) as a,
        serving(settings("b", True)) as b,
        serving(settings("c", False)) as c,
    ):
        async with httpx.AsyncClient(base_url=a, timeout=30) as http:
            signed = await http.post(
                "/api/auth/signup", json={"username": "ann", "password": "correct horse"}
            )
            cookies, csrf = http.cookies, signed.json()["csrf_token"]
        clients = {
            name: httpx.AsyncClient(
                base_url=url, cookies=cookies, headers={"x-csrf-token": csrf}, timeout=30
            )
            for name, url in (("a", a), ("b", b), ("c", c))
        }
        try:
            for _ in range(args.streams):
                cid = (await clients["a"].post("/api/conversations", json={})).json()["id"]
                turn = await clients["a"].post(
                    f"/api/conversations/{cid}/messages", json={"content": "count"}
                )
                message_id = turn.json()["assistant_message"]["id"]
                got = await asyncio.gather(*(follow(clients[n], message_id) for n in "abc"))
                expected = " ".join(f"w{i}" for i in range(1, 401))
                for name, (arrivals, text) in zip("abc", got, strict=True):
                    deltas[name] += len(arrivals)
                    whole[name] += text == expected
                results["b"] += lags(got[0][0], got[1][0])
                results["c"] += lags(got[0][0], got[2][0])
        finally:
            for client in clients.values():
                await client.aclose()
    summary: dict[str, dict[str, float]] = {}
    for name in "abc":
        values = results.get(name, [])
        summary[name] = {
            "p50": percentile(values, 50) if values else 0.0,
            "p95": percentile(values, 95) if values else 0.0,
            "max": max(values) if values else 0.0,
            "deltas": deltas[name] / args.streams,
            "whole": whole[name],
        }
    return summary


def section(args: argparse.Namespace, summary: dict[str, dict[str, float]], command: str) -> str:
    rows = []
    labels = {
        "a": "on the node that runs it (reference)",
        "b": "on another node, live over Redis",
        "c": "on another node, polling the store",
    }
    for name in "abc":
        s = summary[name]
        lag = (
            "– | – | –"
            if name == "a"
            else f"{fmt(s['p50'], 1)} | {fmt(s['p95'], 1)} | {fmt(s['max'], 1)}"
        )
        rows.append(
            f"| {labels[name]} | {lag} | {s['deltas']:.0f} | {int(s['whole'])}/{args.streams} |"
        )
    ratio = summary["c"]["p50"] / summary["b"]["p50"] if summary["b"]["p50"] else float("inf")
    return f"""## Following from another node

Three salon apps in one process share one SQLite database; node a runs each generation
(fake:slow: 400 words, one every {args.delay_ms:g} ms), node b joins the nodes through Redis
(pub/sub), node c does not (it polls the store every 0.5 s; checkpoints every 0.25 s). Each
of {args.streams} generations is followed on all three at once; the lag of a character is
when a follower had it minus when the follower on node a had it.

Command: `{command}`
Machine: {machine()}; {datetime.now(UTC):%Y-%m-%d}.

| follower | lag p50 ms | p95 ms | max ms | SSE deltas per answer | whole text |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Polling lags {ratio:.0f}× more than the live relay at the median.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=5, help="generations followed")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="between fake:slow words")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="salon-nodes-") as workdir:
        summary = asyncio.run(run(args, Path(workdir)))
    command = "python bench/nodes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = section(args, summary, command.strip())
    print(text)
    if args.write:
        bench_report.write_section("nodes", text)
        print(f"wrote {bench_report.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
