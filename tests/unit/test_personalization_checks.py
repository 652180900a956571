"""Constraints from settings and free text, and the code checks on real-looking replies."""

from __future__ import annotations

import pytest

from salon.personalization.checks import (
    KINDS,
    CheckResult,
    Constraint,
    check_reply,
    count_words,
    derive_constraints,
    find_emoji,
)
from salon.personalization.language import detect_language
from salon.personalization.profile import AboutYou, Characteristics, Effective, Length, Level


def effective(
    *,
    emoji: Level = "default",
    headers_lists: Level = "default",
    length: Length = "default",
    nickname: str = "",
    how: str = "",
) -> Effective:
    return Effective(
        personality="default",
        personality_text="",
        characteristics=Characteristics(emoji=emoji, headers_lists=headers_lists),
        length=length,
        about=AboutYou(nickname=nickname),
        how_to_respond=how,
        sources={},
    )


def kinds(constraints: list[Constraint]) -> dict[str, str | int | None]:
    return {c.kind: c.value for c in constraints}


def check(reply: str, kind: str, value: str | int | None = None) -> CheckResult:
    return check_reply(reply, [Constraint(kind, value, "message")])[0]


# --- derive_constraints -----------------------------------------------------------------------


def test_characteristics_and_length_map_to_constraints() -> None:
    got = derive_constraints(
        effective(emoji="less", headers_lists="more", length="concise", nickname="Sam"), ""
    )
    assert kinds(got) == {
        "emoji_none": None,
        "structure_some": 80,
        "max_words": 150,
        "nickname": "Sam",
    }
    got = derive_constraints(effective(emoji="more", headers_lists="less", length="detailed"), "")
    assert kinds(got) == {"emoji_some": None, "structure_none": None, "min_words": 120}


def test_default_settings_give_no_constraints() -> None:
    assert derive_constraints(effective(), "What is the capital of France?") == []


def test_message_overrides_stored_settings_of_the_same_family() -> None:
    stored = effective(headers_lists="less", length="concise", emoji="less")
    got = kinds(derive_constraints(stored, "Use a bulleted list and answer in 300 words."))
    assert got["structure_some"] == 0
    assert "structure_none" not in got
    assert (got["min_words"], got["max_words"]) == (240, 360)
    assert got["emoji_none"] is None  # untouched family stays


def test_instructions_beat_characteristics_and_length() -> None:
    stored = effective(
        emoji="more", length="concise", how="No emoji please. Keep answers under 50 words."
    )
    got = derive_constraints(stored, "")
    assert kinds(got) == {"emoji_none": None, "max_words": 49}
    assert {c.source for c in got} == {"instructions"}


def test_personality_bound_tighter_than_concise_is_kept() -> None:
    got = derive_constraints(
        effective(length="concise"), "", personality_constraints={"max_words": 120}
    )
    assert kinds(got) == {"max_words": 120}
    got = derive_constraints(
        effective(length="detailed"), "", personality_constraints={"max_words": 100}
    )
    assert kinds(got) == {"min_words": 120}  # the user's own length picker wins


