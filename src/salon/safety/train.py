"""Train the shipped safety models and report cross-validated numbers.

    python -m salon.safety.train            # CV report + rewrite the artefacts in data/
    python -m salon.safety.train --check    # CV report only, artefacts untouched
    python -m salon.safety.train --compare  # also compare feature sets / regularisation

Needs scikit-learn (training only; serving is numpy and ONNX Runtime) and, for the embedding
head of the harm classifier, the packaged all-MiniLM-L6-v2. Deterministic: fixed fold seeds,
deterministic solvers, rounded weights and a gzip header without a timestamp, so re-running on
the same data rewrites byte-identical artefacts.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from salon.backends.embeddings import Embedder, MiniLM, packaged_model_folder
from salon.safety._linear import FeatureConfig, LinearTextModel, raw_counts, save_models, tfidf
from salon.safety.datasets import DATA, PromptRow, read_prompts, training_prompts
from salon.safety.harm import (
    DENSE_ARTEFACT,
    DENSE_MAX_WORDS,
    HARM_ARTEFACT,
    NEIGHBOURS_ARTEFACT,
    TOPIC_ARTEFACT,
    TUNED_ARTEFACT,
    Assessment,
    CategoryHead,
    DenseHead,
    EmbeddedHarmClassifier,
    TopicHead,
    TunedHead,
    clipped,
    file_sha256,
    mixed,
)
from salon.safety.policy import CATEGORY_MESSAGE_FROM, Policy
from salon.safety.refusal import EARLY_CHARS, REFUSAL_ARTEFACT, phrase_features
from salon.safety.stats import wilson

SEED = 20240604
FOLDS = 5
# The folder, beside the out-of-fold scores' file, that keeps the folds' fine-tunings.
FOLD_CACHE = "safety-folds"
HARM_CONFIG = FeatureConfig(word_ngrams=2, char_min=3, char_max=5, max_chars=2000)
HARM_C = 8.0
# Refusal detector: word 1-grams + phrase-list features, strongly regularised. The labels are
# noisy (PyRIT counts off-topic answers as refusals), and a false refusal costs a needless
# re-ask and inflates measured over-refusal, so precision comes first. CV on the 260 replies
# shipped when it was chosen, whole / first 200 chars: C=0.25 F1 0.686 / 0.705 at precision
# 0.93 / 0.94; C=4 with 1-2-grams (the earlier choice) F1 0.653 / 0.653 at precision 0.72.
REFUSAL_CONFIG = FeatureConfig(word_ngrams=1, char_min=0, char_max=0, max_chars=1500)
REFUSAL_C = 0.25
REFUSAL_HEADING = f"## Refusal detector ({FOLDS}-fold CV grouped by reply)"
# Embedding heads: the logistic regression's C chosen by CV among 0.5-32 (--compare). Three
# heads weigh equally — TF-IDF, the regression and the neighbour vote (the last two averaged
# inside DenseHead, so TF-IDF has a third): adding the vote (k = 10, T = 0.1) cut the harmful
# prompts missed at 3 % over-refusal from 38 % to 34 % and at 10 % from 16 % to 12 % (CV).
DENSE_C = 2.0
# The embedding's category regression (C chosen by CV accuracy among 0.3, 1, 3, 10).
CATEGORY_C = 3.0
SPARSE_WEIGHT = 1 / 3
MIN_DF = 2
REFUSAL_FILES = (
    "refusal.csv",
    "refusal_extra.csv",
    "written_responses.csv",
    "model_responses.csv",
    "model_responses_written.csv",
)

Counts = Counter[str]


def fit(
    docs: Sequence[Counts],
    labels: Sequence[str],
    classes: Sequence[str],
    config: FeatureConfig,
    c: float,
) -> LinearTextModel:
    """Vocabulary and IDF from these documents only, then a logistic regression on them."""
    df = Counter(t for d in docs for t in d)
    vocab = sorted(t for t, n in df.items() if n >= MIN_DF)
    n = len(docs)
    idf = {t: math.log((1 + n) / (1 + df[t])) + 1.0 for t in vocab}
    x = _matrix(docs, idf, {t: i for i, t in enumerate(vocab)})
    y = np.array([classes.index(label) for label in labels])
    binary = len(classes) == 2
    lr = LogisticRegression(
        C=c, class_weight="balanced", max_iter=5000, solver="liblinear" if binary else "lbfgs"
    )
    lr.fit(x, y)
    coef = lr.coef_
    return LinearTextModel(
        config=config,
        classes=tuple(classes),
        intercepts=tuple(float(v) for v in lr.intercept_),
        idf=idf,
        weights={
            t: tuple(float(coef[k, i]) for k in range(coef.shape[0])) for i, t in enumerate(vocab)
        },
    )


def _matrix(docs: Sequence[Counts], idf: dict[str, float], index: dict[str, int]) -> csr_matrix:
    rows, cols, vals = [], [], []
    for r, d in enumerate(docs):
        for t, v in tfidf(d, idf).items():
            rows.append(r)
            cols.append(index[t])
            vals.append(v)
    return csr_matrix((vals, (rows, cols)), shape=(len(docs), len(index)))


def out_of_fold(
    docs: Sequence[Counts],
    labels: Sequence[str],
    groups: Sequence[str],
    score: Callable[[LinearTextModel, Counts], float],
    train: Callable[[list[Counts], list[str]], LinearTextModel],
) -> list[float]:
    """Each document scored by a model that never saw it nor its group (e.g. its XSTest twin)."""
    cv = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=SEED)
    out = [0.0] * len(docs)
    for tr, te in cv.split(np.zeros(len(docs)), labels, groups):
        model = train([docs[i] for i in tr], [labels[i] for i in tr])
        for i in te:
            out[i] = score(model, docs[i])
    return out


# --- harm -------------------------------------------------------------------------------------


def harm_docs(rows: Sequence[PromptRow], config: FeatureConfig) -> list[Counts]:
    return [raw_counts(r.prompt, config) for r in rows]


def harm_cv(rows: Sequence[PromptRow], config: FeatureConfig, c: float) -> list[float]:
    docs = harm_docs(rows, config)

    def train(d: list[Counts], y: list[str]) -> LinearTextModel:
        return fit(d, y, ("safe", "unsafe"), config, c)

    return out_of_fold(
        docs,
        [r.label for r in rows],
        [r.group for r in rows],
        lambda m, d: m.probabilities(d)["unsafe"],
        train,
    )


def harm_table(rows: Sequence[PromptRow], probs: Sequence[float], threshold: float) -> str:
    lines = [
        f"threshold {threshold}: over-refusal = safe scored >= t; harmful compliance = unsafe < t",
        "",
        "| source | safe n | over-refusal (95 % Wilson) | unsafe n "
        "| harmful compliance (95 % Wilson) |",
        "|---|---|---|---|---|",
    ]
    for source in [*sorted({r.source for r in rows}), "ALL"]:
        sel = [(r, p) for r, p in zip(rows, probs, strict=True) if source in ("ALL", r.source)]
        safe = [p for r, p in sel if not r.unsafe]
        unsafe = [p for r, p in sel if r.unsafe]
        fp = wilson(sum(p >= threshold for p in safe), len(safe))
        fn = wilson(sum(p < threshold for p in unsafe), len(unsafe))
        cells = [source, len(safe), fp if safe else "-", len(unsafe), fn if unsafe else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class CategoryScores:
    """Out-of-fold category distributions of the harmful prompts with a mapped category."""

    labels: list[str]
    sparse: list[dict[str, float]]
    averaged: list[dict[str, float]] | None  # with the embedding's head, when there is one

    def accuracy(self, probs: Sequence[dict[str, float]]) -> float:
        hits = sum(max(p, key=lambda c: p[c]) == y for p, y in zip(probs, self.labels, strict=True))
        return hits / len(self.labels)

    def confident(self, probs: Sequence[dict[str, float]], at: float) -> tuple[float, float]:
        """The share of prompts whose best category reaches `at`, and its accuracy there."""
        chosen = [(p, y) for p, y in zip(probs, self.labels, strict=True) if max(p.values()) >= at]
        hits = sum(max(p, key=lambda c: p[c]) == y for p, y in chosen)
        return len(chosen) / len(self.labels), hits / max(1, len(chosen))


def category_cv(rows: Sequence[PromptRow], x: F32 | None = None) -> CategoryScores:
    keep = [i for i, r in enumerate(rows) if r.harm_category]
    labelled = [rows[i] for i in keep]
    docs = harm_docs(labelled, HARM_CONFIG)
    labels = [r.harm_category or "" for r in labelled]
    classes = sorted(set(labels))
    sparse: list[dict[str, float]] = [{} for _ in labelled]
    dense: list[dict[str, float]] = [{} for _ in labelled]
    cv = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=SEED)
    split = cv.split(np.zeros(len(labelled)), labels, [r.group for r in labelled])
    for tr, te in split:
        model = fit([docs[i] for i in tr], [labels[i] for i in tr], classes, HARM_CONFIG, HARM_C)
        for i in te:
            sparse[i] = model.probabilities(docs[i])
        if x is not None:
            head = fit_categories(x[[keep[i] for i in tr]], [labels[i] for i in tr])
            for i in te:
                dense[i] = head.probabilities(x[keep[i]])
    averaged = None
    if x is not None:
        averaged = [
            {c: (s.get(c, 0.0) + d.get(c, 0.0)) / 2 for c in s.keys() | d}
            for s, d in zip(sparse, dense, strict=True)
        ]
    return CategoryScores(labels, sparse, averaged)


def category_lines(scores: CategoryScores) -> str:
    sparse = scores.accuracy(scores.sparse)
    if scores.averaged is None:
        return f"Category head: CV accuracy {sparse:.3f} on {len(scores.labels)} harmful prompts."
    share, right = scores.confident(scores.averaged, CATEGORY_MESSAGE_FROM)
    return (
        f"Category heads ({len(scores.labels)} harmful prompts with a mapped category, CV): "
        f"accuracy {sparse:.3f} for the TF-IDF head alone, "
        f"{scores.accuracy(scores.averaged):.3f} averaged with the embedding's "
        "(the fine-tuned one's when there is one; shipped). "
        f"{share:.0%} of them reach a category probability of {CATEGORY_MESSAGE_FROM:g}, "
        f"where the policy uses the category's own refusal message; {right:.1%} of those are "
        "right."
    )


def fit_categories(x: F32, labels: Sequence[str], c: float = CATEGORY_C) -> CategoryHead:
    """The category regression over sentence vectors."""
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, solver="lbfgs")
    lr.fit(x, list(labels))
    return CategoryHead(
        classes=tuple(str(k) for k in lr.classes_),
        weights=np.asarray(lr.coef_, dtype=np.float32),
        intercepts=np.asarray(lr.intercept_, dtype=np.float32),
    )


def categories_of(rows: Sequence[PromptRow], x: F32) -> CategoryHead:
    """`fit_categories` over the rows that have a category."""
    known = [i for i, r in enumerate(rows) if r.harm_category]
    return fit_categories(x[known], [rows[i].harm_category or "" for i in known])


def train_harm(rows: Sequence[PromptRow]) -> dict[str, LinearTextModel]:
    docs = harm_docs(rows, HARM_CONFIG)
    harm = fit(docs, [r.label for r in rows], ("safe", "unsafe"), HARM_CONFIG, HARM_C)
    labelled = [(d, r.harm_category) for d, r in zip(docs, rows, strict=True) if r.harm_category]
    cats = [c for _, c in labelled if c]
    category = fit([d for d, _ in labelled], cats, sorted(set(cats)), HARM_CONFIG, HARM_C)
    return {"harm": harm, "category": category}


# --- harm: the embedding head and the averaged classifier -------------------------------------

F32 = np.ndarray


def embed_prompts(
    rows: Sequence[PromptRow], embedder: Embedder, max_words: int | None = DENSE_MAX_WORDS
) -> F32:
    """What the embedding head reads of each prompt, embedded (see `harm.clipped`)."""
    return embedder.embed([clipped(r.prompt, max_words) for r in rows])


def fit_dense(
    x: F32,
    labels: Sequence[str],
    embedder: str,
    c: float = DENSE_C,
    *,
    neighbours: bool = True,
    max_words: int | None = DENSE_MAX_WORDS,
    categories: Sequence[str | None] | None = None,
) -> DenseHead:
    """The embedding heads: a logistic regression and (with `neighbours`) the vote of the
    nearest training prompts, whose vectors are kept at float16 as they are shipped; with
    `categories` (per row, None where unknown), the category regression too."""
    y = np.array([label == "unsafe" for label in labels], dtype=int)
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, solver="lbfgs")
    lr.fit(x, y)
    category = None
    if categories is not None:
        known = [i for i, k in enumerate(categories) if k]
        category = fit_categories(x[known], [categories[i] or "" for i in known])
    return DenseHead(
        weights=np.asarray(lr.coef_[0], dtype=np.float32),
        intercept=float(lr.intercept_[0]),
        embedder=embedder,
        sparse_weight=SPARSE_WEIGHT if neighbours else 0.5,
        neighbours=x.astype(np.float16).astype(np.float32) if neighbours else None,
        neighbour_labels=y.astype(np.float32) if neighbours else None,
        max_words=max_words,
        category=category,
    )


# --- harm: the embedding model's upper layers, fine-tuned -------------------------------------

# Layers 3 to 5 of MiniLM's six are trained (the first three stay the shared model's), for
# TUNED_EPOCHS over the prompts (clipped like the embedding head's), then averaged with the
# TF-IDF head, which keeps a third (in log-odds since session 7: harm.mixed). Chosen by CV:
# harmful missed at 5 % over-refusal was 25.6 % with nothing fine-tuned (the frozen regression
# and vote), ~20 % with layers 4-5 tuned and ~16 % with layers 3-5 (trials with these folds;
# the report has the shipped numbers). Tuning
# all six layers (with the 2,084 prompts of session 6) changed nothing beyond noise once
# averaged with TF-IDF — development-source harmful missed at 5 % development over-refusal
# 24.9 % either way — for twice the training time and a 20 MB artefact.
TUNED_START = 3
TUNED_EPOCHS = 4
# The fine-tuned weights are the average of fine-tunings that differ only in their seed (the
# head's initialisation and the order of the batches). Session 15 found the seed alone moving
# the cross-validated gate (with the probe, at the policy's refuse_at) from 25 to 39 harmful
# development prompts let through, at the same 9 safe ones refused: one fine-tuning's score
# near the threshold is a draw. The averaged weights serve at one fine-tuning's cost and land
# near the seeds' mean, so a retraining moves the gate less by chance (how much less is not
# measured yet: that takes several sets of seeds).
TUNED_SEEDS: tuple[int, ...] = (SEED, 11, 22)
TUNED_SPARSE_WEIGHT = 1 / 3


@dataclass(frozen=True, slots=True)
class TunedData:
    """What fine-tuning needs, computed once: every prompt's token states after the frozen
    layers (the torch model's), its attention mask and its label."""

    model: Any  # the sentence-transformers BERT (torch)
    states: Any  # torch (n, seq, hidden)
    mask: Any  # torch (n, seq)
    unsafe: F32
    rows: Sequence[PromptRow]
    embedder: MiniLM  # the same model as served (ONNX Runtime)


def tuned_data(rows: Sequence[PromptRow], embedder: MiniLM) -> TunedData:
    import torch
    from sentence_transformers import SentenceTransformer

    folder = packaged_model_folder()
    assert folder is not None, "the packaged MiniLM is needed to fine-tune it"
    st = SentenceTransformer(str(folder), device="cpu")
    bert: Any = st[0].auto_model
    tokenizer: Any = st.tokenizer
    texts = [clipped(r.prompt, DENSE_MAX_WORDS) for r in rows]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    states = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            out = bert(
                **{k: v[i : i + 64] for k, v in enc.items()},
                output_hidden_states=True,
            )
            states.append(out.hidden_states[TUNED_START])
    unsafe = np.array([r.unsafe for r in rows], dtype=np.float32)
    return TunedData(bert, torch.cat(states), enc["attention_mask"], unsafe, rows, embedder)


def fit_tuned(
    data: TunedData, train_idx: Sequence[int]
) -> tuple[TunedHead, dict[str, np.ndarray[Any, Any]]]:
    """Fine-tunes the upper layers and a logistic head on `train_idx` once per seed of
    TUNED_SEEDS and averages the weights (a "soup": one model, so serving costs what one
    fine-tuning does), then fits the category regression on the tuned vectors of those rows.
    Returns the head as shipped (its layers read back from float16, so CV measures what
    serving runs) and the arrays that ship it."""
    runs = [_fine_tuned(data, train_idx, seed) for seed in TUNED_SEEDS]
    weights = {
        _layer_name(key): np.mean([run[0][key] for run in runs], axis=0).astype(np.float16)
        for key in runs[0][0]
    }
    shipped = TunedHead(
        start=TUNED_START,
        layers=(),
        weights=np.mean([run[1] for run in runs], axis=0).astype(np.float32),
        bias=float(np.mean([run[2] for run in runs])),
        embedder=data.embedder.name,
        sparse_weight=TUNED_SPARSE_WEIGHT,
    )
    tuned = TunedHead.from_arrays(shipped.arrays(weights))
    chosen = [data.rows[i] for i in train_idx]
    vectors = tuned.vectors([r.prompt for r in chosen], data.embedder)
    tuned = replace(tuned, category=categories_of(chosen, vectors))
    arrays = tuned.arrays(weights)
    return tuned, arrays


def _layer_name(key: str) -> str:
    """A tuned stack's state-dict key ("0.attention...") as the full model names it."""
    index, rest = key.split(".", 1)
    return f"encoder.layer.{TUNED_START + int(index)}.{rest}"


def _fine_tuned(
    data: TunedData, train_idx: Sequence[int], seed: int
) -> tuple[dict[str, np.ndarray[Any, Any]], np.ndarray[Any, Any], float]:
    """One fine-tuning: the upper layers' weights (keys "i.name", i counted from
    TUNED_START), the head's weights and its bias."""
    import torch

    torch.manual_seed(seed)
    layers = torch.nn.ModuleList(
        [copy.deepcopy(layer) for layer in data.model.encoder.layer[TUNED_START:]]
    )
    head = torch.nn.Linear(data.states.shape[-1], 1)
    params = [
        {"params": layers.parameters(), "lr": 3e-5},
        {"params": head.parameters(), "lr": 3e-3},
    ]
    optimiser = torch.optim.AdamW(params, weight_decay=0.01)
    y = torch.tensor(data.unsafe)
    share = float(y[list(train_idx)].mean())
    loss_f = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - share) / share))
    order = torch.Generator().manual_seed(seed)
    index = torch.tensor(list(train_idx))
    for _ in range(TUNED_EPOCHS):
        shuffled: Any = index[torch.randperm(len(index), generator=order)]
        for batch in shuffled.split(32):
            logits = _tuned_forward(layers, head, data.states[batch], data.mask[batch])
            loss = loss_f(logits, y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    state = {name: value.detach().numpy().copy() for name, value in layers.state_dict().items()}
    return state, head.weight.detach().numpy()[0].copy(), float(head.bias.detach()[0])


def _tuned_forward(layers: Any, head: Any, states: Any, mask: Any) -> Any:
    import torch

    extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer in layers:
        out = layer(states, attention_mask=extended)
        states = out[0] if isinstance(out, tuple) else out
    weights = mask[:, :, None].float()
    pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return head(torch.nn.functional.normalize(pooled, dim=-1)).squeeze(-1)


def tuned_cv(
    rows: Sequence[PromptRow], data: TunedData, cache: Path | None = None
) -> tuple[list[float], F32]:
    """Out-of-fold probabilities of the tuned head (numpy inference, as served), and the
    out-of-fold tuned vectors (each prompt embedded by the fold model that never saw it)."""
    out = [0.0] * len(rows)
    vectors = np.zeros((len(rows), data.embedder.dim), dtype=np.float32)
    for fold, (tr, te) in enumerate(folds(rows)):
        head = fold_tuned(rows, data, fold, tr, cache)
        vectors[te] = head.vectors([rows[i].prompt for i in te], data.embedder)
        for i, p in zip(te, head.read(vectors[te]), strict=True):
            out[i] = p
    return out, vectors


def fold_tuned(
    rows: Sequence[PromptRow],
    data: TunedData,
    fold: int,
    train_idx: Sequence[int],
    cache: Path | None,
) -> TunedHead:
    """One fold's fine-tuned head; with `cache` (a folder), kept there under a key of the
    rows and the trainer's settings. Each fold costs ~4.5 min on two cores (three seeds), and
    the out-of-fold scores (train_probe) and `salon eval refusal --gate cv` need the same five."""
    path = None if cache is None else cache / f"tuned_fold{fold}.npz"
    key = _oof_key(rows)
    if path is not None and path.exists():
        with np.load(path) as saved:
            if "key" in saved.files and str(saved["key"]) == key:
                return TunedHead.from_arrays({k: saved[k] for k in saved.files if k != "key"})
    head, arrays = fit_tuned(data, train_idx)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial.npz")
        np.savez(partial, key=np.array(key), **arrays)  # type: ignore[arg-type]
        partial.replace(path)
    return head


def folds(rows: Sequence[PromptRow]) -> list[tuple[list[int], list[int]]]:
    """The CV folds every report uses: stratified by label, grouped by contrast pair."""
    cv = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=SEED)
    labels = [r.label for r in rows]
    split = cv.split(np.zeros(len(rows)), labels, [r.group for r in rows])
    return [(list(tr), list(te)) for tr, te in split]


