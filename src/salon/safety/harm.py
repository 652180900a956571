"""Request assessment: how likely is a user turn to ask for real harm, and of what kind.

The embedded classifier averages two heads trained by ``python -m salon.safety.train``: a
logistic regression over TF-IDF features (word 1-2-grams + in-word char 3-5-grams; ~1 ms,
standard library only), which knows the words of harm, a third; and all-MiniLM-L6-v2 with its
upper layers fine-tuned for the task (`TunedHead`), which knows what a request *means* and so
carries over to phrasings the training set lacks, two thirds. Cross-validated, together they
miss 24 % of harmful prompts at 3 % over-refusal and 16 % at 5 %, against 47 % and 40 % for
TF-IDF alone (training_report.md). The embedding costs ~10-25 ms a turn. The frozen
embedding's heads (`DenseHead`: a regression, a vote of the nearest training prompts, and a
category regression) serve the category, and the harm probability when no tuned head
matches the embedder. Without the embedding model installed the TF-IDF head works alone.
Guard models served by a backend can implement the same protocol.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from salon.backends.bert import BertLayer, bert_layers
from salon.backends.embeddings import Embedder, MiniLM, default_embedder
from salon.safety._linear import LinearTextModel, load_models, raw_counts
from salon.safety.datasets import DATA

HARM_ARTEFACT = DATA / "harm_model.json.gz"
DENSE_ARTEFACT = DATA / "harm_dense.json"
# the training prompts' embeddings (float16) for the neighbour vote
NEIGHBOURS_ARTEFACT = DATA / "harm_neighbours.npy"
# the embedding model's upper layers fine-tuned for harm, with their head (float16)
TUNED_ARTEFACT = DATA / "harm_tuned.npz"
# a binary head on the tuned vectors for the one category whose subject the category heads miss
TOPIC_ARTEFACT = DATA / "harm_topic.json"
CONTEXT_TURNS = 2  # earlier user turns a short follow-up is read with
_FOLLOW_UP_WORDS = 12
# No policy may refuse below 0.5 (see policy.MIN_REFUSE_AT), so below it the category is not
# needed; skipping the 13-class head there halves the cost of a typical benign turn.
CATEGORY_FROM = 0.5


@dataclass(frozen=True, slots=True)
class Assessment:
    harmful_probability: float
    # the most likely harm category (datasets.CATEGORIES) if the turn were harmful; it only
    # matters when harmful_probability is high, and is None below 0.5.
    category: str | None
    category_probability: float = 0.0
    used_context: bool = False
    classifier: str = "embedded"
    # the category a dedicated head (`TopicHead`) recognises as the turn's subject, whatever
    # its harmful probability; it names the category, over the category heads' choice, once
    # the turn is scored harmful enough to need one (probe.py too)
    topic: str | None = None
    topic_probability: float = 0.0


class HarmClassifier(Protocol):
    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment: ...


F32 = npt.NDArray[np.float32]
# The neighbour vote: the k most similar training prompts, weighted by exp(cosine / T).
NEIGHBOURS_K = 10
NEIGHBOURS_T = 0.1
# The embedding head reads a long prompt's first and last words only: MiniLM's cost grows with
# the tokens (compute-bound, ~0.5 ms a token on one core), and a request's intent sits in its
# opening and its closing ask. The TF-IDF head still reads the whole text.
DENSE_MAX_WORDS = 32


def clipped(text: str, max_words: int | None) -> str:
    """`text`, or its first and last max_words/2 words when it is longer."""
    if max_words is None:
        return text
    words = text.split()
    if len(words) <= max_words:
        return text
    half = max_words // 2
    return " ".join([*words[:half], *words[-(max_words - half) :]])


@dataclass(frozen=True, slots=True)
class CategoryHead:
    """A multinomial regression for the harm category over a sentence vector, averaged with
    the TF-IDF category head."""

    classes: tuple[str, ...]
    weights: F32  # (k, dim)
    intercepts: F32  # (k,)

    def probabilities(self, vector: F32) -> dict[str, float]:
        z = self.weights @ vector + self.intercepts
        e = np.exp(z - z.max())
        p = e / e.sum()
        return {c: float(v) for c, v in zip(self.classes, p, strict=True)}

    def to_json(self) -> dict[str, object]:
        return {
            "classes": list(self.classes),
            "intercepts": [float(f"{v:.6g}") for v in self.intercepts],
            "weights": [[float(f"{v:.6g}") for v in row] for row in self.weights],
        }

    @classmethod
    def from_json(cls, data: object) -> CategoryHead | None:
        if not isinstance(data, dict):
            return None
        return cls(
            classes=tuple(str(c) for c in data["classes"]),
            weights=np.asarray(data["weights"], dtype=np.float32),
            intercepts=np.asarray(data["intercepts"], dtype=np.float32),
        )


@dataclass(frozen=True, slots=True)
class DenseHead:
    """What reads the sentence embedding: a logistic regression, and optionally a vote of the
    most similar training prompts (their vectors and labels), averaged. Named by the embedder
    it was trained on (vectors from another embedder would be meaningless to it)."""

    weights: F32
    intercept: float
    embedder: str
    # the share of the TF-IDF head in the classifier's averaged probability
    sparse_weight: float = 0.5
    neighbours: F32 | None = None  # (n, dim), unit rows
    neighbour_labels: F32 | None = None  # (n,), 1.0 = harmful
    k: int = NEIGHBOURS_K
    temperature: float = NEIGHBOURS_T
    # what it was trained to read (`clipped`); None in artefacts from before the cap
    max_words: int | None = None
    # the category regression on the same vectors; None in older artefacts
    category: CategoryHead | None = None

    def probabilities(self, vectors: F32) -> list[float]:
        z = np.clip(vectors @ self.weights + self.intercept, -60.0, 60.0)
        p = 1.0 / (1.0 + np.exp(-z))
        if self.neighbours is not None and self.neighbour_labels is not None:
            p = (p + self.vote(vectors)) / 2.0
        return [float(v) for v in p]

    def vote(self, vectors: F32) -> F32:
        """The similarity-weighted share of harmful prompts among the k nearest."""
        assert self.neighbours is not None and self.neighbour_labels is not None
        sims = vectors @ self.neighbours.T  # (b, n) cosines: both sides are unit vectors
        k = min(self.k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(sims, top, axis=1)
        w = np.exp((near - near.max(axis=1, keepdims=True)) / self.temperature)
        votes: F32 = (w * self.neighbour_labels[top]).sum(axis=1) / w.sum(axis=1)
        return votes

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "embedder": self.embedder,
            "sparse_weight": float(f"{self.sparse_weight:.6g}"),
            "intercept": float(f"{self.intercept:.6g}"),
            "weights": [float(f"{w:.6g}") for w in self.weights],
        }
        if self.max_words is not None:
            data["max_words"] = self.max_words
        if self.category is not None:
            data["category"] = self.category.to_json()
        if self.neighbour_labels is not None:
            data |= {
                "k": self.k,
                "temperature": self.temperature,
                "neighbour_labels": [int(v) for v in self.neighbour_labels],
            }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object], neighbours: F32 | None = None) -> DenseHead:
        weights = data["weights"]
        assert isinstance(weights, list)
        labels = data.get("neighbour_labels")
        use = neighbours is not None and isinstance(labels, list) and len(labels) == len(neighbours)
        return cls(
            weights=np.asarray(weights, dtype=np.float32),
            intercept=float(str(data["intercept"])),
            embedder=str(data["embedder"]),
            sparse_weight=float(str(data.get("sparse_weight", 0.5))),
            neighbours=neighbours if use else None,
            neighbour_labels=np.asarray(labels, dtype=np.float32) if use else None,
            k=int(str(data.get("k", NEIGHBOURS_K))),
            temperature=float(str(data.get("temperature", NEIGHBOURS_T))),
            max_words=int(str(data["max_words"])) if "max_words" in data else None,
            category=CategoryHead.from_json(data.get("category")),
        )


@dataclass(frozen=True, slots=True)
class TunedHead:
    """The embedding model with its upper layers fine-tuned to tell harmful requests from
    benign ones (`python -m salon.safety.train`): the model's own first `start` layers, these
    layers instead of the rest, mean pooling, then a logistic head. Costs what one embedding
    costs; it replaces the frozen embedding's regression and vote in the harm probability."""

    start: int
    layers: tuple[BertLayer, ...]
    weights: F32
    bias: float
    embedder: str
    sparse_weight: float  # the TF-IDF head's share in the averaged log-odds (`mixed`)
    max_words: int | None = DENSE_MAX_WORDS
    # the category regression on these same vectors (so a turn costs one embedding)
    category: CategoryHead | None = None

    def vectors(self, texts: Sequence[str], model: MiniLM) -> F32:
        return model.embed_through(
            [clipped(t, self.max_words) for t in texts], self.start, self.layers
        )

    def probabilities(self, texts: Sequence[str], model: MiniLM) -> list[float]:
        return self.read(self.vectors(texts, model))

    def read(self, vectors: F32) -> list[float]:
        z = np.clip(vectors @ self.weights + self.bias, -60.0, 60.0)
        return [float(v) for v in 1.0 / (1.0 + np.exp(-z))]

    def arrays(self, weights: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """What `save` writes: the layers' weights as given (torch names), and the rest."""
        category = {}
        if self.category is not None:
            category = {
                "category.classes": np.array(self.category.classes),
                "category.weights": self.category.weights.astype(np.float32),
                "category.intercepts": self.category.intercepts.astype(np.float32),
            }
        return {
            **weights,
            **category,
            "head.weight": self.weights.astype(np.float32),
            "head.bias": np.array([self.bias], dtype=np.float32),
            "start": np.array(self.start),
            "sparse_weight": np.array(self.sparse_weight),
            "max_words": np.array(-1 if self.max_words is None else self.max_words),
            "embedder": np.array(self.embedder),
        }

    @classmethod
    def from_arrays(cls, data: Mapping[str, npt.NDArray[Any]]) -> TunedHead:
        start = int(data["start"])
        names = {k.split(".")[2] for k in data if k.startswith("encoder.layer.")}
        weights = {
            k: np.asarray(v, dtype=np.float32) for k, v in data.items() if k.startswith("encoder.")
        }
        max_words = int(data["max_words"])
        return cls(
            start=start,
            layers=bert_layers(weights, sorted(int(n) for n in names)),
            weights=np.asarray(data["head.weight"], dtype=np.float32),
            bias=float(data["head.bias"][0]),
            embedder=str(data["embedder"]),
            sparse_weight=float(data["sparse_weight"]),
            max_words=None if max_words < 0 else max_words,
            category=(
                CategoryHead(
                    classes=tuple(str(c) for c in data["category.classes"]),
                    weights=np.asarray(data["category.weights"], dtype=np.float32),
                    intercepts=np.asarray(data["category.intercepts"], dtype=np.float32),
                )
                if "category.classes" in data
                else None
            ),
        )

    @classmethod
    def load(cls, path: Path = TUNED_ARTEFACT) -> TunedHead:
        with np.load(path) as data:
            return cls.from_arrays({k: data[k] for k in data.files})


@dataclass(frozen=True, slots=True)
class TopicHead:
    """Whether a turn is about one category's subject, read from the tuned vector (no second
    embedding): sexual or romantic content with a minor. The 13-class heads name such turns
    by their surface, and fiction that sexualises a child reads like fiction: of the held-out
    set's 38 child-safety prompts, those the gate scored harmful but let through were called
    hate, violence or sexual content, whose threshold (0.88) is not child safety's (0.6).
    It never raises a score: it only says which category's rule applies. Trained by
    `python -m salon.safety.train --topic` on `minors.csv` (150 contrast pairs) against the
    training prompts of other categories; it belongs to the tuned head whose vectors it read
    (`tuned_sha256`)."""

    category: str
    weights: F32
    bias: float
    at: float  # the probability from which the turn is taken to be about `category`
    tuned_sha256: str = ""

    def probability(self, vector: F32) -> float:
        z = float(np.clip(vector @ self.weights + self.bias, -60.0, 60.0))
        return 1.0 / (1.0 + float(np.exp(-z)))

    def to_json(self) -> dict[str, object]:
        return {
            "category": self.category,
            "at": self.at,
            "tuned_sha256": self.tuned_sha256,
            "bias": float(f"{self.bias:.6g}"),
            "weights": [float(f"{w:.6g}") for w in self.weights],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TopicHead:
        return cls(
            category=str(data["category"]),
            weights=np.asarray(data["weights"], dtype=np.float32),
            bias=float(data["bias"]),
            at=float(data["at"]),
            tuned_sha256=str(data.get("tuned_sha256", "")),
        )

    @classmethod
    def load(cls, path: Path, tuned_path: Path) -> TopicHead | None:
        """The head, when it was trained on the vectors of the tuned head at `tuned_path`."""
        if not path.exists():
            return None
        head = cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        return head if head.tuned_sha256 == file_sha256(tuned_path) else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class EmbeddedHarmClassifier:
    harm: LinearTextModel
    category: LinearTextModel
    dense: DenseHead | None = None
    embedder: Embedder | None = None
    name: str = "embedded"
    tuned: TunedHead | None = None
    topic: TopicHead | None = None

    @classmethod
    def load(
        cls,
        path: Path = HARM_ARTEFACT,
        dense_path: Path = DENSE_ARTEFACT,
        embedder: Embedder | None = None,
        tuned_path: Path | None = TUNED_ARTEFACT,
        topic_path: Path = TOPIC_ARTEFACT,
    ) -> EmbeddedHarmClassifier:
        """The TF-IDF heads, plus the embedding heads when their embedder is given and is
        the one they were trained with (the tuned head: a MiniLM)."""
        models, _ = load_models(path)
        dense = None
        if embedder is not None and dense_path.exists():
            vectors_path = dense_path.with_name(NEIGHBOURS_ARTEFACT.name)
            vectors = np.load(vectors_path).astype(np.float32) if vectors_path.exists() else None
            data = json.loads(dense_path.read_text(encoding="utf-8"))
            head = DenseHead.from_json(data, vectors)
            dense = head if head.embedder == getattr(embedder, "name", "") else None
        tuned = None
        if isinstance(embedder, MiniLM) and tuned_path is not None and tuned_path.exists():
            tuned_head = TunedHead.load(tuned_path)
            tuned = tuned_head if tuned_head.embedder == embedder.name else None
        topic = None
        if tuned is not None and tuned_path is not None:
            topic = TopicHead.load(topic_path, tuned_path)
        return cls(
            harm=models["harm"],
            category=models["category"],
            dense=dense,
            embedder=embedder if dense is not None or tuned is not None else None,
            tuned=tuned,
            topic=topic,
        )

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        """Harmful probability of each text; the texts are embedded in one batch."""
        return self._scores(texts)[0]

    def _scores(self, texts: Sequence[str]) -> tuple[list[float], F32 | None]:
        """The probabilities, and the texts' embeddings (None without the dense head)."""
        sparse = [self.harm.probabilities(raw_counts(t, self.harm.config))["unsafe"] for t in texts]
        if self.tuned is not None and isinstance(self.embedder, MiniLM):
            vectors = self.tuned.vectors(texts, self.embedder)
            tuned = self.tuned.read(vectors)
            return mixed(sparse, tuned, self.tuned.sparse_weight), vectors
        if self.dense is None or self.embedder is None:
            return sparse, None
        read = [clipped(t, self.dense.max_words) for t in texts]
        vectors = self.embedder.embed(read)
        dense = self.dense.probabilities(vectors)
        w = self.dense.sparse_weight
        return [w * s + (1.0 - w) * d for s, d in zip(sparse, dense, strict=True)], vectors

    def probability(self, text: str) -> float:
        return self.probabilities([text])[0]

    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment:
        recent = [c for c in context[-CONTEXT_TURNS:] if c.strip()]
        # Only short follow-ups are read with their context ("ok, how much of it would be
        # enough?" after "I want to poison my husband"); a self-contained turn is judged alone,
        # so an earlier harmful turn (already assessed then) does not taint an unrelated one.
        joined = "\n".join([*recent, turn])
        with_context = bool(recent) and len(turn.split()) <= _FOLLOW_UP_WORDS
        probs, vectors = self._scores([turn, joined] if with_context else [turn])
        chosen, used = 0, False
        if with_context and probs[1] > probs[0]:
            chosen, used = 1, True
        p = probs[chosen]
        vector = None if vectors is None else vectors[chosen]
        topic, p_topic = None, 0.0
        if self.topic is not None and self.tuned is not None and vector is not None:
            p_topic = self.topic.probability(vector)
            topic = self.topic.category if p_topic >= self.topic.at else None
        if p < CATEGORY_FROM:
            return Assessment(p, None, 0.0, used, self.name, topic, p_topic)
        if topic is not None:
            return Assessment(p, topic, p_topic, used, self.name, topic, p_topic)
        category, p_cat = self._category(joined if used else turn, vector)
        return Assessment(p, category, p_cat, used, self.name, topic, p_topic)

    def _category(self, text: str, vector: F32 | None) -> tuple[str, float]:
        """The most likely category: the TF-IDF head's distribution, averaged with the
        embedding's when there is one (cross-validated accuracy 0.60 → 0.67, the report)."""
        probs = self.category.probabilities(raw_counts(text, self.category.config))
        head = self.tuned.category if self.tuned is not None else None
        if head is None and self.dense is not None:
            head = self.dense.category
        if head is not None and vector is not None:
            dense = head.probabilities(vector)
            probs = {c: (probs.get(c, 0.0) + dense.get(c, 0.0)) / 2 for c in probs.keys() | dense}
        best = max(probs, key=lambda c: probs[c])
        return best, probs[best]


def mixed(sparse: Sequence[float], tuned: Sequence[float], sparse_weight: float) -> list[float]:
    """The two heads' weighted average in log-odds, not in probability. The fine-tuned head is
    sure of itself (most scores under 0.02 or over 0.98), so a probability average lets its
    confident mistakes stand whatever the TF-IDF head says, and drags its confident right
    answers towards 0.5. Cross-validated, development split's prompts only, at the threshold
    that refuses 13 of its 175 safe prompts: 81 of 401 harmful prompts let through against 103
    (session 7's 3,317 training prompts); 89 against 88 on session 6's 2,677, where at 3 % of
    safe prompts refused it missed 35 % of the harmful ones against 52 %."""
    return [
        float(
            1.0 / (1.0 + np.exp(-(sparse_weight * _logit(s) + (1.0 - sparse_weight) * _logit(t))))
        )
        for s, t in zip(sparse, tuned, strict=True)
    ]


def _logit(p: float) -> float:
    # Clipped so a head's 0 or 1 (float rounding) cannot veto the other outright.
    q = min(max(p, 1e-4), 1.0 - 1e-4)
    return float(np.log(q / (1.0 - q)))


@cache
def default_classifier() -> EmbeddedHarmClassifier:
    """The shipped model, loaded once per process (~50 ms). It shares the process's embedding
    model with memory search; without the packaged MiniLM the TF-IDF head works alone."""
    loaded = EmbeddedHarmClassifier.load(embedder=default_embedder())
    # ~10^5 long-lived weight objects: without freezing, full GC passes over them add ~10 ms
    # to the p95 of a request. Freezing moves what exists now out of the collector's sight.
    gc.freeze()
    return loaded


@dataclass(frozen=True, slots=True)
class FakeHarmClassifier:
    """A scripted classifier for tests: a turn containing a key gets that (probability, category).

    Matching is case-insensitive on substrings; the first key found wins; otherwise benign.
    """

    script: Mapping[str, tuple[float, str]]
    default: float = 0.01

    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment:
        lowered = turn.lower()
        for key, (p, category) in self.script.items():
            if key.lower() in lowered:
                return Assessment(p, category, 1.0, False, "fake")
        return Assessment(self.default, None, 0.0, False, "fake")
