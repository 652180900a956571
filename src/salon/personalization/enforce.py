"""Deterministic repairs of a streamed reply, applied before text is released to the user.

Text already released is never changed: a repair either rewrites text it still holds or
appends at the end. Holding is bounded and local:
- each line is held until its start is known (the first character that cannot belong to a
  markdown marker), so fences, headers and list items are recognised; then it streams;
- with "no emoji", a trailing run that may still be part of an emoji sequence (ZWJ joins,
  variation selectors, skin tones, keycaps) or the spaces around it;
- with a nickname, starting phrase or quotation: the first sentence (at most 200 characters);
- with a word bound: within the last `slack` words before the bound, the text after the last
  sentence end, so the reply can be cut back to a full sentence.

The output is a function of the input text alone, whatever its chunking, and each repair makes
the matching check in `checks.py` pass on the released text (stages below share its regexes).

Stages: lines (emoji, structure, fences) -> opening (nickname, starting phrase, opening quote)
-> word bound -> case -> end fixes at finish (emoji, closing phrase, closing quote).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from salon.personalization.checks import (
    EMOJI_PART_RE,
    EMOJI_PATTERN,
    EMOJI_RE,
    FENCE_RE,
    HEADER_RE,
    HR_RE,
    LANGUAGE_NAMES,
    LIST_RE,
    SENTENCE_END_RE,
    WORD_RE,
    CheckResult,
    Constraint,
    FenceState,
    count_words,
    find_emoji,
    is_structure_line,
    nickname_pattern,
    prose,
    split_code,
    strip_end,
)

Piece = tuple[str, bool]  # (text, is code)

# Kinds the enforcer repairs; the others can only be met by regenerating.
REPAIRABLE = frozenset(
    {
        "emoji_none",
        "emoji_some",
        "structure_none",
        "max_words",
        "nickname",
        "starts_with",
        "ends_with",
        "quotation",
        "lowercase",
        "uppercase",
    }
)
NEUTRAL_EMOJI = "🙂"
FIRST_SENTENCE_MAX = 200
# Characters a markdown line marker can consist of: a line whose start has only these is held.
_MARKER_CHARS = frozenset(" \t#-*+0123456789.)`~_")
# Emoji with the spaces around them. Stray selectors and joiners after one go too: left behind
# they could make an emoji of a plain symbol they now follow (❤ + U+FE0F).
_EMOJI_STRAYS = rf"(?:{EMOJI_PATTERN})[\ufe0f\u200d\u20e3]*"
_BLOB_RE = re.compile(rf"[ \t]*{_EMOJI_STRAYS}(?:[ \t]*{_EMOJI_STRAYS})*[ \t]*")
_NO_SPACE_BEFORE = frozenset(".,!?;:)]}…'\"”’")
_NO_SPACE_AFTER = frozenset("([{'\"“‘")
_GREETING_RE = re.compile(
    r"(\s*)(hi|hello|hey|bonjour|salut|hola|hallo|ciao|olá|ola)(?=[!,.])", re.IGNORECASE
)
# First words after which "<Nickname>, " reads better with the word lowercased.
_LOWERABLE = frozenset(
    {
        "sure",
        "yes",
        "no",
        "okay",
        "ok",
        "great",
        "absolutely",
        "certainly",
        "of",
        "here",
        "this",
        "that",
        "the",
        "it",
        "there",
        "thanks",
        "thank",
        "good",
        "well",
        "so",
        "let",
        "you",
        "your",
        "a",
        "an",
        "in",
        "to",
        "for",
        "what",
        "when",
        "glad",
        "happy",
    }
)


# --- stage 1: lines ----------------------------------------------------------------------------


def _holdable(ch: str) -> bool:
    """Could this character still be part of an emoji sequence or the spaces around one?"""
    return ch in " \t0123456789#*" or EMOJI_PART_RE.match(ch) is not None


class _Lines:
    """Rewrites prose lines (emoji, headers, list items); code blocks pass untouched."""

    def __init__(self, strip_emoji: bool, flatten: bool) -> None:
        self.strip_emoji = strip_emoji
        self.flatten = flatten
        self.fence = FenceState()
        self.raw = ""  # the current line as received
        self.done = 0  # raw characters already emitted
        self.kind: str | None = None  # line kind once its start is known
        self.out_line = ""
        self.emoji_removed = 0
        self.flattened = {"header": 0, "list": 0, "hr": 0}

    @property
    def held(self) -> int:
        return len(self.raw) - self.done

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        *complete, rest = text.split("\n")
        for part in complete:
            self.raw += part
            out += self._advance(line_end=True)
            out += self._end_line()
        self.raw += rest
        return out + self._advance(line_end=False)

    def finish(self) -> list[Piece]:
        if not self.raw and self.kind is None:
            return []
        out = self._advance(line_end=True)
        return out + self._close_punctuation()

    def _stable(self, line_end: bool) -> int:
        """How much of the raw line can be processed now without knowing what follows."""
        k = len(self.raw)
        if line_end or not self.strip_emoji:
            return k
        while k > self.done and _holdable(self.raw[k - 1]):
            k -= 1
        return k

    def _advance(self, line_end: bool) -> list[Piece]:
        if self.fence.open:  # inside a code block: release as received
            chunk, self.done = self.raw[self.done :], len(self.raw)
            self.out_line += chunk
            return [(chunk, True)] if chunk else []
        k = self._stable(line_end)
        if self.kind is None:
            return self._decide_head(k, line_end)
        # An opening fence line is cleaned like prose too: its head already was, and the
        # split point between head and rest depends on chunking.
        before = self.raw[self.done - 1] if self.done else "\n"
        chunk = self._clean(self.raw[self.done : k], before, line_end and k == len(self.raw))
        self.done = k
        self.out_line += chunk
        return [(chunk, self.kind == "fence")] if chunk else []

    def _decide_head(self, k: int, line_end: bool) -> list[Piece]:
        head = self._clean(self.raw[:k], "\n", line_end and k == len(self.raw), count=False)
        complete = line_end and k == len(self.raw)
        if not complete and all(ch in _MARKER_CHARS for ch in head):
            return []  # still could be a marker: hold
        self._clean(self.raw[:k], "\n", complete)  # count the emoji removed, once
        self.kind, text = self._rewrite_head(head, complete)
        self.done = k
        self.out_line = text
        return [(text, self.kind == "fence")] if text else []

    def _rewrite_head(self, head: str, complete: bool) -> tuple[str, str]:
        if FENCE_RE.match(head):
            return "fence", head
        if not self.flatten:
            return "prose", head
        if complete and HR_RE.match(head):
            self.flattened["hr"] += 1
            return "hr", ""
        kind = "prose"
        while match := HEADER_RE.match(head) or LIST_RE.match(head):
            kind = "header" if HEADER_RE.match(head) else "list"
            self.flattened[kind] += 1
            head = head[match.end() :]
        if kind != "prose":
            head = head.lstrip(" \t")  # indentation would make the rest a code block
            if FENCE_RE.match(head):
                return "fence", head
        return kind, head

    def _clean(self, text: str, before: str, line_end: bool, count: bool = True) -> str:
        """`text` without emoji, collapsing the spaces they leave."""
        if not self.strip_emoji:
            return text

        def replace(m: re.Match[str]) -> str:
            if count:
                self.emoji_removed += len(EMOJI_RE.findall(m.group()))
            start, end = m.span()
            prev = text[start - 1] if start else before
            nxt = text[end] if end < len(text) else ("\n" if line_end else "")
            if prev in "\n" or nxt in "\n":  # line start or end ("" is in every string)
                return ""
            spaced = m.group()[0] in " \t" or m.group()[-1] in " \t"
            if spaced and nxt not in _NO_SPACE_BEFORE and prev not in _NO_SPACE_AFTER:
                return " "
            return ""

        return _BLOB_RE.sub(replace, text)

    def _close_punctuation(self) -> list[Piece]:
        """A flattened header or item becomes a sentence: end it with ':' or '.'."""
        if self.kind not in ("header", "list") or not self.out_line.strip():
            return []
        if self.out_line.rstrip()[-1] in ".!?:;…。！？":
            return []
        mark = ":" if self.kind == "header" else "."
        if is_structure_line(self.out_line + mark):
            return []  # "- " + ":" would be a list item again
        self.out_line += mark
        return [(mark, False)]

    def _end_line(self) -> list[Piece]:
        out = self._close_punctuation()
        code = self.fence.step(self.out_line)
        self.raw, self.done, self.kind, self.out_line = "", 0, None, ""
        return [*out, ("\n", code)]


# --- stage 2: the opening ------------------------------------------------------------------------


def _merge(pieces: Sequence[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind joined (chunking-independent runs)."""
    out: list[Piece] = []
    for text, code in pieces:
        if out and out[-1][1] == code:
            out[-1] = (out[-1][0] + text, code)
        elif text:
            out.append((text, code))
    return out


