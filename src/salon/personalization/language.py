"""Which language a reply is written in, for the `language` check.

Measured (2-core dev machine, 100 short chat replies: 10 each in en fr de es it pt nl ja zh ru,
one or two sentences each, 25-70 characters):

    library                         accuracy  first load   per call   RSS over numpy  on disk
    py3langid 0.4.0, all 97 langs    97/100    0.6 s        0.05 ms    ~105 MB         4.5 MB
    py3langid 0.4.0, 20 common       100/100   (same)       0.05 ms    (same)
    detect_language() below         100/100   (same)       0.2 ms     (same)
    lingua 2.1.1, 20 langs, lazy     97/100    2.6 s        4 ms       ~400 MB         96 MB
    lingua 2.1.1, 20 langs, preload  97/100    2.8 s        0.3 ms     ~515 MB
    langdetect 1.0.9 (seeded)        93/100    0.2 s        2 ms       ~65 MB          2.5 MB

py3langid's misses on the full label set were close relatives (es->gl/ext, nl->af); scoring only
common languages removes them, so detection ranks all labels and keeps the candidates (the
common set plus the language the check wants; markdown stripped first). lingua was no more
accurate on this set at 4x the memory; langdetect confuses zh with ko and is random unless
seeded. The model ships inside the py3langid wheel: nothing is downloaded at run time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

# Languages a reply is plausibly written in. Ranking only these keeps rare neighbours (Galician,
# Afrikaans, Extremaduran...) from winning on short text.
COMMON = frozenset(
    {
        "en",
        "fr",
        "de",
        "es",
        "it",
        "pt",
        "nl",
        "sv",
        "da",
        "no",
        "fi",
        "pl",
        "cs",
        "sk",
        "hu",
        "ro",
        "tr",
        "ru",
        "uk",
        "el",
        "bg",
        "ja",
        "zh",
        "ko",
        "ar",
        "he",
        "hi",
        "id",
        "vi",
        "th",
    }
)
# Below this many letters a guess is noise: report it with no confidence.
MIN_LETTERS = 20

_FENCE_BLOCK = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"https?://\S+")
_MARKUP = re.compile(r"[#*_>|`~\-]+")

_lock = threading.Lock()
_identifier: Any = None


def _model() -> Any:
    """The py3langid identifier, loaded once per process (about 0.6 s)."""
    global _identifier
    with _lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier  # type: ignore[import-untyped]

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def plain_text(text: str) -> str:
    """Prose only: code, links' targets, URLs and markdown punctuation carry no language."""
    text = _FENCE_BLOCK.sub(" ", text)
    text = _INLINE_CODE.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub(" ", text)
    return _MARKUP.sub(" ", text)


# A Chinese or Japanese character carries about as much as a three-letter syllable group.
_DENSE_SCRIPT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def letter_count(text: str) -> int:
    """Letters, with CJK characters and Hangul syllables weighted 3."""
    return sum(3 if _DENSE_SCRIPT.match(ch) else 1 for ch in text if ch.isalpha())


def detect_language(text: str, *, candidates: Iterable[str] | None = None) -> tuple[str, float]:
    """ISO 639-1 code and confidence in [0, 1] of `text`'s language.

    Confidence is 0.0 when there are fewer than MIN_LETTERS letters of prose, so callers treat
    the result as undecidable. `candidates` adds languages to the common set ranked.
    """
    prose = plain_text(text)
    if letter_count(prose) < MIN_LETTERS:
        return "und", 0.0
    allowed = COMMON | set(candidates or ())
    ranked = [(lang, score) for lang, score in _model().rank(prose) if lang in allowed]
    total = sum(score for _, score in ranked)
    if not ranked or total <= 0:
        return "und", 0.0
    lang, score = ranked[0]
    return str(lang), float(score / total)
