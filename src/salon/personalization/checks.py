"""Constraints a reply must meet, where they come from, and the code that checks them.

A `Constraint` is one verifiable rule ("no emoji", "at most 120 words", "in French"). They are
derived from the effective settings and the user's message (`derive_constraints`) and checked
on the finished reply (`check_reply`); `enforce.py` repairs the ones that can be repaired while
the reply streams.

What is checked where, on real model markdown:
- Fenced code blocks (``` or ~~~, closed or not) are not prose: they are skipped by the emoji,
  structure, word, sentence, language, case and comma checks. Code is the user's content, and
  the enforcer never rewrites it, so the check must not count it either.
- Forbidden and required words, the nickname, start/end phrases and quotation are checked on
  the whole reply: a forbidden word is unwanted in code comments too.
- Words: runs of letters/digits joined by ' or -, so "don't" and "e-mail" are one word; Chinese
  and Japanese characters count one word per two characters (their words average about two).
- Structure: ATX headers (`#`..`######`) and bullet or numbered list items. Tables count as
  structure for "some structure" but are not flagged under "no structure" (they cannot be
  flattened while streaming, and "headers & lists: less" does not name them).
- Emoji: by Unicode emoji properties (tables below, from Unicode 15/16 emoji-data): characters
  with default emoji presentation, text-default pictographs followed by U+FE0F, keycaps,
  flags, tag sequences, skin-tone modifiers and ZWJ sequences each count as one emoji.
  Symbols used in plain typography (→, ✓, ©, ™ without U+FE0F) are not emoji.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from salon.personalization.language import detect_language
from salon.personalization.profile import Effective

KINDS = frozenset(
    {
        "emoji_none",
        "emoji_some",
        "structure_none",
        "structure_some",
        "max_words",
        "min_words",
        "max_sentences",
        "language",
        "nickname",
        "forbidden_word",
        "include_word",
        "ends_with_question",
        "starts_with",
        "ends_with",
        "formal",
        "casual",
        "lowercase",
        "uppercase",
        "no_commas",
        "quotation",
        "placeholders",
        "postscript",
        "json",
    }
)
SOURCES = frozenset(
    {"characteristics", "length", "personality", "nickname", "instructions", "message"}
)

# "concise": ~150 words is a full short answer (three short paragraphs) yet a clear cut below
# the 250-400 words models write by default. "detailed": below 120 words an answer cannot
# develop more than one point. Explicit numbers in instructions or the message win.
CONCISE_MAX_WORDS = 150
DETAILED_MIN_WORDS = 120
# "Some structure" is only expected when the reply is long enough to have parts.
STRUCTURE_MIN_WORDS = 80
# A language verdict needs this confidence; below it the check passes as undecidable.
LANGUAGE_MIN_CONFIDENCE = 0.5


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: str
    value: str | int | None
    source: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown constraint source {self.source!r}")

    def describe(self) -> str:
        """Short text for the UI and the style prompt, e.g. "at most 120 words"."""
        return _DESCRIBE[self.kind].format(v=self.value, lang=_language_name(self.value))


_DESCRIBE = {
    "emoji_none": "no emoji",
    "emoji_some": "use some emoji",
    "structure_none": "no headers or lists",
    "structure_some": "use headers or lists for answers with several parts",
    "max_words": "at most {v} words",
    "min_words": "at least {v} words",
    "max_sentences": "at most {v} sentences",
    "language": "in {lang}",
    "nickname": "address you as {v}",
    "forbidden_word": 'never use the word "{v}"',
    "include_word": 'use the word "{v}"',
    "ends_with_question": "end with a question",
    "starts_with": 'start with "{v}"',
    "ends_with": 'end with "{v}"',
    "formal": "formal tone, no contractions or slang",
    "casual": "casual tone",
    "lowercase": "all lowercase",
    "uppercase": "all capital letters",
    "no_commas": "no commas",
    "quotation": "wrapped in double quotes",
    "placeholders": "at least {v} [placeholders]",
    "postscript": 'a postscript starting with "{v}"',
    "json": "valid JSON only",
}


@dataclass(frozen=True, slots=True)
class CheckResult:
    constraint: Constraint
    passed: bool
    detail: str


# --- markdown anatomy, shared with enforce.py so both agree on what a line is ----------------

FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
HEADER_RE = re.compile(r"^[ \t]{0,3}#{1,6}(?:[ \t]+|$)")
LIST_RE = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+(?=\S)")
HR_RE = re.compile(r"^[ \t]{0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
TABLE_RE = re.compile(r"^[ \t]*\|.*\|[ \t]*$")


class FenceState:
    """Tracks whether the next line is inside a fenced code block (CommonMark rules)."""

    __slots__ = ("marker",)

    def __init__(self) -> None:
        self.marker: str | None = None

    @property
    def open(self) -> bool:
        return self.marker is not None

    def step(self, line: str) -> bool:
        """Consume one complete line; True when that line is code (a fence line or inside)."""
        match = FENCE_RE.match(line)
        if self.marker is None:
            if match:
                self.marker = match.group(1)
            return match is not None
        if (
            match
            and match.group(1)[0] == self.marker[0]
            and len(match.group(1)) >= len(self.marker)
            and not line[match.end() :].strip()
        ):
            self.marker = None
        return True


def split_code(text: str) -> Iterator[tuple[str, bool]]:
    """Lines of `text` (without their newline) with whether each is code."""
    fence = FenceState()
    for line in text.split("\n"):
        yield line, fence.step(line)


def prose(text: str) -> str:
    """`text` with fenced code lines blanked (line count kept)."""
    return "\n".join("" if code else line for line, code in split_code(text))


def is_structure_line(line: str) -> bool:
    """A markdown header or list item: what "no headers or lists" forbids."""
    return bool(HEADER_RE.match(line) or (LIST_RE.match(line) and not HR_RE.match(line)))


# --- words, sentences --------------------------------------------------------------------------

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
WORD_RE = re.compile(rf"[{_CJK}]{{1,2}}|[^\W_{_CJK}]+(?:['’\-][^\W_{_CJK}]+)*")
# A sentence ends at a terminator (plus closing quotes/brackets/emphasis) before whitespace;
# CJK full stops need no space after them.
# The character after the closers must be known, so a streamed prefix never sees a sentence end
# that more text would move.
SENTENCE_END_RE = re.compile(r"[.!?…][)\]\"'”’*_]*(?=\s)|[。！？][」』）\"”]*(?=[^」』）\"”])")


def count_words(text: str) -> int:
    return sum(1 for _ in WORD_RE.finditer(text))


def count_sentences(text: str) -> int:
    """Sentences of prose: terminated runs, plus each line's unterminated tail with words."""
    total = 0
    for line in text.split("\n"):
        parts = SENTENCE_END_RE.split(line + " ")
        total += sum(1 for part in parts if WORD_RE.search(part))
    return total