@dataclass(slots=True)
class _Opening:
    """Holds the first sentence to make the reply open as asked."""

    nickname: str | None
    starts_with: str | None
    quotation: bool
    held: list[Piece]
    decided: bool
    fixes: list[str]

    def feed(self, pieces: list[Piece], final: bool = False) -> list[Piece]:
        if self.decided:
            return pieces
        self.held = _merge(self.held + pieces)
        if not self.held:
            if not final:
                return []
            self.held = [("", False)]  # an empty reply still opens as asked
        window = self._window(final)
        if window is None:
            return []
        self.decided = True
        held, self.held = self.held, []
        return self._open(held, window)

    @property
    def held_chars(self) -> int:
        return sum(len(t) for t, _ in self.held)

    def _window(self, final: bool) -> str | None:
        """The first sentence, once it is known."""
        text, code = self.held[0]
        if code:
            return ""
        lead = len(text) - len(text.lstrip())  # blank lines before the first line
        ends = [lead + FIRST_SENTENCE_MAX]
        if "\n" in text[lead:]:
            ends.append(text.index("\n", lead))
        if m := SENTENCE_END_RE.search(text, lead):
            ends.append(m.end())
        end = min(ends)
        if end < len(text) or len(self.held) > 1 or final:
            return text[lead:end]
        return None

    def _open(self, held: list[Piece], window: str) -> list[Piece]:
        first, code = held[0]
        # Stage 1 releases a line only once its start is known, so these see whole markers.
        line = first.lstrip().split("\n", 1)[0]
        block = code or (not first.strip() and len(held) > 1)
        block = block or bool(HEADER_RE.match(line) or LIST_RE.match(line) or FENCE_RE.match(line))
        block = block or line.startswith((">", "|"))
        prefix = ""
        if self.nickname and not nickname_pattern(self.nickname).search(window):
            self.fixes.append(f"addressed you as {self.nickname}")
            if block:
                prefix = f"{self.nickname},\n\n"
            elif greeting := _GREETING_RE.match(first):
                first = f"{first[: greeting.end()]} {self.nickname}{first[greeting.end() :]}"
            else:
                prefix = f"{self.nickname}, "
                first = _lower_opener(first)
        if self.starts_with and not _starts(prefix + first, self.starts_with):
            self.fixes.append(f'added "{self.starts_with}" at the start')
            prefix = self.starts_with + ("\n\n" if block else " ") + prefix
        if self.quotation and not (prefix + first).lstrip().startswith('"'):
            prefix = '"' + ("\n" if block and not prefix else "") + prefix
        return _merge([(prefix, False), (first, code), *held[1:]])


