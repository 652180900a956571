"""What the topic head changes in the gate (issue 4, docs/benchmarks.md, "Session 19").

    .venv/bin/python bench/topic_head.py --vectors .cache/probe_vectors16.npz

The topic head (`safety.harm.TopicHead`) names child safety as a turn's category when it reads
the turn as sexual or romantic content with a minor; the policy then applies child safety's
threshold (0.6) instead of the one of the category the 13-class heads would have named. This
runs salon's own gate (`chat.safety.SafetyGate`: the classifier, the probe, the shipped policy)
with and without the head over the development split and the everyday requests,
cross-validated as `salon eval refusal --gate cv` is (each prompt judged by the fold classifier,
its fold's topic head and the fold probe head that never saw it), and over the held-out set with
the shipped models, which never saw it. The probe's hidden states come from `--vectors` (read
once, ~15 min, then kept). Prints the counts and every prompt whose decision changed. Needs the
embedded Qwen model, the dev extra and the fold classifiers' fine-tunings (the data folder's
safety-folds, ~40 min the first time)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from probe_from import Remembered, cross_validated_bench, verdicts, where
from salon.chat.safety import SafetyGate
from salon.safety import train
from salon.safety.datasets import PromptRow
from salon.safety.harm import Assessment, EmbeddedHarmClassifier, default_classifier
from salon.safety.policy import Policy
from salon.safety.probe import Probe

HEADER = (
    "| gate | dev safe refused | dev harmful through | of them SimpleSafetyTests "
    "| everyday refused | held-out safe refused | held-out harmful through "
    "| of them child safety |\n|---|---|---|---|---|---|---|---|"
)


@dataclass(frozen=True, slots=True)
class TopicProbe(Probe):
    """A variant measured here: the probe also reads every turn the topic head names, however
    low the classifier scores it (a few turns in a thousand)."""

    def wanted(self, embedded: Assessment) -> bool:
        return Probe.wanted(self, embedded) or embedded.topic is not None


def blocked(gate: SafetyGate, rows: Sequence[PromptRow]) -> dict[str, bool]:
    return {uid: v.blocked for uid, v in asyncio.run(verdicts(gate, rows)).items()}


def line(name: str, rows: Sequence[PromptRow], refused: dict[str, bool]) -> str:
    def count(keep: bool, *, harmful: bool, source: str) -> int:
        chosen = [r for r in rows if r.unsafe == harmful and where(r) == source]
        return sum(refused[r.uid] == keep for r in chosen)

    sst = [r for r in rows if r.source == "simplesafetytests"]
    held_cs = [r for r in rows if where(r) == "heldout" and r.category == "child_safety"]
    cells = [
        name,
        str(count(True, harmful=False, source="dev")),
        str(count(False, harmful=True, source="dev")),
        str(sum(not refused[r.uid] for r in sst if r.unsafe)),
        str(count(True, harmful=False, source="everyday")),
        str(count(True, harmful=False, source="heldout")),
        str(count(False, harmful=True, source="heldout")),
        f"{sum(not refused[r.uid] for r in held_cs)}/{len(held_cs)}",
    ]
    return "| " + " | ".join(cells) + " |"


def gate(full: EmbeddedHarmClassifier, probe: Probe, cache: Path, policy: Policy) -> SafetyGate:
    classifier = Remembered(train.cross_validated_classifier(full, cache=cache))
    return SafetyGate(classifier, policy, probe=probe)


def main(argv: Sequence[str] | None = None) -> int:
    bench = cross_validated_bench(__doc__, argv, heldout=True)
    rows, probe, cache = bench.rows, bench.probe, bench.folds
    policy = Policy.load()
    shipped = default_classifier()
    assert shipped.topic is not None, "no topic head: python -m salon.safety.train --topic"
    without = blocked(gate(replace(shipped, topic=None), probe, cache, policy), rows)
    with_topic = blocked(gate(shipped, probe, cache, policy), rows)
    reading = TopicProbe(probe.states, probe.model, probe.by_prompt, probe.name)
    probed = blocked(gate(shipped, reading, cache, policy), rows)
    print(HEADER)
    print(line("without the topic head", rows, without))
    print(line("**with the topic head**", rows, with_topic))
    print(line("with it, the probe reading every turn it names", rows, probed))
    for name, after in (("with the topic head", with_topic), ("probe on the topic", probed)):
        for r in rows:
            if without[r.uid] != after[r.uid]:
                change = "now refused" if after[r.uid] else "now let through"
                label = "harmful" if r.unsafe else "safe"
                print(f"- {name}: {where(r)}, {label}, {change}: {r.prompt[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
