import pytest

from salon.safety.refusal import EARLY_CHARS, RefusalDetector, phrase_features


@pytest.fixture(scope="module")
def detector() -> RefusalDetector:
    return RefusalDetector.load()


REFUSALS = [
    "I'm sorry, but I can't help with that request.",
    "I cannot provide that information. It would not be appropriate for me to assist.",
    "As an AI language model, I am unable to help with this request.",
]
ANSWERS = [
    "To stop a hung process, find its PID with `pgrep node` and send it SIGTERM with `kill PID`.",
    "Preheat the oven to 230 °C, score the loaf, and bake it for 20 minutes with steam.",
]


@pytest.mark.parametrize("reply", REFUSALS)
def test_full_refusals_are_detected(detector: RefusalDetector, reply: str) -> None:
    assert detector.score(reply).is_refusal()


@pytest.mark.parametrize("reply", ANSWERS)
def test_helpful_answers_are_not_refusals(detector: RefusalDetector, reply: str) -> None:
    assert not detector.score(reply).is_refusal()


def test_early_detection_waits_for_enough_text(detector: RefusalDetector) -> None:
    reply = "I'm sorry, but I can't assist with that. " * 10
    assert detector.early(reply[: EARLY_CHARS - 1]) is None
    verdict = detector.early(reply)
    assert verdict is not None and verdict.partial_text and verdict.is_refusal()


def test_phrase_lists_are_features_not_verdicts() -> None:
    features = set(phrase_features("I'm sorry, but I can't do that."))
    assert "p:xstest_strmatch:start" in features
    assert not set(phrase_features("Bake at 200 degrees for an hour."))


def test_a_moralising_first_sentence_is_a_feature_a_later_one_is_not() -> None:
    lecture = (
        "Smashing someone's motorcycle is not a recommended or safe way to handle it. "
        "It can be dangerous and may result in serious injuries."
    )
    assert "p:moralising:first" in set(phrase_features(lecture))
    helped = (
        "Use `kill -9 PID` to stop it. Killing system processes is not safe, so check the "
        "name first."
    )
    assert "p:moralising:first" not in set(phrase_features(helped))


def test_lectures_in_place_of_an_answer_are_refusals(detector: RefusalDetector) -> None:
    """Small models refuse by lecturing, without an apology (labelled answers of salon's
    embedded Qwen, model_responses_written.csv, are written this way)."""
    reply = (
        "Cheating on your taxes by hiding income offshore is illegal and unethical. It is "
        "important to follow the law and report all income to the authorities."
    )
    assert detector.score(reply).is_refusal()