# --- emoji -------------------------------------------------------------------------------------

# Default emoji presentation, outside the astral pictograph blocks (emoji-data.txt).
_EP_BMP = (
    "\u231a\u231b\u23e9-\u23ec\u23f0\u23f3\u25fd\u25fe\u2614\u2615\u2648-\u2653\u267f\u2693"
    "\u26a1\u26aa\u26ab\u26bd\u26be\u26c4\u26c5\u26ce\u26d4\u26ea\u26f2\u26f3\u26f5\u26fa"
    "\u26fd\u2705\u270a\u270b\u2728\u274c\u274e\u2753-\u2755\u2757\u2795-\u2797\u27b0\u27bf"
    "\u2b1b\u2b1c\u2b50\u2b55"
)
# Pictographs whose default is text: an emoji only when followed by U+FE0F (or inside a ZWJ
# sequence). Keeps ©, ™, ↔ and friends usable in plain prose.
_XP_TEXT = (
    "\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u2328\u23cf\u23ed-\u23ef"
    "\u23f1\u23f2\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb\u25fc\u2600-\u2604\u260e"
    "\u2611\u2618\u261d\u2620\u2622\u2623\u2626\u262a\u262e\u262f\u2638-\u263a\u2640\u2642"
    "\u265f\u2660\u2663\u2665\u2666\u2668\u267b\u267e\u2692\u2694-\u2697\u2699\u269b\u269c"
    "\u26a0\u26a7\u26b0\u26b1\u26c8\u26cf\u26d1\u26d3\u26e9\u26f0\u26f1\u26f4\u26f7-\u26f9"
    "\u2702\u2708\u2709\u270c\u270d\u270f\u2712\u2714\u2716\u271d\u2721\u2733\u2734\u2744"
    "\u2747\u2763\u2764\u27a1\u2934\u2935\u2b05-\u2b07\u3030\u303d\u3297\u3299"
)
# Astral pictograph blocks: mahjong/cards, enclosed alphanumerics and ideographs, the main
# pictograph blocks, geometric extensions, supplemental pictographs.
_ASTRAL = (
    "\U0001f004\U0001f0cf\U0001f170\U0001f171\U0001f17e\U0001f17f\U0001f18e\U0001f191-\U0001f19a"
    "\U0001f201-\U0001f251\U0001f300-\U0001f3fa\U0001f400-\U0001f64f\U0001f680-\U0001f6ff"
    "\U0001f7e0-\U0001f7ff\U0001f90c-\U0001f9ff\U0001fa70-\U0001faff"
)
_MODIFIER = "\U0001f3fb-\U0001f3ff"
_RI = "\U0001f1e6-\U0001f1ff"
_TAG = "\U000e0020-\U000e007f"
_ELEMENT = rf"(?:[{_ASTRAL}{_EP_BMP}]\ufe0f?|[{_XP_TEXT}]\ufe0f)[{_MODIFIER}]?\ufe0f?[{_TAG}]*"
_JOINED = rf"(?:[{_ASTRAL}{_EP_BMP}{_XP_TEXT}]\ufe0f?[{_MODIFIER}]?)"
EMOJI_PATTERN = rf"[{_RI}]{{1,2}}|[0-9#*]\ufe0f?\u20e3|[{_MODIFIER}]|{_ELEMENT}(?:\u200d{_JOINED})*"
EMOJI_RE = re.compile(EMOJI_PATTERN)
# Any character that can be part of an emoji sequence (for holding back a possibly incomplete
# sequence at the end of a streamed chunk).
EMOJI_PART_RE = re.compile(
    rf"[{_ASTRAL}{_EP_BMP}{_XP_TEXT}{_MODIFIER}{_RI}{_TAG}\ufe0f\u200d\u20e3]"
)


def find_emoji(text: str) -> list[str]:
    return EMOJI_RE.findall(text)


# --- checking ----------------------------------------------------------------------------------


def check_reply(reply: str, constraints: Sequence[Constraint]) -> list[CheckResult]:
    """One result per constraint, in order."""
    plain = prose(reply)
    return [_CHECKS[c.kind](c, reply, plain) for c in constraints]


def _result(c: Constraint, passed: bool, detail: str) -> CheckResult:
    return CheckResult(c, passed, detail)


def _check_emoji_none(c: Constraint, reply: str, plain: str) -> CheckResult:
    found = find_emoji(plain)
    return _result(c, not found, f"{len(found)} emoji found")


