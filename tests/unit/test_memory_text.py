"""What a message states and what it asks (memory.statements / _only_questions): messages
that only ask rank lower in memory search, and only what a message states is embedded."""

from __future__ import annotations

import pytest

from salon.personalization.memory import _only_questions, statements


@pytest.mark.parametrize(
    ("text", "stated"),
    [
        # A fact, then a question in the same sentence: how people write in every language.
        (
            "Je suis végétarienne depuis dix ans, tu as une idée de plat pour samedi ?",
            "Je suis végétarienne depuis dix ans",
        ),
        (
            "Otra cosa: soy alérgica a las nueces, ¿qué postres mexicanos son seguros?",
            "soy alérgica a las nueces",
        ),
        (
            "Ich habe eine Laktoseintoleranz, kann ich Käsespätzle trotzdem machen?",
            "Ich habe eine Laktoseintoleranz",
        ),
        ("Suono il violoncello da quindici anni, potrei suonare alla cerimonia?", None),
        ("I moved to Oslo last week. Any tips for the winter?", "I moved to Oslo last week."),
        ("Merci, ça marche parfaitement", "Merci, ça marche parfaitement"),
    ],
)
def test_statements_keep_what_is_stated(text: str, stated: str | None) -> None:
    expected = stated if stated is not None else text.split(",")[0]
    assert statements(text) == expected
    assert not _only_questions(text)


@pytest.mark.parametrize(
    "text",
    [
        "What's the difference between asyncio.gather and asyncio.wait?",
        # a greeting states nothing
        "Salut ! Comment je fais une RECHERCHEV qui ignore les majuscules ?",
        # clauses that open like a question, or a condition of it, stay part of it
        "how do I add exponential backoff, if the API returns 429?",
        "Et si je veux chercher dans la colonne de gauche, c'est possible ?",
        "ok and if one of the tasks raises, does gather cancel the others?",
        "¿Cómo se dice 'soy alérgica a las nueces' en japonés?",
        "Wie lange dauert das, wenn ich den Zug nehme?",
    ],
)
def test_questions_state_nothing(text: str) -> None:
    assert _only_questions(text)
    assert statements(text) == ""


def test_short_remarks_are_neither() -> None:
    assert not _only_questions("less formal")
    assert statements("less formal") == ""  # too short to hold a fact: the text is embedded