def _starts(text: str, phrase: str) -> bool:
    return text.lstrip().lstrip("\"“'#*_> \t\n").lower().startswith(phrase.strip().lower())


def _lower_opener(text: str) -> str:
    m = re.match(r"(\s*)([A-Z][a-z]*)\b", text)
    if m and m.group(2).lower() in _LOWERABLE:
        return text[: m.start(2)] + text[m.start(2)].lower() + text[m.start(2) + 1 :]
    return text


# --- stage 3: the word bound ---------------------------------------------------------------------


def _split(pieces: list[Piece], at: int) -> tuple[list[Piece], list[Piece]]:
    head: list[Piece] = []
    tail: list[Piece] = []
    seen = 0
    for text, code in pieces:
        if seen + len(text) <= at:
            head.append((text, code))
        elif seen >= at:
            tail.append((text, code))
        else:
            head.append((text[: at - seen], code))
            tail.append((text[at - seen :], code))
        seen += len(text)
    return head, tail


def _cut_points(masked: str) -> list[int]:
    """Where the reply may end cleanly: after a sentence, or at a line end."""
    points = [m.end() for m in SENTENCE_END_RE.finditer(masked)]
    points += [i for i, ch in enumerate(masked) if ch == "\n"]
    return sorted(points)


_WORD_TAILS = frozenset({"", "'", "’", "-"})


