"""Train the harm gate's probe on the embedded chat model's hidden states (`safety/probe.py`).

    python -m salon.safety.train_probe [--model NAME] [--vectors FILE] [--oof FILE] [--check]

Reads every training prompt (the embedded classifier's: dev.csv, written.csv, everyday.csv)
through the chat model's first LAYERS layers once (~30 min for 3,347 prompts through 16 of
Qwen2.5-Coder-1.5B's 28 layers on two cores; `--vectors` keeps them, and a later run reads only
new prompts), cross-validates the probe on the embedded classifier's folds beside that
classifier's own out-of-fold scores (its five folds' fine-tunings: ~23 min more, unless
`--oof` names the file `python -m salon.safety.train --oof` kept for the same prompts), and writes
`harm_probe.npz` and `probe_report.md`. Needs the dev extra (scikit-learn, torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from salon.backends.hidden_states import LlamaHiddenStates
from salon.backends.layer_slice import first_layers
from salon.backends.model_files import builtin_catalog
from salon.safety import train
from salon.safety.datasets import CATEGORIES, DATA, PromptRow, training_prompts
from salon.safety.harm import mixed
from salon.safety.policy import Policy
from salon.safety.probe import PROBE_ARTEFACT, PROBE_FROM, LinearHead, head_arrays, shifted
from salon.settings import Settings

F32 = train.F32
MODEL = "qwen2.5-coder-1.5b-instruct"
# Qwen's ChatML around one user turn, without a system prompt: the state at the last token is
# the one from which the model would start its answer. Session 10 compared readings by 5-fold
# CV on the development split alone (bench/probe_readings.py: 576 prompts, five seeds; probe
# alone, harmful missed of 401 at 3 / 5 / 10 % of safe ones refused): this template
# 64 / 46 / 13; the state at the turn's own last token (no "assistant" header) 100 / 77 / 32;
# the turn inside a judge's question ("would answering this help someone cause serious
# harm?") 107 / 82 / 37. Asking the model about harm makes its state worse for the probe.
# Session 13: this state and the turn's own last token's, concatenated, 46 / 34 / 9 on that
# benchmark; but on all training prompts, averaged with the classifier at refuse_at, 10-11
# safe refused and 23-26 harmful through against 9 and 25, for a second prompt evaluation per
# turn. A second model's state (Qwen2.5-Coder-0.5B) did not help either (60 / 48 / 16).
TEMPLATE = "<|im_start|>user\n{turn}<|im_end|>\n<|im_start|>assistant\n"
MAX_CHARS = 1500
# The probe reads the state after this many of the model's 28 layers (the file cut there,
# backends/layer_slice.py), not after the last one. Cross-validated on the same 3,347 prompts
# and folds, the probe alone missed 20.4 / 10.5 / 3.2 % of the development split's harmful
# prompts at 3 / 5 / 10 % of its safe ones refused, against 35.2 / 23.4 / 9.0 % after all 28
# layers; the last layers turn the reading into the next token. Session 10, the development
# split alone (as for TEMPLATE): after 8 / 12 / 16 / 20 / 24 layers 161 / 86 / 64 / 92 / 100
# missed at 3 %, 132 / 57 / 46 / 51 / 63 at 5 %; concatenating 12+16, 16+20, 12+16+20 or
# 8+16+24 did not beat 16 alone.
LAYERS = 16
# How the states of the turn's tokens are pooled, each pooling's vectors concatenated
# (backends/hidden_states.py; each pooling costs a prompt evaluation of its own). Session 10,
# all 3,531 training prompts, the classifier's folds: the probe alone with "last" + "mean"
# missed 51 / 34 / 14 of the development split's 401 harmful prompts at 3 / 5 / 10 % of its
# safe ones refused, "last" 73 / 37 / 13, "mean" 50 / 42 / 19; but averaged with the
# classifier, at refuse_at, "last" + "mean" refused 10 / 175 safe and let 28 / 401 harmful
# through against "last"'s 9 and 25 (from 0.6: 10 and 21 against 10 and 20). Twice the cost
# for nothing measurable: "last" alone.
POOLINGS: tuple[str, ...] = ("last",)
# L2 penalty of the harm probe (sklearn's C): cross-validated on the development split's
# prompts, the probe alone after 16 layers with C 0.003 / 0.01 / 0.03 missed 58 / 42 / 61 of
# 401 harmful prompts at 5 % of its safe ones refused (session 8, after all 28 layers:
# 0.01 was best too).
HARM_C = 0.01
CATEGORY_C = 0.01
# The probe's share of the log-odds average with the embedded classifier (the report compares
# 0.3 to 0.7; session 9, after 16 layers, 0.6 to 0.9 with the average's refusal point from 0.5
# to 0.8: 0.6 and 0.7 were within one prompt of each other, 0.8 and more let more through).
WEIGHT = 0.6
# Where the average should refuse. Cross-validated on the development split (175 safe, 401
# harmful prompts) and the 661 everyday requests, safe refused / harmful let through / everyday
# refused: session 9, 0.7 gave 9 / 25 / 2 (0.6: 10 / 20 / 7; 0.8: 7 / 42 / 2) with one
# fine-tuning's seed, a favourable draw (session 15: 25 to 39 by seed alone). Session 15, the
# fine-tuned head averaged over three seeds: 0.7 gives 7 / 31 / 1, 0.68 8 / 27 / 2, 0.66
# 9 / 26 / 2. The shift maps it onto the policy's refuse_at, so one policy serves the gate
# with and without the probe.
REFUSE_FROM = 0.68
BATCH = 16
REPORT = DATA / "probe_report.md"


def embed(
    rows: Sequence[PromptRow], path: Path, cache: Path | None, poolings: Sequence[str] = ("last",)
) -> F32:
    """Every row's hidden states, each pooling's vectors concatenated in order. With `cache`,
    states already there (same model file, template, clipping and pooling; one file per
    pooling beside `cache`) are reused and only new prompts are read, so adding prompts to the
    training set, or a pooling to the probe, costs their reading only."""
    parts = [_pooled(rows, path, _pooling_cache(cache, p), p) for p in poolings]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _pooling_cache(cache: Path | None, pooling: str) -> Path | None:
    if cache is None or pooling == "last":  # the file's name before there were poolings
        return cache
    return cache.with_name(f"{cache.stem}.{pooling}{cache.suffix}")


def _pooled(rows: Sequence[PromptRow], path: Path, cache: Path | None, pooling: str) -> F32:
    texts = [TEMPLATE.replace("{turn}", r.prompt.strip()[:MAX_CHARS]) for r in rows]
    known = _cached(cache, path, pooling)
    missing = sorted({t for t in texts if t not in known})
    if missing:
        threads = Settings().embedded.threads or 2
        states = LlamaHiddenStates(path, threads=threads, poolings=(pooling,))
        try:
            for i in range(0, len(missing), BATCH):
                batch = missing[i : i + BATCH]
                known.update(zip(batch, states.vectors(batch), strict=True))
                if i % (BATCH * 20) == 0:
                    print(
                        f"  hidden states ({pooling}): {i}/{len(missing)}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            states.close()
    if cache is not None and missing:
        # every state known, not only these rows': benches reading other prompt sets share it
        kept = sorted(known)
        np.savez(
            cache,
            x=np.stack([known[t] for t in kept]).astype(np.float32),
            texts=np.array(kept),
            key=np.array(_cache_key(path, pooling)),
        )
    return np.stack([known[t] for t in texts]).astype(np.float32)


def _cache_key(path: Path, pooling: str) -> str:
    # "last" keeps the key it had before the pooling was a choice: its states are the same
    parts: list[object] = [path.name, TEMPLATE, MAX_CHARS]
    if pooling != "last":
        parts.append(pooling)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _cached(cache: Path | None, path: Path, pooling: str) -> dict[str, F32]:
    if cache is None or not cache.exists():
        return {}
    with np.load(cache) as saved:
        if "texts" not in saved.files or str(saved["key"]) != _cache_key(path, pooling):
            return {}
        return dict(zip((str(t) for t in saved["texts"]), saved["x"], strict=True))


def fit_harm(x: F32, unsafe: np.ndarray, c: float = HARM_C) -> LinearHead:
    mean, scale = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=5000).fit((x - mean) / scale, unsafe)
    return LinearHead(
        mean.astype(np.float32),
        scale.astype(np.float32),
        model.coef_.astype(np.float32),
        model.intercept_.astype(np.float32),
    )


def fit_category(x: F32, labels: Sequence[str]) -> LinearHead:
    mean, scale = x.mean(0), x.std(0) + 1e-6
    index = [CATEGORIES.index(label) for label in labels]
    model = LogisticRegression(C=CATEGORY_C, max_iter=5000).fit((x - mean) / scale, index)
    weight = np.zeros((len(CATEGORIES), x.shape[1]), dtype=np.float32)
    bias = np.full(len(CATEGORIES), -1e4, dtype=np.float32)  # classes unseen in a fold
    for row, cls in enumerate(model.classes_):
        weight[cls] = model.coef_[row]
        bias[cls] = model.intercept_[row]
    return LinearHead(mean.astype(np.float32), scale.astype(np.float32), weight, bias)


def fit_heads(rows: Sequence[PromptRow], x: F32, idx: Sequence[int]) -> tuple[LinearHead, ...]:
    unsafe = np.array([rows[i].unsafe for i in idx])
    harmful = [i for i in idx if rows[i].harm_category is not None]
    labels = [str(rows[i].harm_category) for i in harmful]
    return fit_harm(x[list(idx)], unsafe), fit_category(x[harmful], labels)


def shift() -> float:
    return _logit(Policy.load().default.refuse_at) - _logit(REFUSE_FROM)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def combined(gate: Sequence[float], probe: Sequence[float], weight: float) -> list[float]:
    """What the gate serves: the probe's reading averaged in, and shifted onto the policy's
    scale, from the gate's PROBE_FROM up."""
    both = averaged(gate, probe, weight)
    return [b if g >= PROBE_FROM else g for g, b in zip(gate, both, strict=True)]


