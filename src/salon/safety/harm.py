"""Request assessment: how likely is a user turn to ask for real harm, and of what kind.

The embedded classifier is a TF-IDF (word 1-2-grams + in-word char 3-5-grams) logistic
regression trained by ``python -m salon.safety.train``; it scores a prompt in ~0.1-1 ms with the
standard library only. Guard models served by a backend can implement the same protocol.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

from salon.safety._linear import LinearTextModel, load_models, raw_counts
from salon.safety.datasets import DATA

HARM_ARTEFACT = DATA / "harm_model.json.gz"
_CONTEXT_TURNS = 2
_FOLLOW_UP_WORDS = 12
# No policy may refuse below 0.5 (see policy.MIN_REFUSE_AT), so below it the category is not
# needed; skipping the 13-class head there halves the cost of a typical benign turn.
_CATEGORY_FROM = 0.5


@dataclass(frozen=True, slots=True)
class Assessment:
    harmful_probability: float
    # the most likely harm category (datasets.CATEGORIES) if the turn were harmful; it only
    # matters when harmful_probability is high, and is None below 0.5.
    category: str | None
    category_probability: float = 0.0
    used_context: bool = False
    classifier: str = "embedded"


class HarmClassifier(Protocol):
    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment: ...


@dataclass(frozen=True, slots=True)
class EmbeddedHarmClassifier:
    harm: LinearTextModel
    category: LinearTextModel
    name: str = "embedded"

    @classmethod
    def load(cls, path: Path = HARM_ARTEFACT) -> EmbeddedHarmClassifier:
        models, _ = load_models(path)
        return cls(harm=models["harm"], category=models["category"])

    def probability(self, text: str) -> float:
        return self.harm.probabilities(raw_counts(text, self.harm.config))["unsafe"]

    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment:
        p_turn = self.probability(turn)
        text, p, used = turn, p_turn, False
        recent = [c for c in context[-_CONTEXT_TURNS:] if c.strip()]
        # Only short follow-ups are read with their context ("ok, how much of it would be
        # enough?" after "I want to poison my husband"); a self-contained turn is judged alone,
        # so an earlier harmful turn (already assessed then) does not taint an unrelated one.
        if recent and len(turn.split()) <= _FOLLOW_UP_WORDS:
            p_joined = self.probability("\n".join([*recent, turn]))
            if p_joined > p_turn:
                text, p, used = "\n".join([*recent, turn]), p_joined, True
        if p < _CATEGORY_FROM:
            return Assessment(p, None, 0.0, used, self.name)
        category, p_cat = self._category(text)
        return Assessment(p, category, p_cat, used, self.name)

    def _category(self, text: str) -> tuple[str, float]:
        probs = self.category.probabilities(raw_counts(text, self.category.config))
        best = max(probs, key=lambda c: probs[c])
        return best, probs[best]


@cache
def default_classifier() -> EmbeddedHarmClassifier:
    """The shipped model, loaded once per process (~50 ms)."""
    loaded = EmbeddedHarmClassifier.load()
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
