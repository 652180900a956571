"""The stream enforcer: same output whatever the chunking, and its repairs pass the checks."""

from __future__ import annotations

import random

import pytest

from salon.personalization.checks import CheckResult, Constraint, check_reply
from salon.personalization.enforce import (
    REPAIRABLE,
    StreamEnforcer,
    needs_regeneration,
    repair_instruction,
)

REPLIES = [
    # headers, lists, emoji of every shape, a code block with emoji and list-like lines
    "## Overview 🎉\nSure! Here is what you need 🚀 to know.\n\n"
    "- First point 👍🏽\n- Second point ❤️\n  - nested 👨‍👩‍👧 item\n1. Numbered **one**\n"
    "2) Second 🇫🇷!\n\n```python\nprint('hi 🎉')\n- not a list\n# comment\n```\n"
    "Great job 🎉! That is all for today. 1️⃣ Keycap line.\n\n---\n\nBye 👋",
    # prose with emoji at line starts and ends, trailing emoji without newline
    "🙂 Hello there! I can help with that.\nThe answer is 42 ✅\nDone ✨✨",
    # an unterminated code block at the end
    "Here is the script:\n\n```bash\necho 'hi 🎉'\nls -la\n",
    # long prose with several sentences, to exercise the word bound
    " ".join(
        f"Sentence number {i} talks about topic {i} in a calm and even tone." for i in range(1, 30)
    ),
    # a reply that opens with a list
    "* apples 🍎\n* pears\n\nThat's the list. Anything else?",
    # CJK and numbers, hr and headers without space
    "#hashtag is not a header\n-5 degrees is cold\n2.5 kg of flour\n***\n你好。世界！",
    # empty and whitespace-only edges
    "",
    "\n\n",
]

CONSTRAINT_SETS = [
    [Constraint("emoji_none", None, "characteristics")],
    [Constraint("structure_none", None, "characteristics")],
    [
        Constraint("emoji_none", None, "characteristics"),
        Constraint("structure_none", None, "characteristics"),
        Constraint("nickname", "Sam", "nickname"),
        Constraint("max_words", 60, "length"),
    ],
    [Constraint("emoji_some", None, "characteristics"), Constraint("max_words", 25, "message")],
    [
        Constraint("nickname", "Ana", "nickname"),
        Constraint("lowercase", None, "message"),
        Constraint("ends_with", "Any other questions?", "message"),
    ],
    [
        Constraint("quotation", None, "message"),
        Constraint("starts_with", "Well", "message"),
        Constraint("emoji_some", None, "characteristics"),
    ],
]


def run(constraints: list[Constraint], chunks: list[str]) -> tuple[str, StreamEnforcer]:
    enforcer = StreamEnforcer(constraints)
    out = []
    for chunk in chunks:
        out.append(enforcer.feed(chunk))
        if enforcer.done:
            break
    out.append(enforcer.finish())
    return "".join(out), enforcer


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(1, 12)
        chunks.append(text[i : i + n])
        i += n
    return chunks


def repairable_results(reply: str, constraints: list[Constraint]) -> list[CheckResult]:
    return [r for r in check_reply(reply, constraints) if r.constraint.kind in REPAIRABLE]


@pytest.mark.parametrize(
    "constraints", CONSTRAINT_SETS, ids=lambda cs: "+".join(c.kind for c in cs)
)
def test_output_is_independent_of_chunking_and_passes_checks(
    constraints: list[Constraint],
) -> None:
    rng = random.Random(7)
    for reply in REPLIES:
        whole, _ = run(constraints, [reply])
        for chunks in [list(reply)] + [random_chunks(reply, rng) for _ in range(6)]:
            assert run(constraints, chunks)[0] == whole, chunks
        failed = [r for r in repairable_results(whole, constraints) if not r.passed]
        assert failed == [], (whole, failed)


TOKENS = [
    "word", "Hello", "Sam", " ", " ", "\n", "\n\n", "- ", "* ", "1. ", "2) ", "## ", "#",
    "```", "```py", "~~~", "---", "🎉", "👍🏽", "👨‍👩‍👧", "❤️", "❤", "🇫🇷", "1️⃣", "\ufe0f",
    "\u200d", ". ", "! ", "? ", ",", "…", "。", "你好", "\t", "|a|b|", "> ", "42", "e.g.",
    "'", '"', "**", "well-", "known", "’s",
]  # fmt: skip


def test_random_markdown_soup_is_chunking_independent_and_repaired() -> None:
    """Fuzz: token soup with every marker and emoji shape, random constraint sets."""
    rng = random.Random(2024)
    for _ in range(150):
        reply = "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 40)))
        constraints = [*rng.choice(CONSTRAINT_SETS), Constraint("max_words", 9, "message")]
        whole, _ = run(constraints, [reply])
        assert run(constraints, random_chunks(reply, rng))[0] == whole, reply
        failed = [r for r in repairable_results(whole, constraints) if not r.passed]
        assert failed == [], (reply, whole, failed)


