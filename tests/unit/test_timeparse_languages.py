"""Time cues in the languages memory is tested in, not only English."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from salon.personalization.timeparse import parse_time_window

NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)  # a Monday
MARCH = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
LAST_WEEK = (datetime(2026, 6, 8, tzinfo=UTC), datetime(2026, 6, 15, tzinfo=UTC))
LAST_MONTH = (datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC))
YESTERDAY = (datetime(2026, 6, 14, tzinfo=UTC), datetime(2026, 6, 15, tzinfo=UTC))


@pytest.mark.parametrize(
    ("query", "window"),
    [
        ("Qu'est-ce que je t'ai dit en mars sur mes douleurs ?", MARCH),
        ("¿Qué te conté en marzo?", MARCH),
        ("Was habe ich im März erzählt?", MARCH),
        ("Cosa ti ho detto a marzo?", MARCH),
        ("¿Qué te conté la semana pasada?", LAST_WEEK),
        ("Was habe ich letzte Woche gesagt?", LAST_WEEK),
        ("De quoi on a parlé la semaine  dernière ?", LAST_WEEK),
        ("Di cosa abbiamo parlato il mese scorso?", LAST_MONTH),
        ("Was habe ich gestern gesagt?", YESTERDAY),
        ("¿Qué te dije ayer?", YESTERDAY),
    ],
)
def test_foreign_cues_give_the_same_windows_as_english(
    query: str, window: tuple[datetime, datetime]
) -> None:
    assert parse_time_window(query, NOW) == window


@pytest.mark.parametrize(
    "query", ["Hier ist mein Code", "J'adore les Mars et les Snickers", "Mai Tai recipe"]
)
def test_ordinary_words_are_not_dates(query: str) -> None:
    assert parse_time_window(query, NOW) is None