def _check_emoji_some(c: Constraint, reply: str, plain: str) -> CheckResult:
    found = find_emoji(plain)
    return _result(c, bool(found), f"{len(found)} emoji found")


def _check_structure_none(c: Constraint, reply: str, plain: str) -> CheckResult:
    lines = [line for line in plain.split("\n") if is_structure_line(line)]
    return _result(c, not lines, f"{len(lines)} header or list lines")


def _check_structure_some(c: Constraint, reply: str, plain: str) -> CheckResult:
    threshold = int(c.value or 0)
    words = count_words(plain)
    if words <= threshold:
        return _result(c, True, f"{words} words: short enough to need no structure")
    lines = [line for line in plain.split("\n") if is_structure_line(line) or TABLE_RE.match(line)]
    return _result(c, bool(lines), f"{len(lines)} header, list or table lines")


def _check_max_words(c: Constraint, reply: str, plain: str) -> CheckResult:
    words, bound = count_words(plain), int(c.value or 0)
    return _result(c, words <= bound, f"{words} words {'<=' if words <= bound else '>'} {bound}")


def _check_min_words(c: Constraint, reply: str, plain: str) -> CheckResult:
    words, bound = count_words(plain), int(c.value or 0)
    return _result(c, words >= bound, f"{words} words {'>=' if words >= bound else '<'} {bound}")


def _check_max_sentences(c: Constraint, reply: str, plain: str) -> CheckResult:
    n, bound = count_sentences(plain), int(c.value or 0)
    return _result(c, n <= bound, f"{n} sentences {'<=' if n <= bound else '>'} {bound}")


def _check_language(c: Constraint, reply: str, plain: str) -> CheckResult:
    want = str(c.value)
    lang, confidence = detect_language(plain, candidates=[want])
    if confidence < LANGUAGE_MIN_CONFIDENCE:
        return _result(c, True, "undecidable: too little prose")
    return _result(c, lang == want, f"detected {lang} ({confidence:.2f})")


