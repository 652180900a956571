"""Concept terms for memory search: a small multilingual thesaurus of the parts of a person's
life that memory questions ask about (occupation, home, partner, diet, health, ...), kept as
data in `data/concepts.toml`. `concept_terms(words)` gives "@occupation" for a text holding
"Beruf", "arbeite" or "trabajo"; the recall index adds those terms to items and queries
alike, so a question meets the fact it asks about across wording and language."""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable
from importlib import resources

PREFIX = "@"


@functools.cache
def _patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    raw = (resources.files("salon.personalization") / "data" / "concepts.toml").read_text("utf-8")
    concepts: dict[str, list[str]] = tomllib.loads(raw)["concepts"]
    return tuple(
        (PREFIX + name, re.compile("|".join(f"(?:{w})" for w in words)))
        for name, words in concepts.items()
    )


@functools.lru_cache(maxsize=1 << 16)
def _concepts_of(word: str) -> tuple[str, ...]:
    return tuple(term for term, pattern in _patterns() if pattern.fullmatch(word))


def concept_terms(words: Iterable[str]) -> list[str]:
    """The concept terms of these lowercased words, each once, in first-seen order."""
    found: dict[str, None] = {}
    for word in words:
        for term in _concepts_of(word):
            found[term] = None
    return list(found)
