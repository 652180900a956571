"""Does the chat model's state while it answers tell harmful compliance from benign answers
better than its state before it answers? (issue 4, docs/benchmarks.md, "Session 12").

For each development prompt, the embedded Qwen model's greedy answer (its first 40 tokens, no
gate, no system prompt) is read back by the model cut after 16 layers, at the answer's end
(the turn in the probe's template, then the answer's first 200 characters: what the hold
before recovery sees). Linear probes on that state, on the state before answering (the shipped
probe's reading) and on both concatenated are cross-validated on the development split alone
(train.folds: 5 folds grouped by contrast pair), over all answers and over those the refusal
detector does not call refusals (where an answer check would act).

    .venv/bin/python bench/answer_reading.py      # ~25 min the first time, then seconds

The answers and states are kept in --cache. Needs the embedded Qwen model and the dev extra.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from salon.backends.embedded import EmbeddedBackend
from salon.backends.hidden_states import LlamaHiddenStates
from salon.backends.layer_slice import first_layers
from salon.backends.model_files import builtin_catalog
from salon.domain import ChatMessage, CompletionRequest, SamplingParams, TextDelta
from salon.safety import train
from salon.safety.datasets import PromptRow, read_prompts, resolve_split
from salon.safety.probe import ProbeModel
from salon.safety.refusal import EARLY_CHARS, default_detector
from salon.safety.train_probe import HARM_C, LAYERS, MODEL
from salon.settings import Settings

ANSWER_TOKENS = 40


async def _answers(rows: Sequence[PromptRow], kept: Path) -> dict[str, str]:
    done: dict[str, str] = {}
    if kept.exists():
        for line in kept.read_text().splitlines():
            entry = json.loads(line)
            done[entry["uid"]] = entry["answer"]
    settings = Settings()
    backend = EmbeddedBackend(settings.embedded, settings.model_cache_dir)
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, seed=7)
    try:
        with kept.open("a") as out:
            for number, row in enumerate(rows):
                if row.uid in done:
                    continue
                request = CompletionRequest(MODEL, (ChatMessage("user", row.prompt),), params)
                events = [e async for e in backend.stream(request)]
                done[row.uid] = "".join(e.text for e in events if isinstance(e, TextDelta))
                out.write(json.dumps({"uid": row.uid, "answer": done[row.uid]}) + "\n")
                out.flush()
                if number % 50 == 0:
                    print(f"  answers: {number}/{len(rows)}", file=sys.stderr, flush=True)
    finally:
        await backend.close()
    return done


def _states(texts: Sequence[str], model_path: Path, kept: Path) -> np.ndarray:
    if kept.exists():
        return np.load(kept)
    reader = LlamaHiddenStates(model_path, threads=Settings().embedded.threads or 2)
    try:
        x = np.concatenate([reader.vectors(texts[i : i + 8]) for i in range(0, len(texts), 8)])
    finally:
        reader.close()
    np.save(kept, x)
    return x


def _cv(rows: Sequence[PromptRow], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros(len(rows))
    for tr, te in train.folds(rows):
        mean, scale = x[tr].mean(0), x[tr].std(0) + 1e-6
        head = LogisticRegression(C=HARM_C, max_iter=5000).fit((x[tr] - mean) / scale, y[tr])
        out[te] = head.predict_proba((x[te] - mean) / scale)[:, 1]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = read_prompts(resolve_split("dev"))
    probe = ProbeModel.load()
    answers = asyncio.run(_answers(rows, args.cache / "answer_reading_answers.jsonl"))
    source = builtin_catalog().prepare(MODEL, Settings().model_cache_dir, print)
    cut = first_layers(source, LAYERS)
    before = [probe.prompt(r.prompt) for r in rows]
    during = [b + answers[r.uid][:EARLY_CHARS] for b, r in zip(before, rows, strict=True)]
    x_before = _states(before, cut, args.cache / "answer_reading_before.npy")
    x_during = _states(during, cut, args.cache / "answer_reading_during.npy")
    y = np.array([r.unsafe for r in rows])
    detector = default_detector()
    answered = np.array(
        [detector.score(answers[r.uid][:EARLY_CHARS]).probability < 0.5 for r in rows]
    )
    print(
        f"{len(rows)} prompts; answered (not a refusal): {int((answered & y).sum())} of "
        f"{int(y.sum())} harmful, {int((answered & ~y).sum())} of {int((~y).sum())} safe\n"
    )
    print("| state read | AUC, all answers | AUC, answered only |")
    print("|---|---|---|")
    readings = {
        "before answering (the shipped probe's)": x_before,
        "at the end of the answer's first 200 characters": x_during,
        "both, concatenated": np.hstack([x_before, x_during]),
    }
    for name, x in readings.items():
        scores = _cv(rows, x, y)
        whole = roc_auc_score(y, scores)
        answered_only = roc_auc_score(y[answered], scores[answered])
        print(f"| {name} | {whole:.3f} | {answered_only:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