def test_every_split_point_gives_the_same_output() -> None:
    constraints = CONSTRAINT_SETS[2]
    reply = REPLIES[0]
    whole, _ = run(constraints, [reply])
    for i in range(len(reply) + 1):
        assert run(constraints, [reply[:i], reply[i:]])[0] == whole, i


def test_released_text_is_never_taken_back() -> None:
    """Whatever feed() returned is a prefix of the final text, at every step."""
    enforcer = StreamEnforcer(CONSTRAINT_SETS[2])
    released = ""
    for ch in REPLIES[0]:
        released += enforcer.feed(ch)
        assert enforcer.hold_chars <= 250
    final = released + enforcer.finish()
    assert final.startswith(released)


def test_emoji_removal_tidies_spaces_and_keeps_code() -> None:
    out, enforcer = run(CONSTRAINT_SETS[0], [REPLIES[1]])
    assert out == "Hello there! I can help with that.\nThe answer is 42\nDone"
    assert enforcer.fixes == ["removed 4 emoji"]
    out, _ = run(CONSTRAINT_SETS[0], ["Great job 🎉! Say I ❤️ you.\n```\nx = '🎉'\n```"])
    assert out == "Great job! Say I you.\n```\nx = '🎉'\n```"


def test_structure_is_flattened_into_prose_lines() -> None:
    out, enforcer = run(CONSTRAINT_SETS[1], ["## Plan\n- buy eggs\n  1. two dozen\n* bake: now\n"])
    assert out == "Plan:\nbuy eggs.\ntwo dozen.\nbake: now.\n"
    assert enforcer.fixes == ["flattened 3 list items", "flattened 1 headers"]


def test_word_bound_cuts_back_to_a_sentence_end_and_stops() -> None:
    constraints = [Constraint("max_words", 30, "length")]
    enforcer = StreamEnforcer(constraints)
    out = ""
    fed = 0
    for word in REPLIES[3].split(" "):
        out += enforcer.feed(word + " ")
        fed += 1
        if enforcer.done:
            break
    out += enforcer.finish()
    assert enforcer.done and fed < 40
    assert out.endswith("tone.") and len(out.split()) <= 30
    assert "cut at 30 words" in enforcer.fixes


def test_word_bound_without_sentence_end_cuts_hard() -> None:
    out, enforcer = run([Constraint("max_words", 10, "message")], ["word " * 30])
    assert out == ("word " * 10).rstrip() + "…"
    assert enforcer.done


def test_nickname_is_added_once_to_the_first_sentence() -> None:
    nick = [Constraint("nickname", "Sam", "nickname")]
    assert run(nick, ["Sure! Here it is."])[0] == "Sam, sure! Here it is."
    assert run(nick, ["Hello! How are you?"])[0] == "Hello Sam! How are you?"
    assert run(nick, ["Right, Sam. Go."])[0] == "Right, Sam. Go."
    assert run(nick, ["## Title\ntext"])[0] == "Sam,\n\n## Title\ntext"
    assert run(nick, ["I think so."])[0] == "Sam, I think so."


def test_end_fixes_are_appended_after_code() -> None:
    out, enforcer = run(CONSTRAINT_SETS[3], [REPLIES[2]])
    assert out.endswith("```\n\n🙂")
    assert "closed the code block" in enforcer.fixes
    out, _ = run(CONSTRAINT_SETS[4], ["Hi there. Any other questions?"])
    assert out == "ana, hi there. any other questions?"


def test_quotation_and_start_phrase() -> None:
    out, _ = run(CONSTRAINT_SETS[5], ["Yes, that works 🙂"])
    assert out == '"Well Yes, that works 🙂"'


def test_needs_regeneration_and_instruction() -> None:
    constraints = [
        Constraint("emoji_none", None, "characteristics"),
        Constraint("language", "fr", "message"),
        Constraint("forbidden_word", "delve", "instructions"),
        Constraint("ends_with_question", None, "instructions"),
    ]
    reply = "Let us delve into this topic 🎉. It is a long English sentence about many things."
    results = check_reply(reply, constraints)
    failed = needs_regeneration(results)
    assert [r.constraint.kind for r in failed] == [
        "language",
        "forbidden_word",
        "ends_with_question",
    ]
    instruction = repair_instruction(failed)
    assert "written entirely in French" in instruction
    assert 'not contain the word "delve"' in instruction
    assert "end with a question" in instruction
    assert repair_instruction([]) == ""