def dense_cv(
    rows: Sequence[PromptRow],
    x: F32,
    embedder: str,
    c: float = DENSE_C,
    *,
    neighbours: bool = True,
) -> list[float]:
    out = [0.0] * len(rows)
    for tr, te in folds(rows):
        labels = [rows[i].label for i in tr]
        head = fit_dense(x[tr], labels, embedder, c, neighbours=neighbours)
        for i, p in zip(te, head.probabilities(x[te]), strict=True):
            out[i] = p
    return out


def averaged(sparse: Sequence[float], dense: Sequence[float]) -> list[float]:
    return [SPARSE_WEIGHT * s + (1 - SPARSE_WEIGHT) * d for s, d in zip(sparse, dense, strict=True)]


@dataclass(frozen=True, slots=True)
class CrossValidatedClassifier:
    """For evaluating on the training prompts honestly: each known prompt is assessed by the
    fold classifier that never saw it (nor its contrast twin); any other text by the full one."""

    by_prompt: dict[str, EmbeddedHarmClassifier]
    full: EmbeddedHarmClassifier
    name: str = "embedded-cv"

    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment:
        return self.by_prompt.get(turn.strip(), self.full).assess(turn, context)


def cross_validated_classifier(
    full: EmbeddedHarmClassifier,
    rows: Sequence[PromptRow] | None = None,
    cache: Path | None = None,
) -> CrossValidatedClassifier:
    """Trains the FOLDS fold classifiers (with the full one's embedder, if any): ~1 min,
    ~20 min on 2 cores when the full one has a tuned head (each fold fine-tunes its own),
    unless `cache` (a folder) holds those fine-tunings for the same rows and settings."""
    rows = list(rows or training_prompts())
    emb = full.embedder
    clip = full.dense.max_words if full.dense is not None else None
    x = embed_prompts(rows, emb, clip) if emb is not None and full.dense is not None else None
    by_prompt: dict[str, EmbeddedHarmClassifier] = {}
    data = None
    if full.tuned is not None and isinstance(emb, MiniLM):
        data = tuned_data(rows, emb)
    for k, (tr, te) in enumerate(folds(rows)):
        heads = train_harm([rows[i] for i in tr])
        dense = None
        if x is not None and full.dense is not None:
            labels = [rows[i].label for i in tr]
            vote = full.dense.neighbours is not None
            dense = fit_dense(
                x[tr],
                labels,
                full.dense.embedder,
                neighbours=vote,
                max_words=clip,
                categories=[rows[i].harm_category for i in tr],
            )
        tuned = fold_tuned(rows, data, k, tr, cache) if data is not None else None
        topic = None
        if tuned is not None and full.topic is not None and isinstance(emb, MiniLM):
            unseen = {rows[i].prompt for i in te}
            topic = fit_topic(tuned, emb, [r for r in rows if r.prompt not in unseen])
        fold = EmbeddedHarmClassifier(
            harm=heads["harm"],
            category=heads["category"],
            dense=dense,
            embedder=emb if dense is not None or data is not None else None,
            name="embedded-cv",
            tuned=tuned,
            topic=topic,
        )
        for i in te:
            by_prompt[rows[i].prompt.strip()] = fold
    return CrossValidatedClassifier(by_prompt, full)


