"""PostgreSQL restarted under load, the long version of tests/integration/test_chaos_postgres.py.

In one run, on loopback:

1. a private PostgreSQL cluster (Debian's server binaries, run as the `postgres` OS user
   in a temp dir, on a free port; the shared server on 5432 is never touched);
2. `salon serve` (its own process) on it, with the shipped fake models;
3. `--web-users` users each posting a message and following its answer to the end, one
   user reading the conversation list ten times a second, one starting a conversation five
   times a second, and one /v1 streaming client, for `--duration` seconds (every loop
   bounded in time and count);
4. every `--every` seconds a disruption, alternately `pg_ctl restart -m fast` and
   `pg_ctl stop -m fast` → `--down` seconds → `pg_ctl start`.

It reports, per kind of request: how many, succeeded, refused with the clear 503
(`database_unavailable`, Retry-After), anything else ("bad": a 500, a cut stream, a
request past its bound), p50/p99/max latency; per disruption: how long PostgreSQL took,
how long clients were refused, and the recovery time (PostgreSQL accepting again → the
first successful API call that needs it); and the data: acknowledged user messages missing,
answers not completed, answers whose stored text differs from what was streamed.

    python bench/chaos_postgres.py                # 60 s, a disruption every 10 s; prints
    python bench/chaos_postgres.py --write        # ... and writes it into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from gateway import machine, percentile
from harness import REPO

sys.path.insert(0, str(REPO))  # the private cluster and the load live beside the test

from tests.integration.conftest_server import salon_env, salon_server
from tests.integration.pg_chaos import (
    ChaosLoad,
    PrivatePostgres,
    settled_messages,
    stored_conversations,
    unavailable_reason,
)


@dataclass
class Disruption:
    kind: str  # "restart" or "stop/start"
    at_s: float  # since the load started
    pg_s: float  # pg_ctl's own time (restart; or stop + down + start)
    recovery_s: float  # PostgreSQL accepting again → first successful read through salon
    refused: int = 0  # clear 503s between the start of the disruption and the recovery
    refused_for_s: float = 0.0  # first refusal → last refusal, in that window


async def run(args: argparse.Namespace, url: str, pg: PrivatePostgres) -> dict[str, object]:
    async with ChaosLoad(url, username="bench") as load:
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        users = [asyncio.create_task(load.web_user(w, stop_at)) for w in range(args.web_users)]
        users.append(asyncio.create_task(load.v1_user(stop_at)))
        users.append(asyncio.create_task(load.reader(stop_at)))
        users.append(asyncio.create_task(load.writer(stop_at)))
        disruptions: list[Disruption] = []
        index = 0
        while time.monotonic() + args.every < stop_at - 2:
            await asyncio.sleep(args.every)
            index += 1
            began = time.monotonic()
            if index % 2:
                kind = "restart"
                await asyncio.to_thread(pg.restart)
            else:
                kind = "stop/start"
                await asyncio.to_thread(pg.stop)
                await asyncio.sleep(args.down)
                await asyncio.to_thread(pg.start)
            back = time.monotonic()
            recovery = await load.recovery_s(back)
            window = [
                o
                for o in load.outcomes
                if o.outage_error and began <= o.started + o.seconds <= back + recovery
            ]
            ends = [o.started + o.seconds for o in window]
            disruptions.append(
                Disruption(
                    kind,
                    began - t0,
                    back - began,
                    recovery,
                    len(window),
                    (max(ends) - min(ends)) if ends else 0.0,
                )
            )
            print(
                f"{kind} at {began - t0:5.1f} s: pg {back - began:.2f} s, "
                f"recovered in {recovery * 1000:.0f} ms, {len(window)} refused",
                flush=True,
            )
        await asyncio.wait_for(asyncio.gather(*users), args.duration + 3 * load.bound_s)
        elapsed = time.monotonic() - t0
    rows = await settled_messages(pg.url, within_s=60, answers=load.started)
    conversations = await stored_conversations(pg.url)
    stored_user = {content for _, role, content, _, _ in rows if role == "user"}
    answers = {mid: (content, status) for mid, role, content, status, _ in rows
               if role == "assistant"}  # fmt: skip
    return {
        "load": load,
        "elapsed": elapsed,
        "disruptions": disruptions,
        "lost": sorted(set(load.acknowledged) - stored_user),
        "created": len(load.created),
        "lost_conversations": sorted(set(load.created) - conversations),
        "acknowledged": len(load.acknowledged),
        "answers": len(answers),
        "unfinished": {
            mid: answers[mid][1] for mid in load.started if answers[mid][1] != "complete"
        },
        # Answers of turns that were refused (503) after their messages were written.
        "orphans": {mid: a[1] for mid, a in answers.items() if mid not in load.started},
        "differ": [mid for mid, text in load.answers.items() if answers[mid][0] != text],
        "followed": len(load.answers),
    }


def section(args: argparse.Namespace, result: dict[str, object]) -> str:
    load = result["load"]
    assert isinstance(load, ChaosLoad)
    disruptions = result["disruptions"]
    assert isinstance(disruptions, list)
    lines = [
        "## PostgreSQL restarted under load",
        "",
        f"`salon serve` (one worker) on a private PostgreSQL cluster, with the shipped fake "
        f"models: {args.web_users} web-app users posting a message and following its answer "
        "(fake:slow, 400 words, ~1.6 s) to the end, one reading the conversation list ten "
        "times a second, one starting a new conversation five times a second, one /v1 client "
        "streaming fake:echo, for "
        f"{args.duration:.0f} s; every {args.every:.0f} s a disruption, alternately "
        f"`pg_ctl restart -m fast` and `pg_ctl stop -m fast` → {args.down:.0f} s down → "
        '`pg_ctl start`. "refused" is the clear answer to a request that needs the database '
        'while it is away: 503 `database_unavailable` with Retry-After; "bad" is anything '
        "else that is not a success (a 500, a cut stream, a request past its 20 s bound). "
        "Recovery: PostgreSQL accepting again → the first successful read through salon "
        "(probed every 50 ms). /v1 needs the database rarely (API keys are cached).",
        "",
        "Command: `python bench/chaos_postgres.py --write`",
        f"Machine: {machine()}; {datetime.now(UTC):%Y-%m-%d}.",
        "",
        "| requests | count | ok | refused (503) | bad | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("turn", "follow", "read", "write", "v1", "probe"):
        rows = [o for o in load.outcomes if o.kind == kind]
        if not rows:
            continue
        times = [o.seconds * 1000 for o in rows]
        lines.append(
            f"| {kind} | {len(rows)} | {sum(o.ok for o in rows)} | "
            f"{sum(o.outage_error for o in rows)} | {sum(o.bad for o in rows)} | "
            f"{percentile(times, 50):.1f} | {percentile(times, 99):.1f} | {max(times):.1f} |"
        )
    lines += [
        "",
        "| disruption | at s | pg_ctl s | refused | refused for s | recovery ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for d in disruptions:
        assert isinstance(d, Disruption)
        lines.append(
            f"| {d.kind} | {d.at_s:.1f} | {d.pg_s:.2f} | {d.refused} | "
            f"{d.refused_for_s:.2f} | {d.recovery_s * 1000:.0f} |"
        )
    bad = [o for o in load.outcomes if o.bad]
    lost, unfinished, differ = result["lost"], result["unfinished"], result["differ"]
    assert isinstance(lost, list) and isinstance(unfinished, dict) and isinstance(differ, list)
    lost_conversations, orphans = result["lost_conversations"], result["orphans"]
    assert isinstance(lost_conversations, list) and isinstance(orphans, dict)
    recoveries = [d.recovery_s for d in disruptions if isinstance(d, Disruption)]
    verdict = (
        "met" if not (bad or lost or lost_conversations or unfinished or differ) else "NOT met"
    )
    lines += [
        "",
        f"- Turns acknowledged (201): {result['acknowledged']}; their user message missing "
        f"afterwards: {len(lost)}, their answer not completed: {len(unfinished)}; answers "
        f"followed to the end: {result['followed']}, stored text differing from the streamed "
        f"one: {len(differ)}. Conversations created (201): {result['created']}; missing "
        f"afterwards: {len(lost_conversations)}.",
        f"- Turns refused (503) after their messages were written: {len(orphans)}"
        + (
            f" (their answers: {', '.join(sorted(orphans.values()))}). The chat service "
            "reads the store after inserting a turn (personalization, then the turn itself), "
            "so a refusal there leaves a stored turn the client was told failed; when the "
            "generation had not started yet, its answer stays `streaming` until salon's next "
            "start (an issue of chat/service.py, outside this benchmark's scope)."
            if orphans
            else "."
        ),
        f"- Requests that were neither a success nor the clear 503: {len(bad)}"
        + (f" ({', '.join(sorted({o.detail for o in bad})[:3])})" if bad else "")
        + ".",
        f"- Recovery after PostgreSQL accepted again: max {max(recoveries, default=0) * 1000:.0f} "
        f"ms over {len(recoveries)} disruptions.",
        f"- Verdict (no hang, clear errors, recovery by itself, nothing acknowledged lost): "
        f"{verdict}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between disruptions")
    parser.add_argument("--down", type=float, default=2.0, help="seconds down in stop/start")
    parser.add_argument("--web-users", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write into docs/benchmarks.md")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    pg = PrivatePostgres()
    data_dir = Path(tempfile.mkdtemp(prefix="salon-chaos-pg-"))
    try:
        pg.start()
        env = salon_env(
            data_dir,
            ["fake:slow", "fake:echo"],
            {"fake": {"kind": "fake", "fake_delay_s": "0.004"}},
            {
                "SALON_DATABASE_URL": pg.url,
                "SALON_FLUSH_INTERVAL_S": "0.05",
                "SALON_PERSONALIZATION__EMBEDDER": "hashing",
                "SALON_LIMITS__MAX_CONCURRENT": "16",
            },
        )
        with salon_server(env) as server:
            result = asyncio.run(run(args, server.base_url, pg))
    finally:
        pg.destroy()
        shutil.rmtree(data_dir, ignore_errors=True)
    text = section(args, result)
    print(text)
    if args.write:
        bench_report.write_section("chaos-postgres", text)


if __name__ == "__main__":
    main()
