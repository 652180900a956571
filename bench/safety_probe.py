"""What the harm gate's probe on the chat model's hidden state costs a turn (issue 4): the gate
with the probe against the embedded classifier alone, prompt by prompt in one process, on
salon's everyday requests (ordinary traffic) and on the development split (hard cases).

    .venv/bin/python bench/safety_probe.py            # print the markdown report (~5 min)
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
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import report as bench_report  # bench/report.py: bench/ is sys.path[0] as a script
from salon.app import load_probe
from salon.backends.hidden_states import HiddenStates, LlamaHiddenStates
from salon.backends.model_files import model_path
from salon.safety.datasets import PromptRow, training_prompts
from salon.safety.harm import default_classifier
from salon.safety.probe import PROBE_FROM, Probe
from salon.settings import Settings

Timing = tuple[float, float | None, float | None]


def timings(rows: Sequence[PromptRow], probe: Probe, whole: HiddenStates) -> list[Timing]:
    """Per prompt: the classifier's seconds, the probe's where the gate asked it, and, for
    the same prompt, reading the whole model's last state instead of the cut model's (the
    alternative: the probe before session 9), interleaved so both see the same load."""
    classifier = default_classifier()
    out: list[Timing] = []
    for row in rows:
        start = time.perf_counter()
        assessment = classifier.assess(row.prompt)
        middle = time.perf_counter()
        probed = alternative = None
        if probe.wanted(assessment):
            probe.assess(row.prompt, assessment)
            probed = time.perf_counter() - middle
            begin = time.perf_counter()
            whole.vectors([probe.model.prompt(row.prompt)])
            alternative = time.perf_counter() - begin
        out.append((middle - start, probed, alternative))
    return out


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def line(name: str, rows: Sequence[PromptRow], probe: Probe, whole: HiddenStates) -> str:
    measured = timings(rows, probe, whole)
    alone = [a for a, _, _ in measured]
    gate = [a + (p or 0.0) for a, p, _ in measured]
    probed = [p for _, p, _ in measured if p is not None]
    other = [w for _, _, w in measured if w is not None]
    ratio = statistics.median(p / w for _, p, w in measured if p is not None and w)
    ms = 1000.0
    return (
        f"| {name} | {len(rows)} | {len(probed)} ({len(probed) / len(rows):.0%}) "
        f"| {pct(alone, 0.5) * ms:.0f} / {pct(alone, 0.95) * ms:.0f} "
        f"| {pct(gate, 0.5) * ms:.0f} / {pct(gate, 0.95) * ms:.0f} "
        f"| {pct(probed, 0.5) * ms:.0f} / {pct(probed, 0.95) * ms:.0f} "
        f"| {pct(other, 0.5) * ms:.0f} / {pct(other, 0.95) * ms:.0f} | {ratio:.2f} |"
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
    whole_file = model_path(settings.model_cache_dir, probe.model.model)
    whole = LlamaHiddenStates(whole_file, settings.embedded.threads or 2)
    for states in (probe.states, whole):
        states.vectors(["warm-up"])  # loading the model is not a turn's cost
    try:
        table = [
            line("everyday requests", everyday, probe, whole),
            line("development split", dev, probe, whole),
        ]
    finally:
        probe.states.close()
        whole.close()
    section = "\n".join(
        [
            "## Safety: what the probe costs a turn (issue 4)",
            "",
            "Command: `.venv/bin/python bench/safety_probe.py --write`",
            f"Machine: {platform.machine()}, Python {platform.python_version()}, "
            f"{settings.embedded.threads or 'all'} threads; "
            f"{datetime.now(UTC):%Y-%m-%d}. Prompts one at a time, the classifier and the "
            f"probe ({probe.model.model}, cut after {probe.model.layers or 'all'} layers, asked "
            f"from {PROBE_FROM}) in one process, the models loaded before timing. The last two "
            "columns read the same prompts' state from the whole model (the probe before "
            "session 9), interleaved with the cut one's; the ratio is the median per prompt.",
            "",
            "| prompts | n | probed | classifier alone, ms p50 / p95 "
            "| gate with probe, ms p50 / p95 | probe when asked, ms p50 / p95 "
            "| whole model's state, ms p50 / p95 | cut / whole |",
            "|---|---|---|---|---|---|---|---|",
            *table,
        ]
    )
    bench_report.publish("safety-probe", section, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