def test_personality_constraints_from_presets() -> None:
    got = derive_constraints(
        effective(), "", personality_constraints={"emoji": "none", "register": "formal"}
    )
    assert kinds(got) == {"emoji_none": None, "formal": None}
    assert {c.source for c in got} == {"personality"}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Answer in French please", {"language": "fr"}),
        ("Réponds en français, s'il te plaît", {"language": "fr"}),
        ("Bitte antworte auf Deutsch", {"language": "de"}),
        ("Your ENTIRE response should be in Hindi language.", {"language": "hi"}),
        ("Translate this paragraph into Spanish: hello", {"language": "es"}),
        ("How do you say 'cat' in French?", {}),
        ("Never use the word 'delve'.", {"forbidden_word": "delve"}),
        ("don't say sorry.", {"forbidden_word": "sorry"}),
        ("Don't say that you are an AI", {}),
        ("Keep answers under 100 words", {"max_words": 99}),
        ("at most 60 words", {"max_words": 60}),
        ("Write at least 300 words about cats", {"min_words": 300}),
        ("Write a 300+ word summary", {"min_words": 300}),
        ("Explain it in 3 sentences or fewer", {"max_sentences": 3}),
        ("answer in one sentence", {"max_sentences": 1}),
        ("Always end with a question", {"ends_with_question": None}),
        ("no emoji", {"emoji_none": None}),
        ("Please add some emojis!", {"emoji_some": None}),
        ("Use bullet points", {"structure_some": 0}),
        ("Don't use bullet points or headers", {"structure_none": None}),
        ("Be formal.", {"formal": None}),
        ("keep it casual", {"casual": None}),
        ("Reply in all lowercase letters", {"lowercase": None}),
        ("Respond in all capital letters", {"uppercase": None}),
        ("You are not allowed to use any commas in your response.", {"no_commas": None}),
        ('Start your response with "Well"', {"starts_with": "Well"}),
        (
            'Finish your response with this exact phrase "Any other questions?".',
            {"ends_with": "Any other questions?"},
        ),
        ("Wrap your entire response with double quotation marks.", {"quotation": None}),
        ("Include at least 3 placeholders such as [name].", {"placeholders": 3}),
        ("Answer in JSON format", {"json": None}),
        ("Use only Korean in your response.", {"language": "ko"}),
        ("No other language except Vietnamese is allowed.", {"language": "vi"}),
        ("At least 5 words in the output should be in all caps.", {}),
        ("Use words with all capital letters to highlight key abilities.", {}),
    ],
)
def test_message_phrasings(message: str, expected: dict[str, str | int | None]) -> None:
    assert kinds(derive_constraints(effective(), message)) == expected


def test_nickname_from_how_to_respond_beats_the_field() -> None:
    got = derive_constraints(effective(nickname="Samuel", how="Call me Sam."), "")
    assert kinds(got) == {"nickname": "Sam"}


def test_forbidden_word_lists_and_message_override() -> None:
    got = derive_constraints(effective(how='Do not include keywords "rich", "wealth"'), "")
    assert sorted(str(c.value) for c in got) == ["rich", "wealth"]
    got = derive_constraints(effective(how="Never use the word rich"), "Include the word rich")
    assert kinds(got) == {"include_word": "rich"}


def test_never_two_contradicting_constraints_of_one_family() -> None:
    got = derive_constraints(
        effective(emoji="less", headers_lists="less", length="concise"),
        "Use lots of emojis, use bullet points, be casual, and write at least 400 words.",
    )
    families = [
        {"emoji_none", "emoji_some"},
        {"structure_none", "structure_some"},
        {"formal", "casual"},
        {"lowercase", "uppercase"},
    ]
    present = {c.kind for c in got}
    assert all(len(family & present) <= 1 for family in families)
    values = kinds(got)
    assert values.get("min_words") == 400 and "max_words" not in values


def test_every_kind_describes_itself() -> None:
    for kind in KINDS:
        assert Constraint(kind, 3 if "words" in kind else "fr", "message").describe()
    assert Constraint("max_words", 120, "length").describe() == "at most 120 words"
    assert Constraint("language", "fr", "message").describe() == "in French"
    assert Constraint("nickname", "Sam", "nickname").describe() == "address you as Sam"


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown constraint kind"):
        Constraint("max_wordz", 3, "message")


# --- checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "emoji",
    ["🎉", "👍🏽", "👨‍👩‍👧", "❤️", "🇫🇷", "1️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "☕", "🧑🏻‍💻", "✅"],
)
def test_emoji_are_found_including_sequences(emoji: str) -> None:
    assert find_emoji(f"Done {emoji} now") == [emoji]
    assert not check(f"Done {emoji}", "emoji_none").passed


def test_typographic_symbols_are_not_emoji() -> None:
    assert find_emoji("a → b, ✓ done, © 2024 ACME™, ★ rating, ❤ plain heart") == []


def test_emoji_in_code_blocks_are_ignored() -> None:
    reply = "Here:\n```python\nprint('🎉')\n```\nDone."
    assert check(reply, "emoji_none").passed
    assert not check(reply, "emoji_some").passed


