"""Temporal cues in memory-search queries ("what did I say yesterday about…").

`find_time_cue` returns the window a query refers to and the span of the phrase, so the
retriever can boost items created inside the window and drop the phrase from the lexical
query (otherwise "yesterday" would match every message containing the word).

Windows are computed in the timezone of `now`: pass the user's local time (aware) when known,
UTC otherwise. They are half-open [start, end) and deliberately generous, because they only
*boost* items — a miss costs more than a slightly wide window:

    today / this morning / tonight / earlier today   start of today .. now
    yesterday / last night                           the previous calendar day (night: 12:00-06:00)
    this week / this month / this year               start of the period .. now
    last week / last month / last year               the previous period (start .. start of this)
    N days ago / a couple of days ago                that day ± 1 day
    N weeks ago / N months ago / N years ago         that point ± half a unit
    recently / lately / the other day                the last 14 days
    (on|last) monday … sunday, bare "monday"         the most recent such day before today
    in/during/last/since March [2025]                that month (the latest one not in the future)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

MONTHS = {
    name: i + 1
    for i, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ]
    )
    for name in names
}
# The other languages memory is tested in: month names (after a preposition only, since
# "mars", "mayo", "mai" are ordinary words too) and the common relative phrases.
FOREIGN_MONTHS = {
    name: i + 1
    for i, names in enumerate(
        [
            ("janvier", "enero", "januar", "gennaio"),
            ("février", "fevrier", "febrero", "februar", "febbraio"),
            ("mars", "marzo", "märz", "maerz"),
            ("avril", "abril", "aprile"),
            ("mai", "mayo", "maggio"),
            ("juin", "junio", "juni", "giugno"),
            ("juillet", "julio", "juli", "luglio"),
            ("août", "aout", "agosto", "august"),
            ("septembre", "septiembre", "setiembre", "settembre"),
            ("octobre", "octubre", "oktober", "ottobre"),
            ("novembre", "noviembre", "november"),
            ("décembre", "decembre", "diciembre", "dezember", "dicembre"),
        ]
    )
    for name in names
}
# phrase -> (which, unit) in the English rule's terms
FOREIGN_PERIODS = {
    "la semaine dernière": ("last", "week"),
    "le mois dernier": ("last", "month"),
    "l'année dernière": ("last", "year"),
    "cette semaine": ("this", "week"),
    "ce mois-ci": ("this", "month"),
    "cette année": ("this", "year"),
    "la semana pasada": ("last", "week"),
    "el mes pasado": ("last", "month"),
    "el año pasado": ("last", "year"),
    "esta semana": ("this", "week"),
    "este mes": ("this", "month"),
    "este año": ("this", "year"),
    "letzte woche": ("last", "week"),
    "letzten monat": ("last", "month"),
    "letztes jahr": ("last", "year"),
    "diese woche": ("this", "week"),
    "diesen monat": ("this", "month"),
    "dieses jahr": ("this", "year"),
    "la settimana scorsa": ("last", "week"),
    "il mese scorso": ("last", "month"),
    "l'anno scorso": ("last", "year"),
    "questa settimana": ("this", "week"),
    "questo mese": ("this", "month"),
    "quest'anno": ("this", "year"),
}
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
NUMBER_WORDS = {
    "a": 1,
    "an": 1,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "couple of": 2,
    "a couple of": 2,
    "few": 3,
    "a few": 3,
}
RECENT_DAYS = 14

_NUM = (
    r"(?P<n>\d{1,3}|a couple of|couple of|a few|few|an?|one|two|three|four|five|six|seven"
    r"|eight|nine|ten)"
)
_MONTH_NAMES = "|".join(sorted(MONTHS, key=len, reverse=True))


@dataclass(frozen=True, slots=True)
class TimeCue:
    start: datetime
    end: datetime
    span: tuple[int, int]  # character range of the phrase in the query


def _day_start(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def _month_start(year: int, month: int, like: datetime) -> datetime:
    return like.replace(year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(t: datetime) -> datetime:
    return _month_start(t.year + (t.month == 12), t.month % 12 + 1, t)


def _prev_month(t: datetime) -> datetime:
    return _month_start(t.year - (t.month == 1), (t.month - 2) % 12 + 1, t)


def _window_today(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    return _day_start(now), now + timedelta(seconds=1)


def _window_yesterday(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    today = _day_start(now)
    if "night" in m.group(0).lower():
        return today - timedelta(hours=12), today + timedelta(hours=6)
    return today - timedelta(days=1), today


def _window_period(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    which, unit = m.group("which").lower(), m.group("unit").lower()
    if unit == "week":
        start = _day_start(now) - timedelta(days=now.weekday())
        prev = start - timedelta(days=7)
    elif unit == "month":
        start = _month_start(now.year, now.month, now)
        prev = _prev_month(start)
    else:
        start = _month_start(now.year, 1, now)
        prev = start.replace(year=start.year - 1)
    if which == "this":
        return start, now + timedelta(seconds=1)
    return prev, start


def _window_ago(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    raw = m.group("n").lower()
    n = int(raw) if raw.isdigit() else NUMBER_WORDS[raw]
    unit = m.group("unit").lower()
    if unit.startswith("day"):
        day = _day_start(now - timedelta(days=n))
        return day - timedelta(days=1), day + timedelta(days=2)
    size = {"week": 7.0, "month": 30.44, "year": 365.25}[unit.rstrip("s")]
    centre, half = now - timedelta(days=n * size), timedelta(days=size / 2)
    return centre - half, centre + half


def _window_recent(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    return now - timedelta(days=RECENT_DAYS), now + timedelta(seconds=1)


def _window_weekday(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    target = WEEKDAYS.index(m.group("day").lower())
    back = (now.weekday() - target) % 7 or 7  # "on Monday" said on a Monday: the last one
    day = _day_start(now) - timedelta(days=back)
    return day, day + timedelta(days=1)


def _window_foreign_period(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    which, unit = FOREIGN_PERIODS[" ".join(m.group(0).lower().split())]
    english = re.match(r"(?P<which>\w+) (?P<unit>\w+)", f"{which} {unit}")
    assert english is not None
    return _window_period(english, now)


def _window_month(m: re.Match[str], now: datetime) -> tuple[datetime, datetime]:
    name = m.group("month").lower()
    month = MONTHS.get(name) or FOREIGN_MONTHS[name]
    year_text = m.group("year")
    # Without a year: the latest such month that has started ("in March" asked in February
    # means last March).
    latest = now.year if month <= now.month else now.year - 1
    year = int(year_text) if year_text else latest
    start = _month_start(year, month, now)
    return start, _next_month(start)


def _phrase(text: str) -> str:
    """A fixed phrase as a pattern: whole words, any run of spaces between them."""
    words = (re.escape(word) for word in text.split())
    return r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"


_Rule = Callable[[re.Match[str], datetime], tuple[datetime, datetime]]
_RULES: list[tuple[str | re.Pattern[str], _Rule]] = [
    (
        re.compile(
            r"\b(?:earlier\s+)?today\b|\bthis\s+(?:morning|afternoon|evening)\b|\btonight\b", re.I
        ),
        _window_today,
    ),
    (re.compile(r"\byesterday\b|\blast\s+night\b", re.I), _window_yesterday),
    (rf"\b{_NUM}\s+(?P<unit>days?|weeks?|months?|years?)\s+ago\b", _window_ago),
    (r"\b(?P<which>this|last|past|previous)\s+(?P<unit>week|month|year)\b", _window_period),
    (
        rf"\b(?:in|during|last|since|back\s+in)\s+(?P<month>{_MONTH_NAMES})\b\.?"
        r"(?:\s+(?P<year>(?:19|20)\d\d))?",
        _window_month,
    ),
    (
        r"\b(?:on\s+|last\s+|this\s+past\s+)?(?P<day>"
        + "|".join(WEEKDAYS)
        + r")\b",  # not "mondays": habitual
        _window_weekday,
    ),
    (r"\brecently\b|\blately\b|\bthe\s+other\s+day\b|\bthese\s+days\b", _window_recent),
    (r"\baujourd'hui\b|\bhoy\b|\bheute\b|\boggi\b", _window_today),
    (r"\bayer\b|\bgestern\b|\bieri\b|\bhier\s+soir\b", _window_yesterday),
    (
        "|".join(_phrase(p) for p in FOREIGN_PERIODS),
        _window_foreign_period,
    ),
    (
        r"(?<!\w)(?:en|au\s+mois\s+d[e']|durante|desde|im|seit|nel|a|in|di)\s+(?P<month>"
        + "|".join(sorted(FOREIGN_MONTHS, key=len, reverse=True))
        + r")(?!\w)(?:\s+(?P<year>(?:19|20)\d\d))?",
        _window_month,
    ),
    (
        r"\brécemment\b|\bdernièrement\b|\brecientemente\b|\búltimamente\b"
        r"|\bkürzlich\b|\bneulich\b|\bin\s+letzter\s+zeit\b|\brecentemente\b|\bultimamente\b",
        _window_recent,
    ),
]
_COMPILED = [(p if isinstance(p, re.Pattern) else re.compile(p, re.I), f) for p, f in _RULES]


def find_time_cue(query: str, now: datetime) -> TimeCue | None:
    """The first temporal phrase in `query` (rules in the order above), or None."""
    for pattern, rule in _COMPILED:
        m = pattern.search(query)
        if m is not None:
            start, end = rule(m, now)
            return TimeCue(start=start, end=end, span=m.span())
    return None


def parse_time_window(query: str, now: datetime) -> tuple[datetime, datetime] | None:
    """[start, end) of the period the query refers to, or None if it names none."""
    cue = find_time_cue(query, now)
    return None if cue is None else (cue.start, cue.end)


def strip_time_phrase(query: str, cue: TimeCue | None) -> str:
    if cue is None:
        return query
    a, b = cue.span
    return f"{query[:a]} {query[b:]}".strip()