# --- the topic head ----------------------------------------------------------------------------

# sexual or romantic content with a minor, in 150 contrast pairs written for the topic head
# alone (fiction, poems, roleplay, "is it okay if they love each other"; against adult romance,
# wholesome adult-child stories, safeguarding questions, children's own lives, literary and
# legal analysis). Not in the harm classifier's training set: training it on such pairs moved
# the gate's operating point by less than a fine-tuning's seed does (session 17).
TOPIC_FILE = DATA / "minors.csv"
TOPIC_CATEGORY = "child_safety"
# training prompts of these categories may be on the topic, so they teach neither side
TOPIC_UNCERTAIN = frozenset({"child_safety", "sexual", "sexual_minors"})
TOPIC_C = 10.0
# Chosen for precision on the topic's own contrast twins: cross-validated over minors.csv's
# pairs, 20 of the 150 benign twins (adult romance, teen-only romance) reach 0.9 against 115
# of the 150 harmful rows, and none of the other training prompts (training_report.md); a miss
# costs no more than the category heads' call.
TOPIC_AT = 0.9
TOPIC_HEADING = "## Topic head: sexual or romantic content with a minor"


def topic_data(rows: Sequence[PromptRow]) -> tuple[list[str], list[bool], list[str]]:
    """The topic head's texts, labels (on the topic) and CV groups: minors.csv's pairs, and
    the training prompts of other categories as texts off the topic."""
    own = read_prompts(TOPIC_FILE)
    uncertain = TOPIC_UNCERTAIN
    others = [r for r in rows if r.category not in uncertain and r.harm_category not in uncertain]
    texts = [r.prompt for r in [*own, *others]]
    labels = [r.unsafe for r in own] + [False] * len(others)
    return texts, labels, [r.group for r in [*own, *others]]