def _word_pattern(word: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive, with simple inflections (s, es, ed, d, ing)."""
    stem = re.escape(word.strip())
    if word.strip().isalpha() and word.strip().lower().endswith("e"):
        stem = rf"{re.escape(word.strip()[:-1])}(?:e|ing)"
    return re.compile(rf"(?<!\w){stem}(?:s|es|ed|d|ing)?(?!\w)", re.IGNORECASE)


def _check_forbidden_word(c: Constraint, reply: str, plain: str) -> CheckResult:
    hits = _word_pattern(str(c.value)).findall(reply)
    return _result(c, not hits, f'"{c.value}" used {len(hits)} times')


def _check_include_word(c: Constraint, reply: str, plain: str) -> CheckResult:
    hits = _word_pattern(str(c.value)).findall(reply)
    return _result(c, bool(hits), f'"{c.value}" used {len(hits)} times')


def nickname_pattern(nickname: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(nickname.strip())}(?!\w)", re.IGNORECASE)


def _check_nickname(c: Constraint, reply: str, plain: str) -> CheckResult:
    found = bool(nickname_pattern(str(c.value)).search(reply))
    return _result(c, found, f"{c.value} {'named' if found else 'not named'}")


_TRAILING_DECOR = re.compile(rf"(?:\s|[*_\"'”’)\]]|{EMOJI_PATTERN})+$")


def _last_sentence(plain: str) -> str:
    """The last non-empty prose sentence, without trailing emphasis, quotes or emoji."""
    text = _TRAILING_DECOR.sub("", plain)
    return text.rsplit("\n", 1)[-1].strip()


def _check_ends_with_question(c: Constraint, reply: str, plain: str) -> CheckResult:
    last = _last_sentence(plain)
    passed = last.endswith(("?", "？"))
    return _result(c, passed, f"ends with {last[-1:]!r}" if last else "no prose")


def _lead(reply: str) -> str:
    """The reply's start without leading whitespace, quotes or markdown emphasis/headers."""
    return reply.lstrip().lstrip("\"“'#*_> \t\n")


def _check_starts_with(c: Constraint, reply: str, plain: str) -> CheckResult:
    want = str(c.value).strip().lower()
    passed = _lead(reply).lower().startswith(want)
    return _result(c, passed, "starts with it" if passed else f"starts with {_lead(reply)[:30]!r}")


def strip_end(reply: str) -> str:
    """The reply's end as IFEval reads it: whitespace and wrapping quotes removed."""
    return reply.strip().strip('"').strip()


def _check_ends_with(c: Constraint, reply: str, plain: str) -> CheckResult:
    end = strip_end(reply)
    passed = end.lower().endswith(str(c.value).strip().lower())
    return _result(c, passed, "ends with it" if passed else f"ends with {end[-30:]!r}")


_CONTRACTION_RE = re.compile(
    r"\b\w+n['’]t\b|\b(?:i|you|we|they|he|she|it|that|there|here|what|who|where|how|let)"
    r"['’](?:m|re|ve|ll|d|s)\b",
    re.IGNORECASE,
)
_SLANG_RE = re.compile(
    r"\b(?:gonna|wanna|gotta|kinda|sorta|dunno|yeah|yep|yup|nope|lol|lmao|omg|btw|tbh|imo|"
    r"ya|y['’]all|cool|awesome|hey|stuff)\b",
    re.IGNORECASE,
)


def _informal_markers(plain: str) -> list[str]:
    return _CONTRACTION_RE.findall(plain) + _SLANG_RE.findall(plain)


def _check_formal(c: Constraint, reply: str, plain: str) -> CheckResult:
    found = _informal_markers(plain)
    return _result(c, not found, f"informal: {', '.join(found[:5])}" if found else "formal")


def _check_casual(c: Constraint, reply: str, plain: str) -> CheckResult:
    # A short reply, or one not in English, cannot show register by these markers.
    if count_words(plain) < 30 or detect_language(plain)[0] not in ("en", "und"):
        return _result(c, True, "undecidable")
    found = _informal_markers(plain)
    return _result(c, bool(found), f"{len(found)} contractions or casual words")


def _check_lowercase(c: Constraint, reply: str, plain: str) -> CheckResult:
    upper = sum(1 for ch in plain if ch.isupper())
    return _result(c, upper == 0, f"{upper} capital letters")


def _check_uppercase(c: Constraint, reply: str, plain: str) -> CheckResult:
    lower = sum(1 for ch in plain if ch.islower())
    return _result(c, lower == 0, f"{lower} lowercase letters")


def _check_no_commas(c: Constraint, reply: str, plain: str) -> CheckResult:
    n = plain.count(",") + plain.count("，")
    return _result(c, n == 0, f"{n} commas")


def _check_quotation(c: Constraint, reply: str, plain: str) -> CheckResult:
    text = reply.strip()
    passed = len(text) > 1 and text[0] == '"' and text[-1] == '"'
    return _result(c, passed, "quoted" if passed else "not wrapped in double quotes")


def _check_placeholders(c: Constraint, reply: str, plain: str) -> CheckResult:
    n, want = len(re.findall(r"\[[^\[\]\n]+\]", reply)), int(c.value or 0)
    return _result(c, n >= want, f"{n} placeholders")


def _check_postscript(c: Constraint, reply: str, plain: str) -> CheckResult:
    marker = re.escape(str(c.value)).replace(r"\.", r"\.?")
    found = re.search(rf"(?m)^\W*{marker}", reply, re.IGNORECASE) is not None
    return _result(c, found, "postscript found" if found else "no postscript")


def _check_json(c: Constraint, reply: str, plain: str) -> CheckResult:
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", reply.strip(), flags=re.IGNORECASE)
    try:
        json.loads(body)
    except ValueError as exc:
        return _result(c, False, f"not JSON: {exc}")
    return _result(c, True, "valid JSON")


_CHECKS = {
    "emoji_none": _check_emoji_none,
    "emoji_some": _check_emoji_some,
    "structure_none": _check_structure_none,
    "structure_some": _check_structure_some,
    "max_words": _check_max_words,
    "min_words": _check_min_words,
    "max_sentences": _check_max_sentences,
    "language": _check_language,
    "nickname": _check_nickname,
    "forbidden_word": _check_forbidden_word,
    "include_word": _check_include_word,
    "ends_with_question": _check_ends_with_question,
    "starts_with": _check_starts_with,
    "ends_with": _check_ends_with,
    "formal": _check_formal,
    "casual": _check_casual,
    "lowercase": _check_lowercase,
    "uppercase": _check_uppercase,
    "no_commas": _check_no_commas,
    "quotation": _check_quotation,
    "placeholders": _check_placeholders,
    "postscript": _check_postscript,
    "json": _check_json,
}


# --- deriving constraints from settings and free text -----------------------------------------

LANGUAGE_NAMES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ja": "Japanese",
    "zh": "Chinese",
    "ru": "Russian",
    "ko": "Korean",
    "ar": "Arabic",
    "hi": "Hindi",
    "pl": "Polish",
    "tr": "Turkish",
    "sv": "Swedish",
    "da": "Danish",
    "no": "Norwegian",
    "fi": "Finnish",
    "el": "Greek",
    "cs": "Czech",
    "uk": "Ukrainian",
    "he": "Hebrew",
    "vi": "Vietnamese",
    "th": "Thai",
    "id": "Indonesian",
    "ro": "Romanian",
    "hu": "Hungarian",
    "bn": "Bengali",
    "fa": "Persian",
    "sw": "Swahili",
    "ta": "Tamil",
    "ur": "Urdu",
    "ca": "Catalan",
    "bg": "Bulgarian",
    "kn": "Kannada",
    "pa": "Punjabi",
    "mr": "Marathi",
    "gu": "Gujarati",
    "te": "Telugu",
    "ne": "Nepali",
    "ml": "Malayalam",
}
# What users type for a language, in English and in the language itself.
_LANGUAGE_WORDS = {name.lower(): code for code, name in LANGUAGE_NAMES.items()} | {
    "mandarin": "zh",
    "farsi": "fa",
    "français": "fr",
    "francais": "fr",
    "deutsch": "de",
    "español": "es",
    "espanol": "es",
    "castellano": "es",
    "italiano": "it",
    "português": "pt",
    "portugues": "pt",
    "nederlands": "nl",
    "русском": "ru",
    "русский": "ru",
    "日本語": "ja",
    "中文": "zh",
    "汉语": "zh",
    "漢語": "zh",
}


def _language_name(code: object) -> str:
    return LANGUAGE_NAMES.get(str(code), str(code))


# Precedence of layers, low to high. Personality presets and the characteristics/length
# pickers are one "settings" tier: the user's explicit pickers beat a preset's, but for a
# word bound the tighter one is kept (a concise length under an "Efficient" preset).
_RANK = {
    "personality": 0,
    "characteristics": 1,
    "length": 1,
    "nickname": 1,
    "instructions": 2,
    "message": 3,
}
_FAMILY = {
    "emoji_none": "emoji",
    "emoji_some": "emoji",
    "structure_none": "structure",
    "structure_some": "structure",
    "max_words": "length",
    "min_words": "length",
    "max_sentences": "length",
    "ends_with_question": "ending",
    "ends_with": "ending",
    "formal": "tone",
    "casual": "tone",
    "lowercase": "case",
    "uppercase": "case",
    "quotation": "quotation",
}
# Kinds that cannot both hold; when one layer yields both, the first listed is kept
# (a prohibition is usually the deliberate part of a contradictory instruction).
_EXCLUSIVE = [
    ("emoji_none", "emoji_some"),
    ("structure_none", "structure_some"),
    ("formal", "casual"),
    ("lowercase", "uppercase"),
]

