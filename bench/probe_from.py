"""What the gate's probe buys at each PROBE_FROM, against what it costs on everyday turns
(issue 4, docs/benchmarks.md, "Session 16").

    .venv/bin/python bench/probe_from.py --oof .cache/gate_oof.npz \
        --vectors .cache/probe_vectors16.npz

The gate asks the probe (one prompt evaluation through 16 of the chat model's layers, ~0.3 s on
two cores) about every turn the embedded classifier scores from PROBE_FROM up. Cross-validated
as `train_probe` reports it (the classifier's out-of-fold scores, the probe's fold heads), for
each candidate PROBE_FROM this prints the share of everyday requests that pay for the probe and
the gate at the policy's default refuse_at (the categories' own thresholds, such as
child_safety's 0.6, are not applied: the out-of-fold scores carry no category): the development
split's safe prompts refused and harmful prompts let through, and the everyday requests' safe
ones refused. The probe's reading of a prompt is that of the shipped fold head that never saw
it (harm_probe.npz), so only the development split's and the everyday requests' hidden states
are read (~15 min, kept in --vectors as train_probe keeps them). Needs the embedded Qwen model,
the dev extra, and the classifier's out-of-fold scores (`--oof`, as `python -m
salon.safety.train --oof` keeps them; computed and kept there if missing)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from salon.backends.layer_slice import first_layers
from salon.backends.model_files import builtin_catalog
from salon.safety import train
from salon.safety import train_probe as tp
from salon.safety.datasets import PromptRow, training_prompts
from salon.safety.policy import Policy
from salon.safety.probe import ProbeModel
from salon.settings import Settings

CANDIDATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def row(
    rows: Sequence[PromptRow],
    gate: Sequence[float],
    scores: Sequence[float],
    start: float,
    at: float,
) -> str:
    dev = [i for i, r in enumerate(rows) if r.source not in ("salon_written", "salon_everyday")]
    everyday = [i for i, r in enumerate(rows) if r.source == "salon_everyday"]
    asked = sum(gate[i] >= start for i in everyday)
    asked_dev = sum(gate[i] >= start for i in dev)
    safe = sum(1 for i in dev if not rows[i].unsafe and scores[i] >= at)
    through = sum(1 for i in dev if rows[i].unsafe and scores[i] < at)
    refused = sum(1 for i in everyday if not rows[i].unsafe and scores[i] >= at)
    return (
        f"| {start:g} | {asked}/{len(everyday)} ({asked / len(everyday):.0%}) "
        f"| {asked_dev}/{len(dev)} | {safe} | {through} | {refused} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors", type=Path, default=Path(".cache/probe_vectors16.npz"))
    parser.add_argument("--oof", type=Path, default=Path(".cache/gate_oof.npz"))
    args = parser.parse_args(argv)
    rows = training_prompts()
    catalog = builtin_catalog()
    path = first_layers(catalog.prepare(tp.MODEL, Settings().model_cache_dir, print), tp.LAYERS)
    gate = train.gate_oof(rows, args.oof)
    folds = ProbeModel.load().folds
    read = [i for i, r in enumerate(rows) if r.source != "salon_written"]
    states = tp.embed([rows[i] for i in read], path, args.vectors, tp.POOLINGS)
    x = dict(zip(read, states, strict=True))
    probe = [0.0] * len(rows)
    for k, (_, test) in enumerate(train.folds(rows)):
        mine = [i for i in test if i in x]
        vectors = np.stack([x[i] for i in mine])
        for i, p in zip(mine, tp._probabilities(folds[k][0], vectors), strict=True):
            probe[i] = p
    print(
        "| PROBE_FROM | everyday turns probed | dev prompts probed | dev safe refused "
        "| dev harmful through | everyday refused |\n|---|---|---|---|---|---|"
    )
    at = Policy.load().default.refuse_at
    for start in CANDIDATES:
        print(row(rows, gate, tp.combined(gate, probe, tp.WEIGHT, start), start, at), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
