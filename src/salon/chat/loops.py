"""Runaway generations: a small model sometimes falls into a loop, writing the same stretch
of text again and again until its context is full (minutes on a CPU). A chat answer that ends
in such a loop is stopped and marked, so the user sees why and can regenerate.

The rule is deliberately strict, so that no real answer trips it: the last `MIN_SPAN`
characters or more are one stretch of 1 to `MAX_PERIOD` characters repeated `MIN_REPEATS`
times or more, back to back. A list of sixteen zeros, a table with repeated separators or a
refrain sung four times does not qualify; "the the the …" over 1,200 characters does.
"""

from __future__ import annotations

# 1,200 characters: a real answer may hold a few hundred of one repeated thing (a run of
# identical numbers in a memory log: 456 characters of "224 " in docs/benchmarks.md); a
# model in a loop goes on for thousands, so waiting this long costs a few seconds at most.
MIN_SPAN = 1200
MIN_REPEATS = 8
MAX_PERIOD = 200
# The longest tail the rule ever reads, and how often (in new characters) it is checked.
WINDOW = max(MIN_SPAN, MAX_PERIOD * MIN_REPEATS) + MAX_PERIOD
CHECK_EVERY = 64


def looping(text: str) -> bool:
    """Whether `text` ends in a loop (see the module doc)."""
    for period in range(1, MAX_PERIOD + 1):
        span = max(MIN_SPAN, period * MIN_REPEATS)
        if len(text) < span:
            break  # longer periods need longer spans still
        tail = text[-span:]
        if tail[period:] == tail[:-period]:
            return True
    return False


class LoopWatch:
    """Fed the generated text as it arrives; `looping` once the answer has fallen into a
    loop. Keeps only the last `WINDOW` characters and checks every `CHECK_EVERY` new ones."""

    def __init__(self) -> None:
        self._tail = ""
        self._unchecked = 0
        self.looping = False

    def feed(self, text: str) -> bool:
        if self.looping or not text:
            return self.looping
        self._tail = (self._tail + text)[-WINDOW:]
        self._unchecked += len(text)
        if self._unchecked >= CHECK_EVERY:
            self._unchecked = 0
            self.looping = looping(self._tail)
        return self.looping