def fit_topic(
    tuned: TunedHead, embedder: MiniLM, rows: Sequence[PromptRow], tuned_sha256: str = ""
) -> TopicHead:
    texts, labels, _ = topic_data(rows)
    return _topic_head(tuned.vectors(texts, embedder), labels, tuned_sha256)


def _topic_head(x: F32, labels: Sequence[bool], tuned_sha256: str = "") -> TopicHead:
    model = LogisticRegression(C=TOPIC_C, max_iter=5000, class_weight="balanced")
    model.fit(x, labels)
    weights = np.round(model.coef_[0], 6).astype(np.float32)
    bias = float(f"{model.intercept_[0]:.6g}")
    return TopicHead(TOPIC_CATEGORY, weights, bias, TOPIC_AT, tuned_sha256)


def topic_report(x: F32, labels: Sequence[bool], groups: Sequence[str]) -> str:
    """Cross-validated over the topic's data (`topic_data`, embedded as `x`; grouped by
    contrast pair): how often the head names the topic for its harmful rows, their benign
    twins, and the other training prompts."""
    y = np.array(labels)
    p = np.zeros(len(y))
    cv = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=SEED)
    for tr, te in cv.split(x, y, groups):
        head = _topic_head(x[tr], list(y[tr]))
        p[te] = [head.probability(v) for v in x[te]]
    own = len(read_prompts(TOPIC_FILE))
    twins = np.zeros(len(y), dtype=bool)
    twins[:own] = ~y[:own]
    lines = ["| rows | count | named at 0.5 | named at the head's 0.9 |", "|---|---|---|---|"]
    for name, mask in (
        ("minors.csv, harmful", y),
        ("minors.csv, benign twins", twins),
        ("other training prompts", np.arange(len(y)) >= own),
    ):
        hits = [int((p[mask] >= at).sum()) for at in (0.5, TOPIC_AT)]
        lines.append(f"| {name} | {int(mask.sum())} | {hits[0]} | {hits[1]} |")
    return f"{TOPIC_HEADING}\n\n{FOLDS}-fold CV grouped by contrast pair.\n\n" + "\n".join(lines)


