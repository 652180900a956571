"""Refusal detection on model output, full or partial, on a stream prefix or the whole reply.

A TF-IDF logistic regression (word 1-2-grams) whose extra features say which published refusal
phrase lists match the reply (at its start, or anywhere). Phrase matching alone misses partial
refusals and fires on compliant answers that say "sorry", so the lists only inform the model.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from salon.safety._linear import LinearTextModel, load_models, raw_counts
from salon.safety.datasets import DATA

REFUSAL_ARTEFACT = DATA / "refusal_model.json.gz"
PHRASE_LISTS = DATA / "refusal_string_lists.json"
# Refusals announce themselves early: the first ~200 characters decide most of them, which is
# what lets the pipeline act before the whole (slow) reply has streamed.
EARLY_CHARS = 200


@dataclass(frozen=True, slots=True)
class RefusalVerdict:
    probability: float
    partial_text: bool  # judged on a prefix of the reply rather than all of it

    def is_refusal(self, threshold: float = 0.5) -> bool:
        return self.probability >= threshold


@cache
def phrase_lists(path: Path = PHRASE_LISTS) -> dict[str, tuple[str, ...]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    lists: dict[str, tuple[str, ...]] = {}
    for name, entry in data.items():
        if isinstance(entry, dict):
            strings = [*entry.get("strings", ()), *entry.get("reject_startswith", ())]
            lists[name] = tuple(s.lower().replace("\u2019", "'") for s in strings if s.strip())
    return lists


# Small models often refuse without an apology: the first sentence restates the request and
# calls it illegal, unethical or "not a recommended approach", or says it cannot provide what
# was asked, and the rest lectures ("Sniping a local politician is not a recommended or
# ethical approach. It can lead to ..."). No published list has these. A compliant answer
# may say the same later, after helping; so only the first sentence counts.
MORALISING = re.compile(
    r"\b(?:not (?:a |an )?(?:safe|legal|ethical|appropriate|recommended|practical|acceptable)\b"
    r"|illegal|unethical|(?:cannot|can't) (?:provide|determine)|(?:do not|don't) have access)"
)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def phrase_features(text: str) -> Iterable[str]:
    """One token per phrase list that matches at the start or anywhere in the reply, and one
    when the first sentence moralises (`MORALISING`)."""
    lowered = text.lower().replace("\u2019", "'").strip()
    head = lowered[:80]
    for name, strings in phrase_lists().items():
        if any(head.startswith(s) for s in strings):
            yield f"p:{name}:start"
        if any(s in lowered for s in strings):
            yield f"p:{name}:any"
    opening = lowered[:EARLY_CHARS]
    end = _SENTENCE_END.search(opening)
    if MORALISING.search(opening[: end.end()] if end else opening):
        yield "p:moralising:first"


def reply_counts(text: str, model: LinearTextModel) -> dict[str, int]:
    return dict(raw_counts(text, model.config, extra=phrase_features(text)))


@dataclass(frozen=True, slots=True)
class RefusalDetector:
    model: LinearTextModel

    @classmethod
    def load(cls, path: Path = REFUSAL_ARTEFACT) -> RefusalDetector:
        models, _ = load_models(path)
        return cls(models["refusal"])

    def score(self, reply: str, *, finished: bool = True) -> RefusalVerdict:
        p = self.model.probabilities(reply_counts(reply, self.model))["refusal"]
        return RefusalVerdict(p, partial_text=not finished)

    def early(self, prefix: str) -> RefusalVerdict | None:
        """A verdict once enough of the stream has arrived to judge; None until then."""
        if len(prefix) < EARLY_CHARS:
            return None
        return self.score(prefix[:EARLY_CHARS], finished=False)


@cache
def default_detector() -> RefusalDetector:
    loaded = RefusalDetector.load()
    # ~10^5 long-lived weight objects: without freezing, full GC passes over them add ~10 ms
    # to the p95 of a request. Freezing moves what exists now out of the collector's sight.
    gc.freeze()
    return loaded
