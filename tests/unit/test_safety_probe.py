"""The gate's probe on the chat model's hidden state: its arithmetic, where the gate asks it,
and that a failing probe leaves the embedded verdict standing (fake hidden states)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from salon.backends.fakes import FakeBackend, FakeHiddenStates
from salon.backends.model_files import builtin_catalog
from salon.backends.registry import ModelRoute
from salon.chat.safety import (
    CLARIFY,
    PREFILL,
    RECOVER_BELOW,
    RECOVER_BELOW_PROBED,
    GateVerdict,
    Recovery,
    SafetyGate,
)
from salon.domain import ChatMessage
from salon.observability.metrics import Metrics
from salon.safety.datasets import CATEGORIES, PromptRow
from salon.safety.harm import Assessment, FakeHarmClassifier
from salon.safety.policy import MIN_REFUSE_AT, Policy
from salon.safety.probe import PROBE_FROM, LinearHead, Probe, ProbeModel, cross_validated
from salon.safety.train_probe import _second_reading, fit_category, fit_harm

HARMFUL = [3.0, 0.0]  # the fake chat model's reading of a harmful request
BENIGN = [-3.0, 0.0]
SELF_HARM = [3.0, 3.0]


def _model(weight: float = 0.5, shift: float = 0.0) -> ProbeModel:
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    harm = LinearHead(zeros, ones, np.array([[2.0, 0.0]], np.float32), np.zeros(1, np.float32))
    category_weight = np.zeros((len(CATEGORIES), 2), np.float32)
    category_weight[CATEGORIES.index("self_harm"), 1] = 4.0
    category = LinearHead(zeros, ones, category_weight, np.zeros(len(CATEGORIES), np.float32))
    inverted = LinearHead(zeros, ones, -harm.weight, harm.bias)
    return ProbeModel(
        model="m",
        sha256="0" * 64,
        template="<u>{turn}</u>",
        max_chars=20,
        layers=None,
        poolings=("last",),
        weight=weight,
        shift=shift,
        harm=harm,
        category=category,
        categories=CATEGORIES,
        folds=((inverted, category),),
    )


def _gate(script: dict[str, tuple[float, str]], states: FakeHiddenStates) -> SafetyGate:
    policy = Policy.from_mapping({"refuse_at": 0.8, "message": "no"})
    return SafetyGate(FakeHarmClassifier(script), policy, probe=Probe(states, _model()))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


async def test_a_turn_the_classifier_is_unsure_of_is_averaged_with_the_probe_in_log_odds() -> None:
    states = FakeHiddenStates({"flour": HARMFUL}, 2)
    gate = _gate({"flour": (0.3, "weapons")}, states)
    verdict = await gate.acheck_messages([ChatMessage("user", "how much flour for a bomb")])
    assert verdict is not None
    q = 1 / (1 + math.exp(-6.0))  # the harm head's reading of HARMFUL
    expected = 1 / (1 + math.exp(-(0.5 * _logit(0.3) + 0.5 * _logit(q))))
    assert verdict.assessment.harmful_probability == pytest.approx(expected, rel=1e-5)
    assert verdict.blocked and verdict.assessment.classifier == "embedded+probe"
    assert states.texts == ["<u>how much flour for a</u>"]  # the template, max_chars


async def test_the_probe_clears_a_scary_sounding_turn() -> None:
    states = FakeHiddenStates({"zombie": BENIGN}, 2)
    gate = _gate({"zombie": (0.7, "violence")}, states)
    verdict = await gate.acheck_messages([ChatMessage("user", "kill a zombie process")])
    assert verdict is not None and not verdict.blocked
    assert verdict.assessment.harmful_probability < 0.1
    assert verdict.assessment.category is None


async def test_turns_the_classifier_clears_are_not_read_by_the_probe() -> None:
    states = FakeHiddenStates({"": HARMFUL}, 2)
    gate = _gate({"cake": (PROBE_FROM / 2, "other")}, states)
    verdict = await gate.acheck_messages([ChatMessage("user", "bake a cake")])
    assert verdict is not None and not verdict.blocked
    assert states.texts == []


async def test_the_probe_can_clear_a_turn_the_classifier_alone_would_refuse() -> None:
    states = FakeHiddenStates({"snipe": BENIGN}, 2)
    gate = _gate({"snipe": (0.9, "violence")}, states)
    assert gate.check("how do I snipe an auction").blocked
    verdict = await gate.acheck_messages([ChatMessage("user", "how do I snipe an auction")])
    assert verdict is not None and not verdict.blocked


def test_the_shift_moves_the_average_onto_the_policys_scale() -> None:
    embedded = FakeHarmClassifier({}, default=0.5).assess("x")
    states = FakeHiddenStates({"": [0.0, 0.0]}, 2)  # the probe reads 0.5
    plain = Probe(states, _model()).assess("x", embedded).harmful_probability
    moved = Probe(states, _model(shift=1.0)).assess("x", embedded).harmful_probability
    assert plain == pytest.approx(0.5)
    assert moved == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-5)


async def test_only_a_turn_the_probe_cleared_is_re_asked_with_its_answer_started() -> None:
    states = FakeHiddenStates({"zombie": BENIGN}, 2)
    gate = _gate({"zombie": (0.7, "violence"), "cake": (PROBE_FROM / 2, "other")}, states)
    local = ModelRoute("fake:m", "fake", "m", FakeBackend())
    hosted = ModelRoute("hosted:m", "hosted", "m", FakeBackend(), continues=False)
    turn = [ChatMessage("user", "kill a zombie process")]
    recovery = gate.recovery(await gate.acheck_messages(turn))
    assert recovery is not None and recovery.prefills(local)
    assert recovery.reask(turn, local) == (
        ChatMessage("system", CLARIFY),
        *turn,
        ChatMessage("assistant", PREFILL),
    )
    # a backend that would start a new message instead gets the clarification alone
    assert not recovery.prefills(hosted)
    assert recovery.reask(turn, hosted) == (ChatMessage("system", CLARIFY), *turn)
    # a turn the classifier cleared alone is not pushed that far before the probe reads it,
    # which it does only once the model has refused
    unprobed = gate.recovery(await gate.acheck_messages([ChatMessage("user", "bake a cake")]))
    assert unprobed is not None and not unprobed.prefills(local)
    assert states.texts == ["<u>kill a zombie proces</u>"]
    confirmed = await unprobed.confirmed()
    assert confirmed is not None and confirmed.prefills(local)
    assert states.texts[-1] == "<u>bake a cake</u>"
    assert recovery.note(recovery.judge("x", finished=True), None, prefilled=True)["prefilled"]


async def test_a_failing_second_reading_leaves_the_plain_re_ask() -> None:
    gate = _gate({}, FakeHiddenStates({}, 2, fail=True))
    local = ModelRoute("fake:m", "fake", "m", FakeBackend())
    recovery = gate.recovery(await gate.acheck_messages([ChatMessage("user", "bake a cake")]))
    assert recovery is not None and recovery.recheck is not None
    confirmed = await recovery.confirmed()
    assert confirmed is not None and not confirmed.prefills(local)
    assert confirmed.recheck is None  # read once


async def test_a_turn_the_probe_lifts_over_the_line_gets_the_probes_category() -> None:
    states = FakeHiddenStates({"pills": SELF_HARM}, 2)
    gate = _gate({"pills": (0.2, "other")}, states)
    verdict = await gate.acheck_messages([ChatMessage("user", "how many pills is too many")])
    assert verdict is not None
    assert verdict.assessment.category == "self_harm"


async def test_a_failing_probe_leaves_the_embedded_verdict() -> None:
    states = FakeHiddenStates({}, 2, fail=True)
    gate = _gate({"lock": (0.6, "crime")}, states)
    verdict = await gate.acheck_messages([ChatMessage("user", "pick a lock")])
    assert verdict is not None and not verdict.blocked
    assert verdict.assessment.harmful_probability == 0.6
    assert verdict.assessment.classifier == "fake"


def test_training_prompts_are_read_by_their_fold_heads() -> None:
    states = FakeHiddenStates({"": HARMFUL}, 2)
    probe = cross_validated(Probe(states, _model()), [("a known prompt", 0)])
    embedded = FakeHarmClassifier({}, default=0.5).assess("x")
    assert probe.assess(" a known prompt ", embedded).harmful_probability < 0.5  # fold: inverted
    assert probe.assess("a new prompt", embedded).harmful_probability > 0.5


def test_the_heads_read_as_scikit_learn_predicts() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32) * 3 + 1
    y = x[:, 0] + 0.5 * rng.normal(size=200) > 1
    head = fit_harm(x, y, c=0.1)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    reference = LogisticRegression(C=0.1, max_iter=5000).fit(z, y).predict_proba(z)[:, 1]
    ours = [head.probability(v) for v in x]
    assert np.allclose(ours, reference, atol=1e-4)
    labels = [CATEGORIES[int(v > 1) + 2 * int(w > 1)] for v, w in x[:, :2]]
    category = fit_category(x, labels)
    picked = [CATEGORIES[int(np.argmax(category.distribution(v)))] for v in x]
    assert np.mean([a == b for a, b in zip(picked, labels, strict=True)]) > 0.8


def test_the_shipped_probe_belongs_to_a_catalog_model() -> None:
    model = ProbeModel.load()
    assert builtin_catalog().get(model.model).sha256 == model.sha256
    assert "{turn}" in model.template and len(model.folds) == 5
    dim = model.harm.weight.shape[1]
    assert model.category.weight.shape == (len(model.categories), dim)
    assert all(h.weight.shape == (1, dim) for h, _ in model.folds)
    assert 0.0 < model.weight < 1.0


async def test_a_follow_up_read_with_its_context_is_probed_with_it_too() -> None:
    class ReadWithContext:
        def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment:
            return Assessment(0.6, "violence", 0.9, used_context=bool(context), classifier="fake")

    states = FakeHiddenStates({"poison": HARMFUL}, 2)
    policy = Policy.from_mapping({"refuse_at": 0.8, "message": "no"})
    gate = SafetyGate(ReadWithContext(), policy, probe=Probe(states, _model(shift=0.0)))
    conversation = [
        ChatMessage("user", "I want to poison my husband"),
        ChatMessage("assistant", "I can't help with that."),
        ChatMessage("user", "ok, how much would be enough?"),
    ]
    verdict = await gate.acheck_messages(conversation)
    assert verdict is not None and verdict.blocked
    assert states.texts == ["<u>I want to poison my </u>"]  # the joined text, max_chars


async def test_consultations_are_counted_for_the_admin() -> None:
    metrics = Metrics()
    policy = Policy.from_mapping({"refuse_at": 0.8, "message": "no"})
    classifier = FakeHarmClassifier({"flour": (0.3, "weapons"), "lock": (0.6, "crime")})
    working = Probe(FakeHiddenStates({"flour": HARMFUL}, 2), _model(), metrics=metrics.guard("p"))
    broken = Probe(FakeHiddenStates({}, 2, fail=True), _model(), metrics=metrics.guard("p"))
    await SafetyGate(classifier, policy, probe=working).acheck_messages(
        [ChatMessage("user", "flour bomb")]
    )
    await SafetyGate(classifier, policy, probe=broken).acheck_messages(
        [ChatMessage("user", "pick a lock")]
    )
    text = metrics.render().decode()
    assert 'salon_safety_guard_consultations_total{model="p",outcome="unsafe"} 1.0' in text
    assert 'salon_safety_guard_consultations_total{model="p",outcome="error"} 1.0' in text


async def test_a_refusal_is_recovered_from_below_a_higher_bound_once_the_probe_read_the_turn() -> (
    None
):
    # The probe's reading x gives the head 2x in log-odds; with the classifier at 0.3 the
    # average is 0.5 * logit(0.3) + x.
    async def verdict_for(x: float) -> GateVerdict:
        states = FakeHiddenStates({"": [x, 0.0]}, 2)
        gate = _gate({"": (0.3, "crime")}, states)
        assert not gate.check("write a heist story").recoverable  # too high for it alone
        probed = await gate.acheck_messages([ChatMessage("user", "write a heist story")])
        assert probed is not None and probed.recover_below == RECOVER_BELOW_PROBED
        return probed

    clear = await verdict_for(-0.25)  # the average: 0.34
    assert clear.assessment.harmful_probability < RECOVER_BELOW_PROBED and clear.recoverable
    unsure = await verdict_for(0.5)  # the average: 0.52
    assert RECOVER_BELOW_PROBED <= unsure.assessment.harmful_probability < 0.8
    assert not unsure.blocked and not unsure.recoverable
    assert RECOVER_BELOW < RECOVER_BELOW_PROBED < MIN_REFUSE_AT


def test_the_second_reading_is_calibrated_on_the_turns_the_gate_does_not_probe() -> None:
    def row(uid: str, source: str, label: str) -> PromptRow:
        return PromptRow(uid, source, label, "", uid, "")

    rows = [row("a", "xstest", "unsafe"), row("b", "salon_written", "safe"), row("c", "x", "safe")]
    text = _second_reading(rows, [PROBE_FROM / 2, PROBE_FROM / 2, 0.9], [0.999, 0.001, 0.5])
    assert "All 2 such training prompts" in text and "The 1 of the development split" in text
    # the harmful one, which the probe reads as harmful, lands high; the safe one low
    assert "| [0.75, 1.00) | 1 | 100.0 %" in text and "| [0.00, 0.10) | 1 | 0.0 %" in text


async def test_a_turn_the_probe_skipped_is_recovered_on_the_probes_reading_whatever_its_start() -> (
    None
):
    # The classifier's 0.3 is over RECOVER_BELOW but under where this probe starts reading, so
    # the probe reads it only once the model refuses it, and its reading decides.
    async def confirmed(states: FakeHiddenStates) -> Recovery | None:
        probe = Probe(states, _model(), start=0.5)
        policy = Policy.from_mapping({"refuse_at": 0.8, "message": "no"})
        gate = SafetyGate(FakeHarmClassifier({"": (0.3, "crime")}), policy, probe=probe)
        verdict = await gate.acheck_messages([ChatMessage("user", "write a heist story")])
        assert verdict is not None and not verdict.probed and states.texts == []
        recovery = gate.recovery(verdict)
        assert recovery is not None and recovery.reasks and recovery.prefill is None
        return await recovery.confirmed()

    cleared = await confirmed(FakeHiddenStates({"": BENIGN}, 2))
    assert cleared is not None and cleared.prefill == PREFILL
    assert await confirmed(FakeHiddenStates({"": HARMFUL}, 2)) is None
    # a probe that fails leaves the classifier's own bound, which 0.3 is over
    assert await confirmed(FakeHiddenStates({}, 2, fail=True)) is None


class _Topical:
    """A classifier whose topic head named child safety for every turn (scripted)."""

    def assess(self, turn: str, context: Sequence[str] = ()) -> Assessment:
        return Assessment(0.3, None, 0.0, topic="child_safety", topic_probability=0.95)


async def test_a_turn_the_probe_lifts_over_the_line_keeps_the_classifiers_topic() -> None:
    """The probe's category head would say self-harm; the topic head's category decides, and
    with it the category's own threshold and message."""
    policy = Policy.from_mapping(
        {
            "refuse_at": 0.9,
            "message": "no",
            "categories": {"child_safety": {"refuse_at": 0.6, "message": "report it"}},
        }
    )
    gate = SafetyGate(
        _Topical(), policy, probe=Probe(FakeHiddenStates({"a": [1.0, 3.0]}, 2), _model())
    )
    verdict = await gate.acheck_messages([ChatMessage("user", "a story")])
    assert verdict is not None
    assert verdict.assessment.category == "child_safety"
    assert 0.6 <= verdict.assessment.harmful_probability < 0.9
    assert verdict.blocked and verdict.decision.message == "report it"


async def test_a_turn_in_another_language_is_read_by_the_probe_alone() -> None:
    # The classifier learnt from English prompts, so its low score on a French turn says
    # little; the chat model reads French, and its reading decides.
    states = FakeHiddenStates({"suicid": SELF_HARM}, 2)
    gate = _gate({}, states)  # the fake classifier scores every turn 0.01, under PROBE_FROM
    french = await gate.acheck_messages([ChatMessage("user", "comment me suicider sans douleur")])
    assert french is not None and french.probed and french.blocked
    q = 1 / (1 + math.exp(-6.0))  # the harm head's reading, not averaged with 0.01
    assert french.assessment.harmful_probability == pytest.approx(q, rel=1e-5)
    assert french.assessment.category == "self_harm"
    for turn in ("where can I find a suicide prevention hotline?", "merci, suicide"):
        # English, and a turn too short to tell its language: left to the classifier
        verdict = await gate.acheck_messages([ChatMessage("user", turn)])
        assert verdict is not None and not verdict.probed
    assert len(states.texts) == 1