def topic_only(
    check: bool, artefact: Path = TOPIC_ARTEFACT, report_path: Path = DATA / "training_report.md"
) -> int:
    """Fit the topic head on the shipped tuned head's vectors (seconds) and replace its
    section of the report."""
    texts, labels, groups = topic_data(training_prompts())
    x = TunedHead.load().vectors(texts, MiniLM.load())
    text = topic_report(x, labels, groups) + "\n"
    sys.stdout.write(text)
    if not check:
        head = _topic_head(x, labels, file_sha256(TUNED_ARTEFACT))
        artefact.write_text(json.dumps(head.to_json()) + "\n", encoding="utf-8")
        _replace_section(report_path, TOPIC_HEADING, text)
    return 0


def _replace_section(path: Path, heading: str, text: str) -> None:
    """`text` (starting with `heading`) in place of that section of the report, or appended."""
    report = path.read_text(encoding="utf-8")
    before, found, after = report.partition(heading)
    rest = after.split("\n## ", 1) if found else []
    tail = f"\n## {rest[1]}" if len(rest) == 2 else ""
    head = before if found else report.rstrip("\n") + "\n\n"
    path.write_text(head + text + tail, encoding="utf-8")


# --- refusal ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    refusal: bool
    group: str


def read_replies(names: Sequence[str] = REFUSAL_FILES) -> list[Reply]:
    replies = []
    for name in names:
        with (DATA / name).open(newline="", encoding="utf-8") as f:
            lines = (line for line in f if not line.startswith("#"))
            for i, r in enumerate(csv.DictReader(lines)):
                replies.append(
                    Reply(r["assistant_response"], r["human_score"] == "1", f"{name}:{i}")
                )
    return replies


