"""What the gate's probe buys at each PROBE_FROM, against what it costs on everyday turns
(issue 4, docs/benchmarks.md, "Session 16" and "Session 18").

    .venv/bin/python bench/probe_from.py --vectors .cache/probe_vectors16.npz

The gate asks the probe (one prompt evaluation through 16 of the chat model's layers, ~0.3 s on
two cores) about every turn the embedded classifier scores from PROBE_FROM up. For each
candidate PROBE_FROM this runs salon's own gate (`chat.safety.SafetyGate`: the shipped policy
with its categories' thresholds, the probe's category rule, recovery's bounds) over the
development split and the everyday requests, cross-validated as `salon eval refusal --gate cv`
is: each prompt judged by the fold classifier and the fold probe head that never saw it. Only
the hidden states are not read live: they come from `--vectors` (the development split's and
the everyday requests', ~15 min the first time, kept there as train_probe keeps them).

It prints the share of everyday requests that pay for the probe; the development split's safe
prompts refused and harmful prompts let through; the everyday requests refused; and, for
recovery, the prompts on which salon would push past a refusal by the model (re-ask it), read
the way the gate reads them: a turn the probe skipped gets the probe's second reading first.
Needs the embedded Qwen model, the dev extra, and the fold classifiers' fine-tunings (kept in
the data folder's safety-folds, ~40 min the first time, as `--gate cv` keeps them)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from salon.backends.layer_slice import first_layers
from salon.backends.model_files import builtin_catalog
from salon.chat.safety import GateVerdict, SafetyGate
from salon.domain import ChatMessage
from salon.safety import train
from salon.safety import train_probe as tp
from salon.safety.datasets import PromptRow, read_prompts, resolve_split, training_prompts
from salon.safety.harm import Assessment, HarmClassifier, default_classifier
from salon.safety.policy import Policy
from salon.safety.probe import Probe, ProbeModel, cross_validated
from salon.settings import Settings

CANDIDATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
HEADER = (
    "| PROBE_FROM | everyday turns probed | dev prompts probed | dev safe refused "
    "| dev harmful through | everyday refused | dev safe recoverable | dev harmful recoverable "
    "|\n|---|---|---|---|---|---|---|---|"
)


@dataclass(frozen=True, slots=True)
class CachedStates:
    """The probe's hidden states, read from the cache instead of the model (HiddenStates)."""

    known: dict[str, np.ndarray]

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.known[t] for t in texts])

    def close(self) -> None:
        return None


@dataclass(slots=True)
class Remembered:
    """A classifier whose verdicts are kept: every candidate reads the same turns."""

    inner: HarmClassifier
    seen: dict[str, Assessment] = field(default_factory=dict)
    name: str = "embedded-cv"

    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment:
        if turn not in self.seen:
            self.seen[turn] = self.inner.assess(turn, context)
        return self.seen[turn]


def cached_probe(rows: Sequence[PromptRow], vectors: Path, settings: Settings) -> Probe:
    """The shipped probe, cross-validated on the training prompts as `--gate cv` reads them,
    over `rows`' hidden states from the cache at `vectors` (those missing are read first)."""
    path = first_layers(
        builtin_catalog().prepare(tp.MODEL, settings.model_cache_dir, print), tp.LAYERS
    )
    model = ProbeModel.load()
    states = tp.embed(rows, path, vectors, model.poolings)
    known = dict(zip((model.prompt(r.prompt) for r in rows), states, strict=True))
    everything = training_prompts()
    fold_of = [
        (everything[i].prompt, k)
        for k, (_, test) in enumerate(train.folds(everything))
        for i in test
    ]
    return cross_validated(Probe(CachedStates(known), model), fold_of)


@dataclass(frozen=True, slots=True)
class CrossValidated:
    """What the gate benches share: the development split's and everyday prompts (and the
    held-out set's), the probe over their cached hidden states, and the fold classifiers'
    cache (`train.cross_validated_classifier` reads it)."""

    rows: list[PromptRow]
    probe: Probe
    folds: Path


def cross_validated_bench(
    doc: str | None, argv: Sequence[str] | None, *, heldout: bool
) -> CrossValidated:
    """Parse `--vectors` and load what the gate benches run on."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--vectors", type=Path, default=Path(".cache/probe_vectors16.npz"))
    args = parser.parse_args(argv)
    settings = Settings()
    rows = [r for r in training_prompts() if r.source != "salon_written"]
    if heldout:
        rows += read_prompts(resolve_split("heldout"))
    probe = cached_probe(rows, args.vectors, settings)
    return CrossValidated(rows, probe, settings.data_dir / train.FOLD_CACHE)


async def verdicts(gate: SafetyGate, rows: Sequence[PromptRow]) -> dict[str, GateVerdict]:
    """Each row's verdict, the row's prompt read as a conversation's first user turn."""
    out = {}
    for r in rows:
        verdict = await gate.acheck_messages([ChatMessage("user", r.prompt)])
        assert verdict is not None  # a conversation ending with a user turn
        out[r.uid] = verdict
    return out


def where(row: PromptRow) -> str:
    """Which set a bench row comes from: dev, everyday or heldout."""
    if row.source == "salon_everyday":
        return "everyday"
    return "heldout" if row.source == "salon_heldout" else "dev"


async def _recoverable(gate: SafetyGate, verdict: GateVerdict) -> bool:
    """Whether salon would re-ask this turn if the model refused it."""
    if verdict.blocked or not verdict.recoverable:
        return False
    if verdict.second_reading is None:
        return True
    return (await verdict.second_reading()).recoverable


async def row(gate: SafetyGate, rows: Sequence[PromptRow], start: float) -> str:
    everyday = [r for r in rows if r.source == "salon_everyday"]
    dev = [r for r in rows if r.source != "salon_everyday"]
    read = await verdicts(gate, rows)
    back = {r.uid: await _recoverable(gate, read[r.uid]) for r in dev}
    asked = sum(read[r.uid].probed for r in everyday)
    cells = [
        f"{start:g}",
        f"{asked}/{len(everyday)} ({asked / len(everyday):.0%})",
        f"{sum(read[r.uid].probed for r in dev)}/{len(dev)}",
        str(sum(read[r.uid].blocked for r in dev if not r.unsafe)),
        str(sum(not read[r.uid].blocked for r in dev if r.unsafe)),
        str(sum(read[r.uid].blocked for r in everyday if not r.unsafe)),
        str(sum(back[r.uid] for r in dev if not r.unsafe)),
        str(sum(back[r.uid] for r in dev if r.unsafe)),
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    bench = cross_validated_bench(__doc__, argv, heldout=False)
    rows, probe = bench.rows, bench.probe
    classifier = Remembered(
        train.cross_validated_classifier(default_classifier(), cache=bench.folds)
    )
    policy = Policy.load()
    print(HEADER)
    for start in CANDIDATES:
        gate = SafetyGate(classifier, policy, probe=replace(probe, start=start))
        print(asyncio.run(row(gate, rows, start)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