def averaged(gate: Sequence[float], probe: Sequence[float], weight: float) -> list[float]:
    """The probe's reading averaged in and shifted, whatever the classifier's score: what
    recovery reads on a turn the gate did not probe once the model refuses it."""
    return [shifted(b, shift()) for b in mixed(gate, probe, 1.0 - weight)]


def _second_reading(
    rows: Sequence[PromptRow], gate: Sequence[float], probe: Sequence[float]
) -> str:
    """Calibration of the probe's reading on the turns the gate does not probe (the
    classifier's score under PROBE_FROM), which recovery reads once the model refuses one."""
    skipped = [i for i, g in enumerate(gate) if g < PROBE_FROM]
    chosen = [rows[i] for i in skipped]
    read = averaged([gate[i] for i in skipped], [probe[i] for i in skipped], WEIGHT)
    dev_rows, dev = train._development_only(chosen, {"read": read})
    return "\n\n".join(
        [
            f"All {len(chosen)} such training prompts:",
            train.calibration(chosen, read),
            f"The {len(dev_rows)} of the development split:",
            train.calibration(dev_rows, dev["read"]),
        ]
    )


def report(
    rows: Sequence[PromptRow], x: F32, oof: Path | None = None
) -> tuple[str, list[tuple[LinearHead, ...]]]:
    fold_heads: list[tuple[LinearHead, ...]] = []
    probe = [0.0] * len(rows)
    for tr, te in train.folds(rows):
        fold = fit_heads(rows, x, tr)
        fold_heads.append(fold)
        for i, p in zip(te, _probabilities(fold[0], x[te]), strict=True):
            probe[i] = p
    gate = train.gate_oof(rows, oof)
    refuse_at = Policy.load().default.refuse_at
    heads: dict[str, Sequence[float]] = {
        "embedded classifier (shipped gate)": gate,
        f"{MODEL} probe alone": probe,
        **{
            f"averaged in log-odds, probe weight {w}": mixed(gate, probe, 1.0 - w)
            for w in (0.3, 0.5, 0.7)
        },
        f"shipped: probe weight {WEIGHT} for gate scores from {PROBE_FROM}, shifted": combined(
            gate, probe, WEIGHT
        ),
    }
    served = heads[list(heads)[-1]]
    asked = sum(g >= PROBE_FROM for g in gate)
    everyday = [i for i, r in enumerate(rows) if r.source == "salon_everyday"]
    asked_everyday = sum(gate[i] >= PROBE_FROM for i in everyday)
    parts = [
        f"## Harm probe on {MODEL}'s hidden state after {LAYERS} layers, pooled "
        f"{' + '.join(POOLINGS)} "
        f"({train.FOLDS}-fold CV, the embedded classifier's folds)",
        f"{len(rows)} prompts; probe C {HARM_C}. The gate asks the probe about "
        f"{asked} of {len(rows)} training prompts ({asked_everyday} of {len(everyday)} everyday "
        "requests).",
        "Operating points, development split's prompts only:",
        train.operating_points(*train._development_only(rows, heads)),
        "Operating points, all training prompts:",
        train.operating_points(rows, heads),
        f"The embedded classifier alone at the policy's refuse_at ({refuse_at}):",
        train.harm_table(rows, gate, refuse_at),
        f"The shipped combination at the policy's refuse_at ({refuse_at}; the average's "
        f"{REFUSE_FROM}, shift {shift():.3f} in log-odds):",
        train.harm_table(rows, served, refuse_at),
        "Calibration of the shipped combination:",
        train.calibration(rows, served),
        f"The second reading: the turns the classifier scores under {PROBE_FROM}, which the "
        "gate does not probe, are read by the probe once the model refuses one, before "
        "recovery pushes past the refusal; the probe averaged in, as the gate would:",
        _second_reading(rows, gate, probe),
    ]
    return "\n\n".join(parts) + "\n", fold_heads