def reply_views(replies: Sequence[Reply]) -> tuple[list[Counts], list[str], list[str], list[bool]]:
    """Each reply twice: whole, and its first EARLY_CHARS (what early detection sees)."""
    docs, labels, groups, early = [], [], [], []
    for rep in replies:
        for text, is_early in ((rep.text, False), (rep.text[:EARLY_CHARS], True)):
            docs.append(raw_counts(text, REFUSAL_CONFIG, extra=phrase_features(text)))
            labels.append("refusal" if rep.refusal else "answer")
            groups.append(rep.group)
            early.append(is_early)
    return docs, labels, groups, early


def f1(pred: Sequence[bool], gold: Sequence[bool]) -> tuple[float, float, float]:
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(g and not p for p, g in zip(pred, gold, strict=True))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return (2 * prec * rec / (prec + rec) if prec + rec else 0.0), prec, rec


def refusal_report(replies: Sequence[Reply]) -> str:
    docs, labels, groups, early = reply_views(replies)

    def train(d: list[Counts], y: list[str]) -> LinearTextModel:
        return fit(d, y, ("answer", "refusal"), REFUSAL_CONFIG, REFUSAL_C)

    probs = out_of_fold(docs, labels, groups, lambda m, d: m.probabilities(d)["refusal"], train)
    gold = [y == "refusal" for y in labels]
    lines = ["| replies | view | n | F1 | precision | recall |", "|---|---|---|---|---|---|"]
    # All replies, then the embedded model's own (what salon's recovery and eval read most):
    # PyRIT's labels count off-topic answers as refusals, which no reading of a reply's words
    # can learn, and they dominate the first row.
    for replies_name, prefix in (("all", ""), ("salon's embedded Qwen", "model_responses")):
        for name, want in (("whole reply", False), (f"first {EARLY_CHARS} chars", True)):
            idx = [i for i, e in enumerate(early) if e == want and groups[i].startswith(prefix)]
            score = f1([probs[i] >= 0.5 for i in idx], [gold[i] for i in idx])
            base = f1(
                [any(t.startswith("p:xstest") for t in docs[i]) for i in idx],
                [gold[i] for i in idx],
            )
            for label, (f, p, r) in ((name, score), (f"{name}, XSTest phrase match alone", base)):
                lines.append(
                    f"| {replies_name} | {label} | {len(idx)} | {f:.3f} | {p:.3f} | {r:.3f} |"
                )
    return "\n".join(lines)


