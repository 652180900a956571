"""What the policy's category thresholds cost and buy (issue 4, docs/benchmarks.md, "Session 20").

    .venv/bin/python bench/category_rules.py --vectors .cache/probe_vectors16.npz

The policy refuses most turns from 0.88; until session 20 self-harm from 0.7 and child safety
from 0.6. Those two were set when the gate was the embedded classifier alone; since the probe,
the gate's score is the two readings averaged in log-odds and shifted by +1.239, so 0.7 is where
the average reads 0.40 and 0.6 where it reads 0.30, and a category is named from 0.5 (an
average of 0.22). Since session 20 self-harm refuses from 0.775, the average's 0.5.

This reads every prompt once through salon's own gate (the classifier, the topic head, the
probe), cross-validated on the development split and the everyday requests as `salon eval
refusal --gate cv` is, and with the shipped models on the held-out set, which they never saw;
then it applies each candidate policy to the same readings (`Policy.decide` is pure) and prints
what each refuses, every turn named self-harm or child safety scored 0.6-0.9, and every safe
prompt the shipped policy refuses and harmful prompt it lets through. ~3 min once the fold
classifiers and hidden states exist (bench/topic_head.py says how they are made).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from probe_from import Remembered, cross_validated_bench, verdicts, where
from salon.chat.safety import SafetyGate
from salon.safety import train
from salon.safety.datasets import PromptRow
from salon.safety.harm import Assessment, default_classifier
from salon.safety.policy import DEFAULT_POLICY, Policy

HEADER = (
    "| policy | dev safe refused | dev harmful through | of them SimpleSafetyTests "
    "| everyday refused | everyday harmful through | held-out safe refused "
    "| held-out harmful through |\n|---|---|---|---|---|---|---|---|"
)


def variant(base: Mapping[str, Any], **thresholds: float) -> Policy:
    """The shipped policy with some categories' refuse_at changed."""
    data = json.loads(json.dumps(base))
    for category, at in thresholds.items():
        data["categories"][category]["refuse_at"] = at
    return Policy.from_mapping(data)


def sure_only(policy: Policy, sure: float) -> Callable[[Assessment], bool]:
    """A rule measured here: a category's own threshold applies only when the category is at
    least `sure` probable (or the topic head named it); otherwise the default one."""

    def refused(a: Assessment) -> bool:
        if a.topic is None and a.category_probability < sure:
            a = replace(a, category=None)
        return policy.decide(a).refused

    return refused


def line(name: str, rows: Sequence[PromptRow], refused: Mapping[str, bool]) -> str:
    def count(keep: bool, *, harmful: bool, source: str) -> int:
        chosen = [r for r in rows if r.unsafe == harmful and where(r) == source]
        return sum(refused[r.uid] == keep for r in chosen)

    sst = [r for r in rows if r.source == "simplesafetytests" and r.unsafe]
    cells = [
        name,
        str(count(True, harmful=False, source="dev")),
        str(count(False, harmful=True, source="dev")),
        str(sum(not refused[r.uid] for r in sst)),
        str(count(True, harmful=False, source="everyday")),
        str(count(False, harmful=True, source="everyday")),
        str(count(True, harmful=False, source="heldout")),
        str(count(False, harmful=True, source="heldout")),
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    bench = cross_validated_bench(__doc__, argv, heldout=True)
    rows = bench.rows
    folds = train.cross_validated_classifier(default_classifier(), cache=bench.folds)
    shipped = Policy.load()
    gate = SafetyGate(Remembered(folds), shipped, probe=bench.probe)
    read = {uid: v.assessment for uid, v in asyncio.run(verdicts(gate, rows)).items()}
    base = json.loads(DEFAULT_POLICY.read_text(encoding="utf-8"))

    def plain(policy: Policy) -> Callable[[Assessment], bool]:
        return lambda a: policy.decide(a).refused

    before = "session 19 (self-harm 0.7, child safety 0.6)"
    candidates: dict[str, Callable[[Assessment], bool]] = {
        before: plain(variant(base, self_harm=0.7, child_safety=0.6)),
        "**shipped**": plain(shipped),
        "every category 0.88": plain(variant(base, self_harm=0.88, child_safety=0.88)),
    }
    for sh in (0.72, 0.75, 0.78, 0.8, 0.85):
        for cs in (0.6, 0.7, 0.8):
            name = f"self-harm {sh}, child safety {cs}"
            candidates[name] = plain(variant(base, self_harm=sh, child_safety=cs))
    for sure in (0.4, 0.5, 0.6, 0.7):
        candidates[f"{before}, a category's own threshold from its p {sure}"] = sure_only(
            variant(base, self_harm=0.7, child_safety=0.6), sure
        )
    decided = {
        name: {r.uid: refused(read[r.uid]) for r in rows} for name, refused in candidates.items()
    }
    print(HEADER)
    for name, refused in decided.items():
        print(line(name, rows, refused))
    print("\nTurns whose category is self-harm or child safety, scored 0.6-0.9:")
    for r in rows:
        a = read[r.uid]
        if a.category in ("self_harm", "child_safety") and 0.6 <= a.harmful_probability < 0.9:
            print(
                f"- {a.harmful_probability:.3f} {a.category} ({a.category_probability:.2f}) "
                f"{where(r)} {'harmful' if r.unsafe else 'safe'}: {r.prompt[:90]}"
            )
    now = decided["**shipped**"]
    print("\nRefused by the shipped policy (safe) or let through (harmful), and what reads them:")
    for r in rows:
        a = read[r.uid]
        if now[r.uid] == (not r.unsafe):
            print(
                f"- {where(r)} {'harmful' if r.unsafe else 'safe'} p={a.harmful_probability:.2f} "
                f"{a.category} ({a.category_probability:.2f}) topic={a.topic}: {r.prompt[:100]}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