def test_structure_checks() -> None:
    listy = "Steps:\n\n1. Install it\n2. Run it\n\n## Notes\nAll good."
    assert check(listy, "structure_none").detail == "3 header or list lines"
    assert check("Line one\n-5 degrees is cold\n#hashtag\n2.5 kg of flour", "structure_none").passed
    assert check("```\n- not a list\n# comment\n```", "structure_none").passed
    long_prose = "word " * 100
    assert not check(long_prose, "structure_some", 80).passed
    assert check("word " * 50, "structure_some", 80).passed
    assert check(long_prose + "\n- item", "structure_some", 80).passed


def test_word_counting() -> None:
    assert count_words("Don't panic — it's a well-known e-mail trick!") == 7
    # Markdown punctuation is not a word; a link target is (counted as the stream sees it).
    assert count_words("**Bold** and `code` and [link](http://x.y)") == 8
    assert count_words("你好世界") == 2
    reply = "One two three.\n```\nmany words in code do not count\n```"
    assert check(reply, "max_words", 3).passed
    assert check(reply, "max_words", 2).detail == "3 words > 2"
    assert check(reply, "min_words", 4).detail == "3 words < 4"


def test_forbidden_word_whole_word_with_inflections() -> None:
    assert not check("We delved into it.", "forbidden_word", "delve").passed
    assert not check("Delving deeper", "forbidden_word", "delve").passed
    assert not check("Two CATS", "forbidden_word", "cat").passed
    assert check("A category of concatenation", "forbidden_word", "cat").passed
    assert not check("it is a no-brainer", "forbidden_word", "no-brainer").passed


def test_nickname_and_edges() -> None:
    assert check("Sure, sam: here you go.", "nickname", "Sam").passed
    assert not check("Samuel, here you go.", "nickname", "Sam").passed
    assert check("Done. What do you think?", "ends_with_question").passed
    assert check("Done. ¿Qué opinas? 🙂", "ends_with_question").passed
    assert check("好的。你觉得呢？", "ends_with_question").passed
    assert not check("Want more? Here it is.", "ends_with_question").passed
    assert check('"Well, yes."', "starts_with", "Well").passed
    assert check("Great.\n\nAny other questions?", "ends_with", "Any other questions?").passed
    assert check('"quoted reply"', "quotation").passed
    assert not check('"half quoted', "quotation").passed


def test_register_case_commas_and_extras() -> None:
    assert not check("I don't think it's gonna work.", "formal").passed
    assert check("I do not believe it will work; John's plan is sound.", "formal").passed
    assert check("all lower case here\n```\nCODE\n```", "lowercase").passed
    assert not check("Not all lower", "lowercase").passed
    assert check("ALL CAPS 123", "uppercase").passed
    assert not check("a, b", "no_commas").passed
    assert check("Dear [name], at [address] on [date]", "placeholders", 3).passed
    assert check("Bye.\n\nP.S. see you", "postscript", "P.S.").passed
    assert check('```json\n{"a": 1}\n```', "json").passed
    assert not check("Sure! {}", "json").passed


SAMPLES = {
    "en": "Sure, here is a quick summary of the main points you asked about yesterday.",
    "fr": "Bien sûr, voici un résumé rapide des points principaux que vous avez demandés.",
    "de": "Klar, hier ist eine kurze Zusammenfassung der wichtigsten Punkte, die du wolltest.",
    "es": "Claro, aquí tienes un resumen rápido de los puntos principales que pediste.",
    "ja": "もちろん、昨日お尋ねになった主なポイントの簡単な要約をお伝えします。",
    "zh": "当然，这是你昨天问到的主要内容的简要总结，希望对你有帮助。",
    "ru": "Конечно, вот краткое изложение основных моментов, о которых вы спрашивали.",
}


@pytest.mark.parametrize(("lang", "text"), SAMPLES.items())
def test_language_detection(lang: str, text: str) -> None:
    code, confidence = detect_language(
        f"## Résumé\n\n{text}\n\n```python\nprint('hello world')\n```"
    )
    assert code == lang and confidence > 0.5


def test_language_check_is_undecidable_on_short_text() -> None:
    assert detect_language("Ok!")[1] == 0.0
    assert check("Ok, Sam!", "language", "fr").passed
    assert check(SAMPLES["fr"], "language", "fr").passed
    result = check(SAMPLES["en"], "language", "fr")
    assert not result.passed and result.detail.startswith("detected en")
