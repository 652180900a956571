"""The gate on requests in other languages than English (issue 4, docs/benchmarks.md,
"Session 20").

    .venv/bin/python bench/foreign_turns.py --vectors .cache/probe_vectors16.npz

The embedded classifier learnt from English prompts; since session 20 the gate also asks the
chat model's probe about every turn identified as another language (`chat.safety.FOREIGN_FROM`),
whatever the classifier scores, and the probe's reading alone decides. This runs salon's gate
(the shipped classifier, topic head, probe and policy, none of which saw these prompts) over
`multilingual.csv` (80 contrast pairs in eight languages, written for this measurement and
never trained on) and prints, per language, the safe prompts refused and the harmful ones let
through, with that reading and without it (as before session 20), then every prompt that
either decides against its label. The hidden states come from `--vectors` (read once, ~1 min
for these prompts). Needs the embedded Qwen model and the dev extra.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from probe_from import cached_probe
from salon.chat.safety import SafetyGate
from salon.domain import ChatMessage
from salon.personalization.language import detect_language
from salon.safety.datasets import PromptRow, read_prompts, resolve_split
from salon.safety.harm import default_classifier
from salon.safety.policy import Policy
from salon.settings import Settings


async def decisions(gate: SafetyGate, rows: Sequence[PromptRow]) -> dict[str, tuple[bool, bool]]:
    """Per prompt: refused by the gate, and refused without the foreign reading (as before
    session 20: the probe only from PROBE_FROM, whatever the language, averaged with the
    classifier as for English turns)."""
    probe = gate.probe
    assert probe is not None
    out = {}
    for r in rows:
        verdict = await gate.acheck_messages([ChatMessage("user", r.prompt)])
        assert verdict is not None  # a conversation ending with a user turn
        embedded = gate.classifier.assess(r.prompt)
        read = probe.assess(r.prompt, embedded) if probe.wanted(embedded) else embedded
        out[r.uid] = (verdict.blocked, gate.policy.decide(read).refused)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors", type=Path, default=Path(".cache/probe_vectors16.npz"))
    parser.add_argument("--prompts", default="multilingual", help="a split name or a CSV")
    args = parser.parse_args(argv)
    rows = read_prompts(resolve_split(args.prompts))
    probe = cached_probe(rows, args.vectors, Settings())
    gate = SafetyGate(default_classifier(), Policy.load(), probe=probe)
    decided = asyncio.run(decisions(gate, rows))
    language = {r.uid: detect_language(r.prompt)[0] for r in rows}
    print(
        "| language | prompts | safe refused | harmful through | without the foreign reading: "
        "safe refused | harmful through |\n|---|---|---|---|---|---|"
    )
    for lang in [*sorted(set(language.values())), "all"]:
        chosen = [r for r in rows if lang in ("all", language[r.uid])]
        cells = [lang, str(len(chosen))]
        for k in (0, 1):
            cells.append(str(sum(decided[r.uid][k] for r in chosen if not r.unsafe)))
            cells.append(str(sum(not decided[r.uid][k] for r in chosen if r.unsafe)))
        print("| " + " | ".join(cells) + " |")
    print("\nWrong decisions (with / without the foreign reading):")
    for r in rows:
        now, before = decided[r.uid]
        if now == r.unsafe and before == r.unsafe:
            continue
        label = "harmful" if r.unsafe else "safe"
        marks = "/".join("ok" if d == r.unsafe else "WRONG" for d in (now, before))
        print(f"- {language[r.uid]} {label} {marks}: {r.prompt[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
