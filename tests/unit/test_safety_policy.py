import pytest

from salon.errors import ConfigError
from salon.safety.harm import Assessment
from salon.safety.policy import Action, Policy

POLICY = Policy.from_mapping(
    {
        "refuse_at": 0.8,
        "caution_at": 0.5,
        "caution": "Decline real harm; answer the rest.",
        "message": "I can't help with that.",
        "categories": {
            "self_harm": {"refuse_at": 0.6, "message": "Please call 988.", "caution": "Be kind."},
            "sexual": {"action": "allow"},
        },
    }
)


def test_confident_harm_is_refused_with_the_default_message() -> None:
    decision = POLICY.decide(Assessment(0.9, "weapons"))
    assert decision.refused and decision.message == "I can't help with that."


def test_below_threshold_is_answered_with_caution_and_no_message() -> None:
    decision = POLICY.decide(Assessment(0.79, "weapons"))
    assert decision.action is Action.CAUTION and decision.message is None
    assert decision.instruction == "Decline real harm; answer the rest."
    assert not decision.refused and not decision.benign


def test_below_the_caution_band_is_benign() -> None:
    decision = POLICY.decide(Assessment(0.49, "weapons"))
    assert decision.action is Action.ALLOW and decision.benign and decision.instruction is None


def test_categories_inherit_or_override_the_caution() -> None:
    assert POLICY.decide(Assessment(0.55, "self_harm")).instruction == "Be kind."
    assert (
        POLICY.decide(Assessment(0.55, "cyber")).instruction
        == "Decline real harm; answer the rest."
    )
    # with blocking off, the band still asks the model for care
    assert POLICY.decide(Assessment(0.99, "sexual")).action is Action.CAUTION


def test_without_a_caution_text_there_is_no_band() -> None:
    plain = Policy.from_mapping({"refuse_at": 0.8, "caution_at": 0.5, "message": "no"})
    assert plain.decide(Assessment(0.7, None)).action is Action.ALLOW
    assert not plain.cautious and POLICY.cautious and not POLICY.without_caution().cautious


def test_category_threshold_and_alternative() -> None:
    decision = POLICY.decide(Assessment(0.65, "self_harm", category_probability=0.9))
    assert decision.refused and "988" in (decision.message or "")


def test_an_unsure_category_refuses_with_the_general_message() -> None:
    """Crisis lines for what may be a tax question would be worse than a plain refusal: the
    category's own message needs the category to be probable; its threshold does not."""
    unsure = POLICY.decide(Assessment(0.65, "self_harm", category_probability=0.3))
    assert unsure.refused and unsure.message == "I can't help with that."
    assert unsure.category == "self_harm"
    strict = Policy.from_mapping(
        {"message": "No.", "category_message_from": 0.95, "categories": {"cyber": {"message": "C"}}}
    )
    assert strict.decide(Assessment(0.9, "cyber", category_probability=0.9)).message == "No."
    assert strict.decide(Assessment(0.9, "cyber", category_probability=0.96)).message == "C"


def test_category_can_turn_blocking_off() -> None:
    assert not POLICY.decide(Assessment(0.99, "sexual")).refused


def test_benign_is_never_blocked_even_without_category() -> None:
    assert not POLICY.decide(Assessment(0.2, None)).refused


@pytest.mark.parametrize(
    "bad",
    [
        {"refuse_at": 0.3, "message": "no"},  # would block turns the classifier thinks benign
        {"refuse_at": 0.8, "message": ""},  # a refusal needs a message
        {"refuse_at": 0.8, "message": "x", "action": "shout"},
        {"message": "x", "categories": {"cyber": {"refuse_at": 1.5}}},
        {"message": "x", "caution_at": -0.1, "caution": "care"},
        {"message": "x", "action": "caution"},  # a band, not an action
        {"message": "x", "category_message_from": 1.5},
        {"message": "x", "category_message_from": "sure"},
    ],
)
def test_invalid_policies_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Policy.from_mapping(bad)


def test_shipped_policy_loads_and_offers_crisis_resources() -> None:
    policy = Policy.load()
    message = policy.rule("self_harm").message
    assert "988" in message and policy.rule("self_harm").refuse_at <= policy.default.refuse_at
    assert all(r.message.strip() for r in policy.categories.values())
    # no caution band by default (it hurt the embedded model more than it helped)
    assert not policy.default.caution and not policy.rule("self_harm").caution
    assert policy.decide(Assessment(0.7, "cyber")).action is Action.ALLOW