_NUMBER_WORDS = {
    "one": 1,
    "a single": 1,
    "a": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "a hundred": 100,
    "one hundred": 100,
    "hundred": 100,
}
_NUM = (
    r"(\d{1,5}|a single|a hundred|one hundred|"
    + "|".join(sorted((w for w in _NUMBER_WORDS if " " not in w), key=len, reverse=True))
    + ")"
)
_NEGATION_RE = re.compile(
    r"\b(?:no|not|never|without|avoid|avoiding|stop|don['’]?t|do not|refrain|skip|zero|"
    r"less|fewer|nor)\b[^.;!?\n]*$",
    re.IGNORECASE,
)


def _number(token: str) -> int:
    token = token.lower()
    return int(token) if token.isdigit() else _NUMBER_WORDS[token]


def _negated(text: str, start: int, window: int = 30) -> bool:
    """Whether a negation word precedes `start` within the same clause."""
    return bool(_NEGATION_RE.search(text[max(0, start - window) : start]))


def _mk(kind: str, value: str | int | None, source: str) -> Constraint:
    return Constraint(kind, value, source)


# Each parser reads free text and yields constraints of one concern.


# "more than 4 words in all capital letters" counts capitalised words, not the reply's words.
_ABOUT_CAPITALS = re.compile(r"\s+(?:\w+\s+){0,6}?(?:in|with)\s+(?:all\s+)?(?:caps|capital)", re.I)