class _WordBound:
    """Stops at `bound` prose words, cutting back to a sentence end in the last `slack`."""

    def __init__(self, bound: int) -> None:
        self.bound = max(1, bound)
        self.slack = min(40, self.bound // 2)
        self.held: list[Piece] = []
        self.words_out = 0
        self.clean_point = False  # the release point is itself a clean cut
        self.cut = False

    @property
    def held_chars(self) -> int:
        return sum(len(t) for t, _ in self.held)

    def feed(self, pieces: list[Piece], final: bool = False) -> list[Piece]:
        self.held = _merge(self.held + pieces)
        # Code is not counted: blank it (keeping positions) for word and cut-point search.
        masked = "".join(" " * len(t) if code else t for t, code in self.held)
        words = list(WORD_RE.finditer(masked))
        if self.words_out + len(words) > self.bound:
            return self._cut(masked, words)
        # The last word may still grow: "the" + "'s", "well" + "-known", 你 + 好.
        partial = not final and bool(words) and masked[words[-1].end() :] in _WORD_TAILS
        complete = words[:-1] if partial else words
        limit = len(masked) if final else (words[-1].start() if partial else len(masked))
        free = self.bound - self.slack - self.words_out  # words that can go out unheld
        if final:
            release = limit
        elif free >= 1:
            release = complete[free - 1].end() if len(complete) >= free else limit
        else:
            release = 0
        points = [p for p in _cut_points(masked[:limit]) if p > 0]
        if points and points[-1] >= release:
            release, self.clean_point = points[-1], True
        elif release > 0:
            self.clean_point = False
        self.words_out += sum(1 for w in words if w.end() <= release)
        out, self.held = _split(self.held, release)
        return out

    def _cut(self, masked: str, words: list[re.Match[str]]) -> list[Piece]:
        inside = self.bound - self.words_out  # held words within the bound
        next_start = words[inside].start()
        first_allowed = self.bound - self.slack - self.words_out
        low = words[first_allowed - 1].end() if first_allowed >= 1 else 0
        points = [p for p in _cut_points(masked[:next_start]) if p >= low and p > 0]
        self.cut = True
        if points:
            out, _ = _split(self.held, points[-1])
        elif low == 0 and self.clean_point:
            out = []
        else:
            out, _ = _split(self.held, words[inside - 1].end() if inside else 0)
            out.append(("…", False))
        self.held = []
        return out


# --- the enforcer --------------------------------------------------------------------------------


class StreamEnforcer:
    """Applies the deterministic repairs for `constraints` to a streamed reply."""

    def __init__(self, constraints: Sequence[Constraint]) -> None:
        kinds = {c.kind: c for c in constraints}
        self._kinds = kinds
        self._lines = _Lines("emoji_none" in kinds, "structure_none" in kinds)
        self._opening = _Opening(
            nickname=_value(kinds, "nickname"),
            starts_with=_value(kinds, "starts_with"),
            quotation="quotation" in kinds,
            held=[],
            decided=not ({"nickname", "starts_with", "quotation"} & kinds.keys()),
            fixes=[],
        )
        self._end_phrase = _value(kinds, "ends_with")
        reserve = count_words(self._end_phrase or "")
        bound = kinds.get("max_words")
        self._bound = _WordBound(int(bound.value or 0) - reserve) if bound else None
        self._case = "lower" if "lowercase" in kinds else "upper" if "uppercase" in kinds else ""
        self._released = ""
        self._end_fixes: list[str] = []
        self._finished = False

    @property
    def done(self) -> bool:
        return self._bound is not None and self._bound.cut

    @property
    def hold_chars(self) -> int:
        held = self._lines.held + self._opening.held_chars
        return held + (self._bound.held_chars if self._bound else 0)

    @property
    def fixes(self) -> list[str]:
        out = []
        if self._lines.emoji_removed:
            out.append(f"removed {self._lines.emoji_removed} emoji")
        for kind, label in (("list", "list items"), ("header", "headers"), ("hr", "rules")):
            if n := self._lines.flattened[kind]:
                out.append(f"flattened {n} {label}")
        out += self._opening.fixes
        if self.done and self._bound:
            out.append(f"cut at {self._bound.bound} words")
        if self._case and self._released:
            out.append(f"{self._case}cased")
        return out + self._end_fixes

    def feed(self, text: str) -> str:
        if self.done or self._finished:
            return ""
        return self._release(self._opening.feed(self._lines.feed(text)), final=False)

    def finish(self) -> str:
        if self._finished:
            return ""
        self._finished = True
        out = ""
        if not self.done:
            pieces = self._opening.feed(self._lines.feed(""))
            pieces += self._opening.feed(self._lines.finish(), final=True)
            out = self._release(pieces, final=True)
        return out + self._emit([(self._end_additions(), False)])

    def _release(self, pieces: list[Piece], final: bool) -> str:
        if self._bound is not None:
            pieces = self._bound.feed(pieces, final=final)
        return self._emit(pieces)

    def _emit(self, pieces: list[Piece]) -> str:
        text = "".join(_recase(t, self._case) if not code else t for t, code in pieces)
        self._released += text
        return text

    def _end_additions(self) -> str:
        """Appended at the end: a closed fence, an emoji, the closing phrase, the quote."""
        text = self._released
        lines = list(split_code(text))
        fence = FenceState()
        for line, _ in lines:
            fence.step(line)
        need_emoji = "emoji_some" in self._kinds and not find_emoji(prose(text))
        phrase = self._end_phrase
        need_phrase = bool(phrase) and not strip_end(text).lower().endswith(
            (phrase or "").strip().lower()
        )
        if need_emoji and phrase and not need_phrase:
            need_emoji = False  # the phrase must stay last; regeneration can add the emoji
        need_quote = "quotation" in self._kinds
        add = ""
        if fence.open and (need_emoji or need_phrase or need_quote):
            add += f"\n{fence.marker}"
            self._end_fixes.append("closed the code block")
        last_is_code = bool(add) or (bool(lines) and lines[-1][1] and bool(lines[-1][0]))
        if need_emoji:
            sep = "\n\n" if last_is_code else "" if not text or text.endswith("\n") else " "
            add += sep + NEUTRAL_EMOJI
            last_is_code = False
            self._end_fixes.append("added an emoji")
        if need_phrase and phrase:
            add += ("\n\n" if (text + add).strip() else "") + phrase
            last_is_code = False
            self._end_fixes.append(f'added "{phrase}" at the end')
        if need_quote:
            whole = (text + add).strip()
            if len(whole) < 2 or not whole.endswith('"'):
                add += ("\n" if last_is_code else "") + '"'
                self._end_fixes.append("wrapped in quotes")
        return add


def _value(kinds: dict[str, Constraint], kind: str) -> str | None:
    c = kinds.get(kind)
    return str(c.value).strip() if c is not None and c.value is not None else None


def _recase(text: str, case: str) -> str:
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    return text


# --- regeneration --------------------------------------------------------------------------------


def needs_regeneration(results: Sequence[CheckResult]) -> list[CheckResult]:
    """Failed checks that no deterministic repair can fix (language, forbidden words...)."""
    return [r for r in results if not r.passed and r.constraint.kind not in REPAIRABLE]


_MUST = {
    "structure_some": "organise it with markdown headers or bullet lists",
    "min_words": "be at least {v} words long",
    "max_sentences": "be at most {v} sentences long",
    "language": "be written entirely in {lang} (translate it)",
    "forbidden_word": 'not contain the word "{v}" in any form',
    "include_word": 'contain the word "{v}"',
    "ends_with_question": (
        "end with a question to the user: its very last sentence must be a question that "
        'ends with "?"'
    ),
    "formal": "use a formal register: no contractions and no slang",
    "casual": "use a casual, conversational register with contractions",
    "no_commas": "contain no commas at all",
    "placeholders": "contain at least {v} placeholders in square brackets, like [name]",
    "postscript": 'end with a postscript starting with "{v}"',
    "json": "be valid JSON only, with no text outside it",
}


def repair_instruction(failed: Sequence[CheckResult]) -> str:
    """One plain-English instruction for a constrained regeneration."""
    musts = []
    for result in failed:
        c = result.constraint
        template = _MUST.get(c.kind)
        if template is None:
            musts.append(c.describe())
            continue
        musts.append(template.format(v=c.value, lang=_language(c.value)))
    if not musts:
        return ""
    rules = "; ".join(musts)
    return (
        "Rewrite your previous reply. Keep its content and meaning, but the reply must "
        f"{rules}. Reply with the rewritten answer only."
    )


def _language(code: object) -> str:
    return LANGUAGE_NAMES.get(str(code), str(code))