def train_refusal(replies: Sequence[Reply]) -> dict[str, LinearTextModel]:
    docs, labels, _, _ = reply_views(replies)
    return {"refusal": fit(docs, labels, ("answer", "refusal"), REFUSAL_CONFIG, REFUSAL_C)}


# --- entry point ------------------------------------------------------------------------------


def compare(rows: Sequence[PromptRow]) -> str:
    variants = {
        "word 1-2 + char 3-5": HARM_CONFIG,
        "word 1-2 only": FeatureConfig(word_ngrams=2, char_min=0, char_max=0),
        "char 3-5 only": FeatureConfig(word_ngrams=0, char_min=3, char_max=5),
    }
    lines = ["| features | C | over-refusal @0.5 | harmful compliance @0.5 |", "|---|---|---|---|"]
    for name, config in variants.items():
        for c in (2.0, 8.0, 32.0):
            probs = harm_cv(rows, config, c)
            fp = wilson(
                sum(p >= 0.5 for r, p in zip(rows, probs, strict=True) if not r.unsafe),
                sum(not r.unsafe for r in rows),
            )
            fn = wilson(
                sum(p < 0.5 for r, p in zip(rows, probs, strict=True) if r.unsafe),
                sum(r.unsafe for r in rows),
            )
            lines.append(f"| {name} | {c:g} | {fp} | {fn} |")
    return "\n".join(lines)


def operating_points(rows: Sequence[PromptRow], heads: dict[str, Sequence[float]]) -> str:
    """Each variant at fixed over-refusal levels: which share of harmful prompts it misses."""
    safe_n = sum(not r.unsafe for r in rows)
    lines = [
        "| classifier | harmful missed at 3 % over-refusal | at 5 % | at 10 % |",
        "|---|---|---|---|",
    ]
    for name, probs in heads.items():
        safe = sorted((p for r, p in zip(rows, probs, strict=True) if not r.unsafe), reverse=True)
        unsafe = [p for r, p in zip(rows, probs, strict=True) if r.unsafe]
        cells = []
        for share in (0.03, 0.05, 0.10):
            t = safe[int(share * safe_n)]
            cells.append(f"{wilson(sum(p <= t for p in unsafe), len(unsafe))} (t={t:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _development_only(
    rows: Sequence[PromptRow], heads: dict[str, Sequence[float]]
) -> tuple[list[PromptRow], dict[str, Sequence[float]]]:
    keep = [i for i, r in enumerate(rows) if not r.source.startswith("salon_")]
    chosen: dict[str, Sequence[float]] = {name: [p[i] for i in keep] for name, p in heads.items()}
    return [rows[i] for i in keep], chosen


def calibration(rows: Sequence[PromptRow], probs: Sequence[float]) -> str:
    lines = ["| score band | prompts | harmful (95 % Wilson) |", "|---|---|---|"]
    edges = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.01)
    for lo, hi in pairwise(edges):
        band = [r for r, p in zip(rows, probs, strict=True) if lo <= p < hi]
        rate = wilson(sum(r.unsafe for r in band), len(band))
        lines.append(f"| [{lo:.2f}, {min(hi, 1.0):.2f}) | {len(band)} | {rate} |")
    return "\n".join(lines)


def report(
    rows: Sequence[PromptRow],
    replies: Sequence[Reply],
    with_compare: bool,
    x: F32 | None,
    embedder: str,
    tuned: Sequence[float] | None = None,
    tuned_x: F32 | None = None,
) -> str:
    sparse = harm_cv(rows, HARM_CONFIG, HARM_C)
    heads: dict[str, Sequence[float]] = {"TF-IDF head alone": sparse}
    probs: Sequence[float] = sparse
    if x is not None:
        dense = dense_cv(rows, x, embedder)
        regression = dense_cv(rows, x, embedder, neighbours=False)
        probs = averaged(sparse, dense)
        heads |= {
            f"{embedder} regression alone": regression,
            "TF-IDF + regression, averaged": [
                (s_ + r_) / 2 for s_, r_ in zip(sparse, regression, strict=True)
            ],
            f"{embedder} regression + neighbour vote": dense,
            "TF-IDF, regression and vote, a third each (the previous shipped classifier)": probs,
        }
    if tuned is not None:
        probs = mixed(sparse, tuned, TUNED_SPARSE_WEIGHT)
        heads |= {
            f"{embedder}, layers {TUNED_START}+ fine-tuned, alone": tuned,
            "shipped: TF-IDF a third, fine-tuned two thirds (log-odds)": probs,
        }
    categories = category_cv(rows, tuned_x if tuned_x is not None else x)
    parts = [
        f"## Harm classifier ({FOLDS}-fold stratified CV grouped by contrast pair, seed {SEED})",
        "The shipped classifier"
        + (
            f" (TF-IDF head a third, {embedder} with layers {TUNED_START}+ fine-tuned two thirds,"
            f" averaged in log-odds; the fine-tuned weights are the average of {len(TUNED_SEEDS)}"
            f" fine-tunings, seeds {', '.join(map(str, TUNED_SEEDS))})"
            if tuned is not None
            else ""
        ),
        *(harm_table(rows, probs, t) for t in (0.5, Policy.load().default.refuse_at)),
        "Operating points (harmful prompts scored at or under the threshold that refuses the "
        "given share of safe prompts):",
        operating_points(rows, heads),
        "The same, on the development split's prompts only: the kinds the pipeline targets are "
        "measured on (salon's own written and everyday prompts are easier, so the table above "
        "flatters):",
        operating_points(*_development_only(rows, heads)),
        "Calibration (what recovery relies on: how many of the prompts scored in a band are "
        "harmful):",
        calibration(rows, probs),
        category_lines(categories),
        REFUSAL_HEADING,
        refusal_report(replies),
    ]
    if with_compare:
        parts += ["## Feature sets compared (CV)", compare(rows)]
        if x is not None:
            parts += ["## Embedding head, C compared (CV)", compare_dense(rows, x, embedder)]
    return "\n\n".join(parts) + "\n"


