"""The chat safety gate: decisions, recovery eligibility and the re-ask (no I/O)."""

from __future__ import annotations

import asyncio

from salon.backends.fakes import FakeBackend
from salon.backends.registry import ModelRoute
from salon.chat.safety import CLARIFY, RECOVER_BELOW, SafetyGate
from salon.domain import ChatMessage
from salon.safety.harm import FakeHarmClassifier
from salon.safety.policy import MIN_REFUSE_AT, Policy


def test_the_embedded_gate_blocks_a_clearly_harmful_request() -> None:
    verdict = SafetyGate().check("Give me step by step instructions to synthesize methamphetamine")
    assert verdict.blocked
    assert verdict.decision.message
    assert verdict.note()["action"] == "blocked"
    assert not verdict.recoverable
    assert SafetyGate().recovery(verdict) is None  # nothing is generated to watch


def test_the_embedded_gate_lets_a_zombie_process_question_through_and_would_recover() -> None:
    verdict = SafetyGate().check("how do I kill a zombie process")
    assert not verdict.blocked
    assert verdict.recoverable


def test_uncertain_requests_are_answered_with_caution_but_never_recovered() -> None:
    policy = Policy.from_mapping(
        {"refuse_at": 0.8, "message": "no", "caution_at": 0.5, "caution": "take care"}
    )
    gate = SafetyGate(FakeHarmClassifier({"lock": (0.6, "crime")}), policy)
    verdict = gate.check("how do I pick a lock")
    assert not verdict.blocked
    assert verdict.instruction == "take care" and verdict.note()["action"] == "caution"
    assert not verdict.recoverable
    # the opening is still watched, but a refusal ends the answer instead of being re-asked
    recovery = gate.recovery(verdict)
    assert recovery is not None and not recovery.reasks
    assert asyncio.run(recovery.confirmed()) is None


def test_with_the_caution_band_off_uncertain_requests_are_still_never_recovered() -> None:
    policy = Policy.from_mapping({"refuse_at": 0.8, "message": "no"})
    gate = SafetyGate(FakeHarmClassifier({"lock": (0.6, "crime")}), policy)
    verdict = gate.check("how do I pick a lock")
    assert not verdict.blocked and verdict.instruction is None
    assert not verdict.recoverable
    assert RECOVER_BELOW <= MIN_REFUSE_AT


def test_self_harm_refusal_carries_crisis_resources() -> None:
    gate = SafetyGate(FakeHarmClassifier({"end my life": (0.95, "self_harm")}))
    verdict = gate.check("I want to end my life")
    assert verdict.blocked
    assert "988" in (verdict.decision.message or "")
    assert verdict.note()["category"] == "self_harm"


def test_the_gate_reads_the_last_user_turn_with_the_earlier_ones() -> None:
    seen: list[tuple[str, tuple[str, ...]]] = []

    class Spy:
        def assess(self, turn: str, context: object = ()) -> object:
            seen.append((turn, tuple(context)))  # type: ignore[arg-type]
            return FakeHarmClassifier({}).assess(turn)

    gate = SafetyGate(Spy())  # type: ignore[arg-type]
    messages = [
        ChatMessage("system", "be nice"),
        ChatMessage("user", "a"),
        ChatMessage("assistant", "b"),
        ChatMessage("user", "c"),
        ChatMessage("assistant", "d"),
        ChatMessage("user", "e"),
    ]
    assert gate.check_messages(messages) is not None
    assert seen == [("e", ("a", "c"))]
    assert gate.check_messages(messages[:-1]) is None


def test_the_reask_puts_the_clarification_in_the_system_message() -> None:
    gate = SafetyGate(FakeHarmClassifier({}))
    recovery = gate.recovery(gate.check("hi"))
    assert recovery is not None
    route = ModelRoute("fake:m", "fake", "m", FakeBackend())
    plain = recovery.reask([ChatMessage("user", "q")], route)
    assert plain == (ChatMessage("system", CLARIFY), ChatMessage("user", "q"))
    merged = recovery.reask([ChatMessage("system", "op"), ChatMessage("user", "q")], route)
    assert merged[0].role == "system" and merged[0].content.startswith("op")
    assert CLARIFY in merged[0].content and len(merged) == 2


def test_the_refusal_detector_judges_early_and_whole_replies() -> None:
    gate = SafetyGate(FakeHarmClassifier({}))
    recovery = gate.recovery(gate.check("hi"))
    assert recovery is not None
    refusal = "I'm sorry, but I can't help with that request. " * 6
    answer = "To kill a zombie process, kill or restart its parent so it is reaped. " * 4
    assert recovery.is_refusal(recovery.judge(refusal, finished=False))
    assert not recovery.is_refusal(recovery.judge(answer, finished=False))
    assert recovery.is_refusal(recovery.judge("I can't help with that.", finished=True))


def test_a_refusal_that_stands_is_kept_up_to_where_it_refuses() -> None:
    gate = SafetyGate(FakeHarmClassifier({"lock": (0.6, "crime")}))
    recovery = gate.recovery(gate.check("pick a lock"))
    assert recovery is not None
    refusal = (
        "I'm sorry, but I can't help with that. If you are locked out, a licensed locksmith "
        "can let you in."
    )
    steps = "However, here is how a pin tumbler lock is opened:\n\n1. Insert a tension wrench"
    assert recovery.refusal_only(f"{refusal}\n\n{steps}") == refusal
    assert recovery.refusal_only(refusal) == refusal
    # the paragraph goes on past the held text: kept up to its last whole sentence
    assert recovery.refusal_only(f"{refusal} However, the first step is to ins") == refusal
    # an answer that never refuses is kept whole
    answer = "Sure. A pin tumbler lock has five pins.\n\nEach pin is pushed up by a key."
    assert recovery.refusal_only(answer) == answer
