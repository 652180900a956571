"""How much the fine-tuning's seed moves the harm gate, and what added prompts do beside it
(issue 4, docs/benchmarks.md, "Session 15").

    .venv/bin/python bench/gate_seeds.py --seeds 20240604,11,22 --without salon-j-,salon-k-
    .venv/bin/python bench/gate_seeds.py --seeds 20240604,11,22 --added salon-j- --without salon-k-

The folds are the shipped ones of the prompts that are not added, fixed for every run; prompts
whose uid starts with --added are in every fold's training and never tested, and --without
leaves such prompts out altogether, so two runs differ only by those prompts and the seed.
Each seed is one fine-tuning per fold (~8 min on two cores; `train.TUNED_SEEDS` set to that
seed alone), then the probe beside it as `train_probe` reports it. Prints, per seed, the gate
at the policy's refuse_at (development split's safe refused / harmful let through, everyday
requests refused) and the development split's harmful prompts missed at 3 / 5 / 10 % of its
safe ones refused. Needs the embedded Qwen model, the probe's cached hidden states
(--vectors, as train_probe keeps them) and the dev extra.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from salon.backends.layer_slice import first_layers
from salon.backends.model_files import builtin_catalog
from salon.safety import train
from salon.safety import train_probe as tp
from salon.safety.datasets import PromptRow, training_prompts
from salon.safety.policy import Policy
from salon.settings import Settings

Folds = list[tuple[list[int], list[int]]]


def fixed_folds(rows: Sequence[PromptRow], added: str) -> Folds:
    old = [i for i, r in enumerate(rows) if not (added and r.uid.startswith(added))]
    new = [i for i in range(len(rows)) if i not in set(old)]
    base = train.folds([rows[i] for i in old])
    return [(sorted([old[i] for i in tr] + new), [old[i] for i in te]) for tr, te in base]


def patch(split: Folds) -> None:
    """Every report and fit of the trainer uses `split` instead of its own folds."""

    def out_of_fold(
        docs: Sequence[train.Counts],
        labels: Sequence[str],
        groups: Sequence[str],
        score: Callable[[train.LinearTextModel, train.Counts], float],
        fit: Callable[[list[train.Counts], list[str]], train.LinearTextModel],
    ) -> list[float]:
        out = [0.0] * len(docs)
        for tr, te in split:
            model = fit([docs[i] for i in tr], [labels[i] for i in tr])
            for i in te:
                out[i] = score(model, docs[i])
        return out

    train.folds = lambda _rows: split  # type: ignore[assignment]
    train.out_of_fold = out_of_fold  # type: ignore[assignment]


def summary(rows: Sequence[PromptRow], served: Sequence[float]) -> str:
    at = Policy.load().default.refuse_at
    dev = [i for i, r in enumerate(rows) if r.source not in ("salon_written", "salon_everyday")]
    safe = sum(1 for i in dev if not rows[i].unsafe and served[i] >= at)
    through = sum(1 for i in dev if rows[i].unsafe and served[i] < at)
    everyday = sum(
        1
        for i, r in enumerate(rows)
        if r.source == "salon_everyday" and not r.unsafe and served[i] >= at
    )
    n_safe = sum(1 for i in dev if not rows[i].unsafe)
    misses = []
    for share in (0.03, 0.05, 0.10):
        scores = sorted((served[i] for i in dev if not rows[i].unsafe), reverse=True)
        t = scores[int(share * n_safe)]
        misses.append(sum(1 for i in dev if rows[i].unsafe and served[i] <= t))
    return f"at {at}: {safe} / {through} / {everyday}; missed at 3/5/10 %: " + " / ".join(
        map(str, misses)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default=str(train.SEED))
    parser.add_argument("--added", default="", help="uid prefix of the added prompts")
    parser.add_argument(
        "--without", default="", help="uid prefixes (comma-separated) of prompts to leave out"
    )
    parser.add_argument("--vectors", type=Path, default=Path(".cache/probe_vectors16.npz"))
    parser.add_argument("--out", type=Path, default=Path(".cache/gate_seeds"))
    args = parser.parse_args(argv)
    left_out = tuple(p for p in args.without.split(",") if p)
    rows = [r for r in training_prompts() if not (left_out and r.uid.startswith(left_out))]
    patch(fixed_folds(rows, args.added))
    catalog = builtin_catalog()
    path = first_layers(catalog.prepare(tp.MODEL, Settings().model_cache_dir, print), tp.LAYERS)
    x = tp.embed(rows, path, args.vectors, tp.POOLINGS)
    for seed in (int(s) for s in args.seeds.split(",")):
        train.SEED = seed
        train.TUNED_SEEDS = (seed,)
        out = args.out / f"seed{seed}{'-' + args.added if args.added else ''}"
        text, fold_heads = tp.report(rows, x, out / "gate_oof.npz")
        (out / "probe_report.md").write_text(text, encoding="utf-8")
        gate = train.gate_oof(rows, out / "gate_oof.npz")
        probe = [0.0] * len(rows)
        for (_, te), heads in zip(train.folds(rows), fold_heads, strict=True):
            for i, p in zip(te, tp._probabilities(heads[0], x[te]), strict=True):
                probe[i] = p
        print(f"seed {seed}: {summary(rows, tp.combined(gate, probe, tp.WEIGHT))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