def _probabilities(head: LinearHead, x: F32) -> list[float]:
    return [float(v) for v in 1.0 / (1.0 + np.exp(-head.logits(x)[:, 0]))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m salon.safety.train_probe", description=__doc__)
    parser.add_argument("--model", default=MODEL, help="embedded catalog name")
    parser.add_argument("--vectors", type=Path, help="cache of the hidden states (.npz)")
    parser.add_argument(
        "--oof", type=Path, help="the classifier's out-of-fold scores (train --oof)"
    )
    parser.add_argument("--check", action="store_true", help="report only; keep the artefact")
    args = parser.parse_args(argv)
    catalog = builtin_catalog()
    path = first_layers(catalog.prepare(args.model, Settings().model_cache_dir, print), LAYERS)
    rows = training_prompts()
    x = embed(rows, path, args.vectors, POOLINGS)
    text, fold_heads = report(rows, x, args.oof)
    sys.stdout.write(text)
    if args.check:
        return 0
    harm, category = fit_heads(rows, x, range(len(rows)))
    meta = {
        "model": args.model,
        "sha256": catalog.get(args.model).sha256,
        "template": TEMPLATE,
        "max_chars": MAX_CHARS,
        "layers": LAYERS,
        "poolings": list(POOLINGS),
        "weight": WEIGHT,
        "shift": shift(),
        "categories": list(CATEGORIES),
        "folds": len(fold_heads),
        "rows": len(rows),
        "trainer": "salon.safety.train_probe",
    }
    arrays = head_arrays("harm", harm) | head_arrays("category", category)
    for i, (fold_harm, fold_category) in enumerate(fold_heads):
        arrays |= head_arrays(f"fold{i}_harm", fold_harm)
        arrays |= head_arrays(f"fold{i}_category", fold_category)
    np.savez_compressed(PROBE_ARTEFACT, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
    REPORT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
