"""Runaway generations: the loop rule fires on a model repeating itself and on nothing that a
real answer writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from salon.chat.loops import CHECK_EVERY, MIN_SPAN, LoopWatch, looping

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text",
    [
        "Here is the plan. " + "All work and no play makes Jack a dull boy. " * 30,
        "the " * 300,
        "\n" * MIN_SPAN,
        "Sure!" + "!" * MIN_SPAN,
        "1. Step one\n" + "- do it again\n" * 100,
    ],
)
def test_a_loop_at_the_end_is_one(text: str) -> None:
    assert looping(text)


@pytest.mark.parametrize(
    "text",
    [
        # real prose, code and markdown from this repository
        (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")[:4000],
        (REPO / "src" / "salon" / "chat" / "loops.py").read_text(encoding="utf-8"),
        # repetition that real answers contain
        "zeros = [" + "0, " * 300 + "0]",  # 900 characters of "0, "
        "RSS samples, MB: 215 " + "224 " * 250,  # a long run of one measured value
        "| a | b |\n|---|---|\n" + "".join(f"| row {i} | value {i * 7} |\n" for i in range(40)),
        "Chorus:\nWe will, we will rock you!\n" * 4,
        "-" * (MIN_SPAN - 1),
        "",
    ],
)
def test_real_answers_are_not_loops(text: str) -> None:
    assert not looping(text)


def test_the_watch_sees_a_loop_soon_after_it_is_certain_whatever_the_chunking() -> None:
    loop = "All work and no play makes Jack a dull boy. " * 80
    for size in (1, 7, 64, 500):
        watch = LoopWatch()
        fed = 0
        while fed < len(loop) and not watch.feed(loop[fed : fed + size]):
            fed += size
        assert watch.looping
        # certain at MIN_SPAN characters; seen within one check and one chunk after
        assert fed <= MIN_SPAN + CHECK_EVERY + size, (size, fed)


def test_the_watch_never_fires_on_a_long_real_text() -> None:
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    watch = LoopWatch()
    for start in range(0, len(text), 37):
        watch.feed(text[start : start + 37])
    assert not watch.looping