def _parse_words(text: str, source: str) -> list[Constraint]:
    text = re.sub(rf"\b{_NUM}\s+words?(?={_ABOUT_CAPITALS.pattern})", " ", text, flags=re.I)
    out: list[Constraint] = []
    flags = re.IGNORECASE
    below = r"(?:under|fewer than|less than|below|shorter than)"
    at_most = (
        r"(?:no more than|not more than|at most|a maximum of|maximum of|max(?:imum)?|up to|"
        r"within|no longer than|not exceed(?:ing)?|limit(?:ed)? to)"
    )
    for m in re.finditer(rf"\b{below}\s+{_NUM}\s+words?\b", text, flags):
        out.append(_mk("max_words", max(1, _number(m.group(1)) - 1), source))
    for m in re.finditer(rf"\b{at_most}\s+{_NUM}\s+words?\b", text, flags):
        out.append(_mk("max_words", _number(m.group(1)), source))
    for m in re.finditer(rf"\b{_NUM}\s+words?\s+(?:or (?:less|fewer)|max(?:imum)?)\b", text, flags):
        out.append(_mk("max_words", _number(m.group(1)), source))
    for m in re.finditer(rf"\b(?:more than|over)\s+{_NUM}\s+words?\b", text, flags):
        out.append(_mk("min_words", _number(m.group(1)) + 1, source))
    least = r"(?:at least|no less than|no fewer than|a minimum of|minimum of|min(?:imum)?)"
    for m in re.finditer(rf"\b{least}\s+{_NUM}\s+words?\b", text, flags):
        out.append(_mk("min_words", _number(m.group(1)), source))
    for m in re.finditer(rf"\b{_NUM}\s*(?:\+\s*words?|words?\s+or\s+more)\b", text, flags):
        out.append(_mk("min_words", _number(m.group(1)), source))
    if not out:
        # "in 300 words", "a 200-word summary": a target, read as a +-20 % band.
        approx = rf"\b(?:in|about|around|roughly|approximately|exactly|~)\s+{_NUM}\s+words?\b"
        found = re.search(approx, text, flags) or re.search(r"\b(\d{2,5})[- ]words?\b", text)
        if found:
            n = _number(found.group(1))
            out += [_mk("min_words", n * 4 // 5, source), _mk("max_words", -(-n * 6 // 5), source)]
    return out


def _parse_sentences(text: str, source: str) -> list[Constraint]:
    pattern = (
        rf"\b(?:in|with|using|to|at most|no more than|up to|max(?:imum)?(?: of)?)\s+{_NUM}"
        r"\s+sentences?\b"
    )
    out = []
    for m in re.finditer(pattern, text, re.IGNORECASE):
        if not re.search(r"\b(?:at least|more than|over|minimum)\s*$", text[: m.start()], re.I):
            out.append(_mk("max_sentences", _number(m.group(1)), source))
    for m in re.finditer(
        rf"\b(?:fewer than|less than|under)\s+{_NUM}\s+sentences?\b", text, re.IGNORECASE
    ):
        out.append(_mk("max_sentences", max(1, _number(m.group(1)) - 1), source))
    for m in re.finditer(rf"\b{_NUM}\s+sentences?\s+or\s+(?:fewer|less)\b", text, re.IGNORECASE):
        out.append(_mk("max_sentences", _number(m.group(1)), source))
    return out


_LANG_ALT = "|".join(sorted(map(re.escape, _LANGUAGE_WORDS), key=len, reverse=True))
_LANGUAGE_PATTERNS = [
    # "answer in French", "write everything in German", "your entire response should be in Hindi"
    rf"\b(?:answer|respond|reply|write|speak|talk|communicate|converse|responses?|answers?|"
    rf"replies|everything|always|only|entirely|output|text)\b[^.!?\n]{{0,40}}?\bin\s+({_LANG_ALT})"
    r"(?![\w-])",
    rf"\bin\s+(?:the\s+)?({_LANG_ALT})\s+(?:only|please|language)\b",
    # "use only Korean", "using only the Marathi language", "entirely in Bengali"
    rf"\b(?:only|entirely|completely|exclusively|use|using)\s+(?:only\s+|in\s+|using\s+)?"
    rf"(?:the\s+)?({_LANG_ALT})(?![\w-])",
    rf"\btranslate\b[^.!?\n]{{0,80}}?\b(?:in)?to\s+({_LANG_ALT})(?![\w-])",
    rf"({_LANG_ALT})\s*(?:で|回答|回复|回覆)",
    r"(по-русски)",
]
# "no other language except Vietnamese": the negation is part of the request.
_LANGUAGE_EXCEPT = rf"\b(?:except|outside of|other than)\s+({_LANG_ALT})(?![\w-])"
# "en français", "auf Deutsch": only with the language's own name ("in French" alone is how
# "how do you say X in French?" asks, and asks for an English answer).
_LANGUAGE_NATIVE = rf"(?:^|[\s(])(?:en|auf|em|in het|in|na|用)\s*({_LANG_ALT})(?![\w-])"
_ENGLISH_NAMES = frozenset(name.lower() for name in LANGUAGE_NAMES.values())


def _language_requests(text: str) -> Iterator[str]:
    """Language words the text asks the reply to be in, most explicit phrasing first."""
    for pattern in _LANGUAGE_PATTERNS:
        for m in re.finditer(pattern, text, re.IGNORECASE):
            if not _negated(text, m.start()):
                yield m.group(1).lower()
    for m in re.finditer(_LANGUAGE_EXCEPT, text, re.IGNORECASE):
        yield m.group(1).lower()
    for m in re.finditer(_LANGUAGE_NATIVE, text, re.IGNORECASE):
        if m.group(1).lower() not in _ENGLISH_NAMES and not _negated(text, m.start()):
            yield m.group(1).lower()


def _parse_language(text: str, source: str) -> list[Constraint]:
    for word in _language_requests(text):
        code = "ru" if word == "по-русски" else _LANGUAGE_WORDS.get(word)
        if code:
            return [_mk("language", code, source)]
    return []


_QUOTED = r"[\"“]([^\"”\n]{1,200})[\"”]|'([^'\n]{1,200})'(?!\w)|‘([^’\n]{1,200})’"


def _quoted(m: re.Match[str]) -> str:
    """The first group that matched: a quoted text or the bare-word alternative."""
    return next(g for g in m.groups() if g is not None).strip()


def _split_words(items: str) -> list[str]:
    quoted = [q for group in re.findall(_QUOTED, items) for q in group if q]
    if quoted:
        return [q.strip() for q in quoted]
    return [w for w in re.split(r"\s*(?:,|\bor\b|\band\b|/)\s*", items) if w]


_WORD_LIST = (
    rf"((?:(?:{_QUOTED})(?:\s*(?:,|or|and|/)\s*)?)+|[\w'’-]+(?:\s*(?:,|or|and|/)\s*[\w'’-]+)*)"
)


def _parse_word_rules(text: str, source: str) -> list[Constraint]:
    out = []
    forbid = (
        r"\b(?:never|don['’]?t|do not|avoid|without|not)\s+(?:use|using|say|saying|include|"
        r"including|mention|mentioning|write|writing)?\s*(?:any\s+of\s+)?(?:the\s+)?"
        rf"(?:words?|terms?|phrases?|keywords?)\s+{_WORD_LIST}"
    )
    for m in re.finditer(forbid, text, re.IGNORECASE):
        out += [_mk("forbidden_word", w, source) for w in _split_words(m.group(1))]
    say = rf"\b(?:never|don['’]?t|do not)\s+say\s+(?:{_QUOTED}|([\w'’-]+)(?=\s*(?:[.,;!\n]|$)))"
    for m in re.finditer(say, text, re.IGNORECASE):
        out.append(_mk("forbidden_word", _quoted(m), source))
    # "use words with all capitals" is not a keyword: bare words need "the word" or quotes.
    include = (
        rf"\b(?:include|use|mention)\s+(?:(?:the\s+)?keywords?\s+{_WORD_LIST}|the\s+words?\s+"
        rf"{_WORD_LIST}|words?\s+((?:(?:{_QUOTED})(?:\s*(?:,|or|and|/)\s*)?)+))"
    )
    for m in re.finditer(include, text, re.IGNORECASE):
        if not _negated(text, m.start()):
            # groups 1, 5, 9: the list in each alternative (each list has 3 inner groups)
            items = next(g for g in (m.group(1), m.group(5), m.group(9)) if g is not None)
            out += [_mk("include_word", w, source) for w in _split_words(items)]
    return out


def _parse_nickname(text: str, source: str) -> list[Constraint]:
    m = re.search(
        rf"\b(?:call me|address me as|refer to me as)\s+(?:{_QUOTED}|([^\s,.!?;:\"”]+))",
        text,
        re.IGNORECASE,
    )
    return [_mk("nickname", _quoted(m), source)] if m else []


def _parse_edges(text: str, source: str) -> list[Constraint]:
    out = []
    flags = re.IGNORECASE
    end_q = (
        r"\b(?:end|finish|close|conclude|wrap up)\w*\s+(?:\w+\s+){0,4}?with\s+(?:a|one)\s+"
        r"(?:\w+[- ])?question"
    )
    if (m := re.search(end_q, text, flags)) and not _negated(text, m.start()):
        out.append(_mk("ends_with_question", None, source))
    end_phrase = (
        r"\b(?:end|finish|conclude)\w*\s+(?:\w+\s+){0,4}?with\s+(?:the\s+|this\s+)?(?:exact\s+)?"
        rf"(?:phrase|sentence|words?)?\s*:?\s*(?:{_QUOTED})"
    )
    if m := re.search(end_phrase, text, flags):
        out.append(_mk("ends_with", _quoted(m), source))
    start = (
        r"\b(?:start|begin)\w*\s+(?:\w+\s+){0,4}?with\s+(?:the\s+)?(?:exact\s+)?"
        rf"(?:phrase|sentence|words?|letter)?\s*:?\s*(?:{_QUOTED})"
    )
    if m := re.search(start, text, flags):
        out.append(_mk("starts_with", _quoted(m), source))
    elif m := re.search(
        r"\b(?:start|begin)\w*\s+(?:\w+\s+){0,3}?with the word\s+([\w'’-]+)", text, flags
    ):
        out.append(_mk("starts_with", m.group(1), source))
    quote = (
        r"\b(?:wrap|enclose|put|surround)\w*\s+(?:\w+\s+){0,4}?(?:in|with(?:in)?)\s+"
        r"double quot(?:ation marks|es)"
    )
    if re.search(quote, text, flags):
        out.append(_mk("quotation", None, source))
    return out


def _unnegated(pattern: str, text: str) -> bool:
    return any(not _negated(text, m.start()) for m in re.finditer(pattern, text, re.IGNORECASE))


def _negated_mention(pattern: str, text: str) -> bool:
    return any(_negated(text, m.start()) for m in re.finditer(pattern, text, re.IGNORECASE))


def _parse_style(text: str, source: str) -> list[Constraint]:
    out = []
    emoji = r"\bemoji(?:s|cons?)?\b"
    if _negated_mention(emoji, text) or re.search(r"\bemoji[- ]free\b", text, re.I):
        out.append(_mk("emoji_none", None, source))
    elif _unnegated(
        rf"\b(?:use|add|include|with|more|lots of|plenty of|sprinkle)\s+"
        rf"(?:\w+\s+){{0,2}}?{emoji}",
        text,
    ):
        out.append(_mk("emoji_some", None, source))
    markup = (
        r"\b(?:markdown|formatting|headers|headings|bullet(?:\s*points?)?|bullets|"
        r"(?:bulleted |numbered )?lists?)\b"
    )
    prose_only = r"\b(?:plain text|plain prose|in prose|prose only|paragraphs only)\b"
    if _negated_mention(markup, text) or re.search(prose_only, text, re.I):
        out.append(_mk("structure_none", None, source))
    elif _unnegated(
        r"\b(?:use|with|include|add|in|as|make|format\w*(?:\s+\w+)?\s+(?:as|with|in))\s+"
        r"(?:a\s+|some\s+)?(?:bullet(?:\s*points?)?|bullets|bulleted list|numbered list|list|"
        r"headers|headings|sections)\b",
        text,
    ):
        out.append(_mk("structure_some", 0, source))
    contractions = r"\bcontractions\b"
    if _negated_mention(contractions, text) or _unnegated(r"\b(?:formal|professional)\b", text):
        out.append(_mk("formal", None, source))
    elif _unnegated(r"\b(?:casual|informal|relaxed|laid[- ]back|conversational)\b", text):
        out.append(_mk("casual", None, source))
    lower = (
        r"\b(?:all\s+)?lower[- ]?case(?: letters)?\b|\bno capital letters\b|"
        r"\bwithout (?:any )?capital(?:s| letters)\b"
    )
    upper = (
        r"\bin (?:all )?(?:capital letters|caps|upper[- ]?case(?: letters)?)\b|"
        r"\b(?:all|entirely|only) (?:in )?(?:caps|upper[- ]?case)\b|\bno lowercase letters\b"
    )
    # "use words in all caps" asks for some capitalised words, not an all-caps reply.
    if any(
        not re.search(r"\bwords?\b[^.]{0,35}$", text[max(0, m.start() - 40) : m.start()], re.I)
        and not _negated(text, m.start())
        for m in re.finditer(upper, text, re.IGNORECASE)
    ):
        out.append(_mk("uppercase", None, source))
    elif re.search(lower, text, re.I) and not _negated_mention(r"lower[- ]?case", text):
        out.append(_mk("lowercase", None, source))
    if _negated_mention(r"\bcommas?\b", text):
        out.append(_mk("no_commas", None, source))
    return out


def _parse_ifeval_extras(text: str, source: str) -> list[Constraint]:
    out = []
    if m := re.search(rf"\bat least\s+{_NUM}\s+placeholders?\b", text, re.IGNORECASE):
        out.append(_mk("placeholders", _number(m.group(1)), source))
    if m := re.search(
        r"\bpostscript\b[^.\n]*?\b(?:starting|beginning) with\s+(P\.(?:P\.)?S\.?)",
        text,
        re.IGNORECASE,
    ):
        out.append(_mk("postscript", m.group(1), source))
    json_rule = r"\b(?:in|as|wrapped in|using)\s+(?:valid\s+)?JSON\b(?:\s+format)?"
    if _unnegated(json_rule, text):
        out.append(_mk("json", None, source))
    return out


_PARSERS = (
    _parse_words,
    _parse_sentences,
    _parse_language,
    _parse_word_rules,
    _parse_nickname,
    _parse_edges,
    _parse_style,
    _parse_ifeval_extras,
)


def parse_free_text(text: str, source: str) -> list[Constraint]:
    """Every constraint a free-text instruction or message states."""
    return [c for parse in _PARSERS for c in parse(text, source)]


_PERSONALITY_VALUES = {
    ("emoji", "none"): "emoji_none",
    ("emoji", "less"): "emoji_none",
    ("emoji", "some"): "emoji_some",
    ("emoji", "more"): "emoji_some",
    ("structure", "none"): "structure_none",
    ("structure", "less"): "structure_none",
    ("structure", "some"): "structure_some",
    ("structure", "more"): "structure_some",
    ("register", "formal"): "formal",
    ("register", "casual"): "casual",
}
# Keys a personality preset may declare in `constraints` (see data/personalities.toml).
PERSONALITY_KEYS = frozenset(
    {
        "emoji",
        "structure",
        "register",
        "max_words",
        "min_words",
        "max_sentences",
        "language",
        "ends_with_question",
    }
)


def _from_personality(declared: Mapping[str, str | int]) -> list[Constraint]:
    out = []
    for key, value in declared.items():
        if key in ("max_words", "min_words", "max_sentences"):
            out.append(_mk(key, int(value), "personality"))
        elif key == "language":
            out.append(_mk("language", str(value), "personality"))
        elif key == "ends_with_question" and value:
            out.append(_mk("ends_with_question", None, "personality"))
        elif kind := _PERSONALITY_VALUES.get((key, str(value).lower())):
            out.append(_mk(kind, 0 if kind == "structure_some" else None, "personality"))
        # Unknown keys are ignored here: a preset typo must not break every turn. Validate
        # presets against PERSONALITY_KEYS when they are loaded.
    return out


def _from_settings(effective: Effective) -> list[Constraint]:
    out = []
    chars = effective.characteristics
    if chars.emoji != "default":
        out.append(
            _mk("emoji_none" if chars.emoji == "less" else "emoji_some", None, "characteristics")
        )
    if chars.headers_lists == "less":
        out.append(_mk("structure_none", None, "characteristics"))
    elif chars.headers_lists == "more":
        out.append(_mk("structure_some", STRUCTURE_MIN_WORDS, "characteristics"))
    if effective.length == "concise":
        out.append(_mk("max_words", CONCISE_MAX_WORDS, "length"))
    elif effective.length == "detailed":
        out.append(_mk("min_words", DETAILED_MIN_WORDS, "length"))
    if effective.about.nickname.strip():
        out.append(_mk("nickname", effective.about.nickname.strip(), "nickname"))
    return out


def _family(c: Constraint) -> str:
    if c.kind in ("forbidden_word", "include_word"):
        return f"word:{str(c.value).lower()}"
    return _FAMILY.get(c.kind, c.kind)


def _merge_settings_tier(group: list[Constraint]) -> list[Constraint]:
    """Preset vs pickers in one family: pickers win, except the tighter word bound is kept."""
    top = max(_RANK[c.source] for c in group)
    kept = [c for c in group if _RANK[c.source] == top]
    if _family(group[0]) == "length":
        maxima = [c for c in group if c.kind == "max_words"]
        if maxima and not any(c.kind == "min_words" for c in kept):
            tight = min(maxima, key=lambda c: int(c.value or 0))
            kept = [c for c in kept if c.kind != "max_words"] + [tight]
    return kept


def _drop_contradictions(group: list[Constraint]) -> list[Constraint]:
    kinds = {c.kind for c in group}
    drop = {second for first, second in _EXCLUSIVE if first in kinds and second in kinds}
    out = [c for c in group if c.kind not in drop]
    ends = [c for c in out if c.kind == "ends_with"]
    if ends and not str(ends[0].value).rstrip().endswith(("?", "？")):
        out = [c for c in out if c.kind != "ends_with_question"]
    mins = [int(c.value or 0) for c in out if c.kind == "min_words"]
    maxs = [int(c.value or 0) for c in out if c.kind == "max_words"]
    if mins and maxs and max(mins) > min(maxs):
        out = [c for c in out if c.kind != "min_words"]
    return out


def _resolve(candidates: list[Constraint]) -> list[Constraint]:
    """Per family, the highest layer wins; the result never contradicts itself."""
    families: dict[str, list[Constraint]] = {}
    for c in candidates:
        families.setdefault(_family(c), []).append(c)
    out: list[Constraint] = []
    for group in families.values():
        top = max(_RANK[c.source] for c in group)
        kept = (
            _merge_settings_tier(group)
            if top <= 1
            else [c for c in group if _RANK[c.source] == top]
        )
        out += _drop_contradictions(_dedupe(kept))
    return out


def _tighter(new: Constraint, old: Constraint) -> bool:
    if new.kind in ("max_words", "max_sentences"):
        return int(new.value or 0) < int(old.value or 0)
    return new.kind == "min_words" and int(new.value or 0) > int(old.value or 0)


def _dedupe(group: list[Constraint]) -> list[Constraint]:
    """One constraint per kind: the tightest bound, or the first stated value."""
    by_kind: dict[str, Constraint] = {}
    for c in group:
        seen = by_kind.get(c.kind)
        if seen is None or _tighter(c, seen):
            by_kind[c.kind] = c
    return list(by_kind.values())


def derive_constraints(
    effective: Effective,
    message: str,
    *,
    personality_constraints: Mapping[str, str | int] = {},  # read only, never mutated
) -> list[Constraint]:
    """The checkable rules for one turn, highest layer winning per family.

    Layers, low to high: the personality preset's declared constraints, the characteristics
    and length pickers and the nickname field, free-text "how to respond", the message.
    """
    candidates = (
        _from_personality(personality_constraints)
        + _from_settings(effective)
        + parse_free_text(effective.how_to_respond, "instructions")
        + parse_free_text(message, "message")
    )
    return _resolve(candidates)
