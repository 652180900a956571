"""Concept terms: a question and the fact it asks about meet across wording and language."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import numpy as np
import pytest

from salon.personalization.concepts import concept_terms
from salon.personalization.recall_index import Item, RecallIndex


def concepts(text: str) -> list[str]:
    return concept_terms(re.findall(r"\w+", text.lower()))


@pytest.mark.parametrize(
    ("question", "fact", "concept"),
    [
        ("Was ist mein Beruf?", "Ich arbeite als Grafikdesignerin", "@occupation"),
        ("What is my job these days?", "Je travaille comme architecte", "@occupation"),
        ("Est-ce que je mange de la viande ?", "I'm vegetarian", "@diet"),
        ("¿Dónde vivo?", "Ich wohne in Hamburg", "@residence"),
        ("Comment s'appelle ma femme ?", "Mi esposa se llama Lucía", "@partner"),
        ("Wie heißt meine Tochter?", "my daughter turns five in May", "@children"),
        ("Qual è il nome del mio gatto?", "Meine Katze heißt Mimi", "@pets"),
        ("Am I allergic to anything?", "Ich bin allergisch gegen Nüsse", "@health"),
        ("Quelle langue suis-je en train d'apprendre ?", "Estoy aprendiendo japonés", "@learning"),
        ("When is my birthday?", "Sono nata il 3 marzo", "@birthday"),
    ],
)
def test_a_question_and_its_fact_share_a_concept(question: str, fact: str, concept: str) -> None:
    assert concept in concepts(question)
    assert concept in concepts(fact)


@pytest.mark.parametrize(
    "text",
    [
        "what kind of man is he",  # not German "Kind", not Dutch "man"
        "of course, let me chat about it",  # not French "cours"/"chat"
        "please correct the code",  # not Spanish "correr"
        "the casa is big",  # "casa" is a house, not "casado"
    ],
)
def test_ordinary_words_that_look_like_concept_words_are_not(text: str) -> None:
    assert concepts(text) == []


def test_the_index_finds_a_fact_through_its_concept_alone() -> None:
    """No word in common, no embedding signal (zero vectors): only the concept term ties
    "Beruf" to "arbeite"."""
    index = RecallIndex(4)
    at = datetime(2026, 5, 1, tzinfo=UTC)
    zero = np.zeros(4, dtype=np.float32)
    texts = ["Ich arbeite als Grafikdesignerin", "Ich wohne in Berlin", "Meine Katze heißt Mimi"]
    index.add([Item(f"memory:{i}", "memory", t, at, zero) for i, t in enumerate(texts)])
    hits = index.search("Was ist mein Beruf?", zero, 3, now=at)
    assert hits[0].key == "memory:0" and hits[0].lexical > 0
    assert all(h.lexical == 0 for h in hits[1:])
