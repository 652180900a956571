"""What the harm gate's probe on the chat model's hidden state costs a turn (issue 4): the gate
with the probe against the embedded classifier alone, prompt by prompt in one process, on
salon's everyday requests (ordinary traffic) and on the development split (hard cases).

    .venv/bin/python bench/safety_probe.py            # print the markdown report (~3 min)
    .venv/bin/python bench/safety_probe.py --write    # also write docs/benchmarks.md
    .venv/bin/python bench/safety_probe.py --limit 40 # a quick look

Needs the embedded Qwen model (`salon models prepare embedded:qwen2.5-coder-1.5b-instruct`).
How well the probe judges is in safety/data/probe_report.md (cross-validated); this measures
time only.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from salon.app import load_probe
from salon.safety.datasets import PromptRow, training_prompts
from salon.safety.harm import default_classifier
from salon.safety.probe import PROBE_FROM, Probe
from salon.settings import Settings


def timings(rows: Sequence[PromptRow], probe: Probe) -> list[tuple[float, float | None]]:
    """Per prompt: the classifier's seconds, and the probe's where the gate asked it."""
    classifier = default_classifier()
    out: list[tuple[float, float | None]] = []
    for row in rows:
        start = time.perf_counter()
        assessment = classifier.assess(row.prompt)
        middle = time.perf_counter()
        probed = None
        if probe.wanted(assessment):
            probe.assess(row.prompt, assessment)
            probed = time.perf_counter() - middle
        out.append((middle - start, probed))
    return out


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def line(name: str, rows: Sequence[PromptRow], probe: Probe) -> str:
    measured = timings(rows, probe)
    alone = [a for a, _ in measured]
    gate = [a + (p or 0.0) for a, p in measured]
    probed = [p for _, p in measured if p is not None]
    ms = 1000.0
    return (
        f"| {name} | {len(rows)} | {len(probed)} ({len(probed) / len(rows):.0%}) "
        f"| {pct(alone, 0.5) * ms:.0f} / {pct(alone, 0.95) * ms:.0f} "
        f"| {pct(gate, 0.5) * ms:.0f} / {pct(gate, 0.95) * ms:.0f} "
        f"| {pct(probed, 0.5) * ms:.0f} / {pct(probed, 0.95) * ms:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--limit", type=int, default=200, help="prompts per set")
    args = parser.parse_args()
    settings = Settings()
    probe = load_probe(settings)
    if probe is None:
        raise SystemExit("the probe's model is not prepared: salon models prepare embedded:...")
    rows = training_prompts()
    rng = random.Random(7)
    everyday = rng.sample([r for r in rows if r.source == "salon_everyday"], args.limit)
    dev = rng.sample([r for r in rows if not r.source.startswith("salon_")], args.limit)
    probe.states.vectors(["warm-up"])  # loading the model is not a turn's cost
    try:
        table = [line("everyday requests", everyday, probe), line("development split", dev, probe)]
    finally:
        probe.states.close()
    section = "\n".join(
        [
            "## Safety: what the probe costs a turn (issue 4)",
            "",
            "Command: `.venv/bin/python bench/safety_probe.py --write`",
            f"Machine: {platform.machine()}, Python {platform.python_version()}, "
            f"{settings.embedded.threads or 'all'} threads; "
            f"{datetime.now(UTC):%Y-%m-%d}. Prompts one at a time, the classifier and the "
            f"probe ({probe.model.model}, asked from {PROBE_FROM}) in one process, the model "
            "loaded before timing.",
            "",
            "| prompts | n | probed | classifier alone, ms p50 / p95 "
            "| gate with probe, ms p50 / p95 | probe when asked, ms p50 / p95 |",
            "|---|---|---|---|---|---|",
            *table,
        ]
    )
    bench_report.publish("safety-probe", section, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