def compare_dense(rows: Sequence[PromptRow], x: F32, embedder: str) -> str:
    return operating_points(
        rows,
        {
            f"{embedder} regression, C={c:g}": dense_cv(rows, x, embedder, c, neighbours=False)
            for c in (0.5, 2.0, 8.0)
        },
    )


def gate_oof(rows: Sequence[PromptRow], cache: Path | None = None) -> list[float]:
    """The shipped classifier's out-of-fold scores (TF-IDF and fine-tuned heads, each fold's
    trained without it). With `cache`, kept there under a key of the rows and the trainer's
    settings: the five folds' fine-tunings cost ~23 min, and train_probe needs the same scores."""
    key = _oof_key(rows)
    if cache is not None and cache.exists():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                return [float(v) for v in saved["scores"]]
    sparse = harm_cv(rows, HARM_CONFIG, HARM_C)
    folder = None if cache is None else cache.parent / FOLD_CACHE
    tuned, _ = tuned_cv(rows, tuned_data(rows, MiniLM.load()), folder)
    scores = mixed(sparse, tuned, TUNED_SPARSE_WEIGHT)
    if cache is not None:
        save_oof(cache, rows, scores)
    return scores


def save_oof(cache: Path, rows: Sequence[PromptRow], scores: Sequence[float]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=np.array(_oof_key(rows)), scores=np.asarray(scores, dtype=np.float64))


def _oof_key(rows: Sequence[PromptRow]) -> str:
    settings = [SEED, FOLDS, HARM_C, repr(HARM_CONFIG), TUNED_START, TUNED_EPOCHS]
    settings += [list(TUNED_SEEDS), TUNED_SPARSE_WEIGHT]
    data = [[r.uid, r.prompt, r.label, r.harm_category] for r in rows]
    return hashlib.sha256(json.dumps([settings, data]).encode()).hexdigest()


def refusal_only(
    replies: Sequence[Reply],
    check: bool,
    artefact: Path = REFUSAL_ARTEFACT,
    report_path: Path = DATA / "training_report.md",
) -> int:
    """Retrain the refusal detector alone: its data and its CV share nothing with the harm
    classifier, whose fine-tuning takes minutes. The report's refusal section is replaced."""
    text = f"{REFUSAL_HEADING}\n\n{refusal_report(replies)}\n"
    sys.stdout.write(text)
    if not check:
        meta = {"seed": SEED, "trainer": "salon.safety.train --refusal"}
        save_models(artefact, train_refusal(replies), meta | {"rows": len(replies), "C": REFUSAL_C})
        _replace_section(report_path, REFUSAL_HEADING, text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m salon.safety.train", description=__doc__)
    parser.add_argument("--check", action="store_true", help="report only; keep the artefacts")
    parser.add_argument("--compare", action="store_true", help="also compare feature sets")
    parser.add_argument("--oof", type=Path, help="keep the out-of-fold scores here (train_probe)")
    parser.add_argument(
        "--refusal", action="store_true", help="the refusal detector only (seconds, not minutes)"
    )
    parser.add_argument(
        "--topic", action="store_true", help="the topic head only, on the shipped tuned head"
    )
    args = parser.parse_args(argv)
    replies = read_replies()
    if args.refusal:
        return refusal_only(replies, args.check)
    if args.topic:
        return topic_only(args.check)
    rows = training_prompts()
    embedder = MiniLM.load()
    x = embed_prompts(rows, embedder)
    data = tuned_data(rows, embedder)
    folder = None if args.oof is None else args.oof.parent / FOLD_CACHE
    tuned, tuned_x = tuned_cv(rows, data, folder)
    if args.oof is not None:
        save_oof(
            args.oof, rows, mixed(harm_cv(rows, HARM_CONFIG, HARM_C), tuned, TUNED_SPARSE_WEIGHT)
        )
    text = report(rows, replies, args.compare, x, embedder.name, tuned, tuned_x)
    sys.stdout.write(text)
    if not args.check:
        meta: dict[str, Any] = {"seed": SEED, "rows": len(rows), "trainer": "salon.safety.train"}
        save_models(HARM_ARTEFACT, train_harm(rows), meta | {"C": HARM_C})
        head = fit_dense(
            x, [r.label for r in rows], embedder.name, categories=[r.harm_category for r in rows]
        )
        DENSE_ARTEFACT.write_text(json.dumps(head.to_json()) + "\n", encoding="utf-8")
        np.save(NEIGHBOURS_ARTEFACT, x.astype(np.float16))
        _, arrays = fit_tuned(data, range(len(rows)))
        np.savez_compressed(TUNED_ARTEFACT, **arrays)  # type: ignore[arg-type]
        save_models(
            REFUSAL_ARTEFACT, train_refusal(replies), meta | {"rows": len(replies), "C": REFUSAL_C}
        )
        (DATA / "training_report.md").write_text(text, encoding="utf-8")
        topic_only(check=False)  # it reads the vectors of the tuned head just written
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
