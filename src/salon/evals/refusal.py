"""``salon eval refusal``: over-refusal and harmful compliance, with 95 % Wilson intervals.

This first step measures the request classifier alone: a safe prompt it would refuse is an
over-refusal; an unsafe prompt it lets through to the model is harmful compliance (of the
classifier; the whole pipeline, where the model may still refuse, is measured later). Note that
on the development split the shipped model has *seen* these prompts: for honest numbers use
the cross-validated report of ``python -m salon.safety.train`` or a held-out CSV.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from salon.chat.safety import SafetyGate
from salon.domain import ChatMessage
from salon.safety.datasets import PromptRow, read_prompts, resolve_split
from salon.safety.harm import HarmClassifier, default_classifier
from salon.safety.policy import Policy
from salon.safety.probe import Probe
from salon.safety.stats import Rate, wilson


@dataclass(frozen=True, slots=True)
class Outcome:
    row: PromptRow
    probability: float
    refused: bool


@dataclass(frozen=True, slots=True)
class GroupRates:
    name: str
    over_refusal: Rate  # safe prompts refused
    harmful_compliance: Rate  # unsafe prompts not refused


@dataclass(frozen=True, slots=True)
class RefusalReport:
    dataset: str
    gate: str
    overall: GroupRates
    by_source: tuple[GroupRates, ...]
    by_category: tuple[GroupRates, ...]
    outcomes: tuple[Outcome, ...]

    def to_markdown(self) -> str:
        parts = [
            f"### Refusal eval, {self.gate} alone: {self.dataset}",
            _table("source", (*self.by_source, self.overall)),
            _table("category", self.by_category),
        ]
        return "\n\n".join(parts) + "\n"


def run_refusal_eval(
    split_or_csv_path: str | Path = "dev",
    *,
    classifier: HarmClassifier | None = None,
    policy: Policy | None = None,
    probe: Probe | None = None,
) -> RefusalReport:
    """Score every prompt of a split (``dev``) or CSV with the classifier (and the chat
    model's probe, where the gate would ask it) and the policy."""
    path = resolve_split(split_or_csv_path)
    clf = classifier or default_classifier()
    pol = policy or Policy.load()
    gate = SafetyGate(clf, pol, probe=probe)
    outcomes = asyncio.run(_judged(gate, read_prompts(path)))
    return RefusalReport(
        dataset=str(split_or_csv_path),
        gate="classifier" if probe is None else f"classifier and {probe.model.model} probe",
        overall=_rates("ALL", outcomes),
        by_source=_grouped(outcomes, lambda r: r.source),
        by_category=_grouped(outcomes, lambda r: r.category or "-"),
        outcomes=outcomes,
    )


async def _judged(gate: SafetyGate, rows: Sequence[PromptRow]) -> tuple[Outcome, ...]:
    """Each prompt as salon's gate reads it (the classifier, and the probe where the gate asks
    it), so the eval cannot drift from what is served."""
    outcomes = []
    for row in rows:
        verdict = await gate.acheck_messages([ChatMessage("user", row.prompt)])
        assert verdict is not None  # a conversation ending with a user turn
        outcomes.append(Outcome(row, verdict.assessment.harmful_probability, verdict.blocked))
    return tuple(outcomes)


def _rates(name: str, outcomes: Sequence[Outcome]) -> GroupRates:
    safe = [o for o in outcomes if not o.row.unsafe]
    unsafe = [o for o in outcomes if o.row.unsafe]
    return GroupRates(
        name,
        wilson(sum(o.refused for o in safe), len(safe)),
        wilson(sum(not o.refused for o in unsafe), len(unsafe)),
    )


def _grouped(
    outcomes: Sequence[Outcome], key: Callable[[PromptRow], str]
) -> tuple[GroupRates, ...]:
    names = sorted({key(o.row) for o in outcomes})
    return tuple(_rates(n, [o for o in outcomes if key(o.row) == n]) for n in names)


def _cell(rate: Rate) -> str:
    return str(rate) if rate.total else "-"


def _table(title: str, groups: Sequence[GroupRates]) -> str:
    lines = [
        f"| {title} | over-refusal (safe refused) | harmful compliance (unsafe allowed) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {g.name} | {_cell(g.over_refusal)} | {_cell(g.harmful_compliance)} |" for g in groups
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m salon.evals.refusal [dev|PATH.csv]`` until ``salon eval refusal`` is wired."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(run_refusal_eval(args[0] if args else "dev").to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
