"""A dependency-free linear text model: hashed-free sparse TF-IDF features + logistic weights.

Why not pickle a scikit-learn pipeline: the runtime would then need scikit-learn, numpy and
scipy (~100 MB) and a pickle is tied to library versions. Training (``salon.safety.train``)
uses scikit-learn; serving only needs this module and the standard library, and scores a
prompt in well under a millisecond.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """What the featurizer extracts; stored in the artefact so training and serving agree."""

    word_ngrams: int = 2
    char_min: int = 3
    char_max: int = 5
    max_chars: int = 2000

    def as_dict(self) -> dict[str, int]:
        return {
            "word_ngrams": self.word_ngrams,
            "char_min": self.char_min,
            "char_max": self.char_max,
            "max_chars": self.max_chars,
        }


def normalise(text: str, max_chars: int) -> str:
    return _SPACE.sub(" ", text[:max_chars].lower()).strip()


def raw_counts(text: str, config: FeatureConfig, extra: Iterable[str] = ()) -> Counter[str]:
    """Raw term counts: word n-grams (``w:``), in-word char n-grams (``c:``) and extra tokens."""
    norm = normalise(text, config.max_chars)
    words = _WORD.findall(norm)
    counts: Counter[str] = Counter()
    for n in range(1, config.word_ngrams + 1):
        for i in range(len(words) - n + 1):
            counts["w:" + " ".join(words[i : i + n])] += 1
    if config.char_max > 0:
        for word in words:
            padded = f" {word} "
            for n in range(config.char_min, config.char_max + 1):
                for i in range(len(padded) - n + 1):
                    counts["c:" + padded[i : i + n]] += 1
    counts.update(extra)
    return counts


def tfidf(counts: Mapping[str, int], idf: Mapping[str, float]) -> dict[str, float]:
    """Sublinear TF times IDF, L2-normalised over the known vocabulary (as scikit-learn does)."""
    weights = {t: (1.0 + math.log(c)) * idf[t] for t, c in counts.items() if t in idf}
    norm = math.sqrt(sum(v * v for v in weights.values()))
    return {t: v / norm for t, v in weights.items()} if norm else weights


@dataclass(frozen=True, slots=True)
class LinearTextModel:
    """Logistic regression over TF-IDF features; binary (one row) or multinomial (K rows)."""

    config: FeatureConfig
    classes: tuple[str, ...]
    intercepts: tuple[float, ...]
    idf: dict[str, float]
    weights: dict[str, tuple[float, ...]]

    def scores(self, counts: Mapping[str, int]) -> tuple[float, ...]:
        x = tfidf(counts, self.idf)
        totals = list(self.intercepts)
        for term, value in x.items():
            for k, w in enumerate(self.weights[term]):
                totals[k] += w * value
        return tuple(totals)

    def probabilities(self, counts: Mapping[str, int]) -> dict[str, float]:
        z = self.scores(counts)
        if len(self.classes) == 2:
            p = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z[0]))))
            return {self.classes[0]: 1.0 - p, self.classes[1]: p}
        top = max(z)
        exps = [math.exp(v - top) for v in z]
        total = sum(exps)
        return {c: e / total for c, e in zip(self.classes, exps, strict=True)}

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.as_dict(),
            "classes": list(self.classes),
            "intercepts": [_round(v) for v in self.intercepts],
            # one row per term: [idf, w_1, ..., w_k]; sorted so the file is reproducible
            "terms": {
                t: [_round(self.idf[t]), *(_round(w) for w in self.weights[t])]
                for t in sorted(self.idf)
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LinearTextModel:
        terms: dict[str, list[float]] = data["terms"]
        return cls(
            config=FeatureConfig(**data["config"]),
            classes=tuple(data["classes"]),
            intercepts=tuple(float(v) for v in data["intercepts"]),
            idf={t: row[0] for t, row in terms.items()},
            weights={t: tuple(row[1:]) for t, row in terms.items()},
        )


def _round(value: float) -> float:
    # 6 significant digits: keeps the artefact small and identical across re-trainings
    return float(f"{value:.6g}")


def save_models(path: Path, models: Mapping[str, LinearTextModel], meta: Mapping[str, Any]) -> None:
    payload = {"meta": dict(meta), "models": {k: m.to_json() for k, m in models.items()}}
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    # mtime=0 so the gzip header does not change between otherwise identical trainings
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def load_models(path: Path) -> tuple[dict[str, LinearTextModel], dict[str, Any]]:
    payload = json.loads(gzip.decompress(path.read_bytes()))
    models = {k: LinearTextModel.from_json(v) for k, v in payload["models"].items()}
    return models, payload["meta"]
