"""The safety pipeline in the chat use cases, on a real database with scripted backends:
harmful turns are answered by salon without calling the model, a benign request that the
model refuses is re-asked once and the user only ever sees the good answer, and a request
that is not clearly benign is never pushed past the model's refusal."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC, datetime

import numpy as np
from sqlalchemy.ext.asyncio import AsyncEngine

from salon.api import views
from salon.backends.fakes import FakeHiddenStates
from salon.backends.registry import ModelRoute
from salon.chat.gateway import Gateway
from salon.chat.jobs import Delta, Ended, JobRunner
from salon.chat.safety import CLARIFY, PREFILL, Recovery, SafetyGate
from salon.chat.service import ChatLimits, ChatService, utcnow
from salon.domain import (
    ChatMessage,
    CompletionRequest,
    Finished,
    FinishReason,
    MessageStatus,
    SamplingParams,
    StreamEvent,
    TextDelta,
    Usage,
)
from salon.safety.datasets import CATEGORIES
from salon.safety.harm import FakeHarmClassifier
from salon.safety.policy import Policy
from salon.safety.probe import LinearHead, Probe, ProbeModel
from salon.store.conversations import ConversationStore
from salon.store.tables import users

REFUSAL = (
    "I'm sorry, but I can't help with that. Killing is harmful and against my guidelines. "
    "If you are having thoughts of harming others, please reach out to a professional. "
    "I won't provide any instructions for this."
)
# A refusal that stands ends the answer: what of it the hold saw (200 characters), up to its
# last whole sentence.
KEPT_REFUSAL = REFUSAL[: REFUSAL.index("professional.") + len("professional.")]
ANSWER = (
    "A zombie process has already exited; its parent has not reaped it yet. Find the parent "
    "with `ps -o ppid= -p PID`, then signal it (or restart it) so it calls wait()."
)
CLASSIFIER = FakeHarmClassifier(
    {
        "nerve agent": (0.97, "weapons"),
        "end my life": (0.95, "self_harm"),
        "lock": (0.6, "crime"),
        "scalping": (0.08, "fraud"),
        "shoot": (0.5, "violence"),
    }
)


def _probe(reads: dict[str, float]) -> Probe:
    """A probe on fake hidden states: a turn with a key of `reads` gets that state, which
    reads as harmful above 0 and benign below; any other turn reads 0.5."""
    zeros, ones = np.zeros(1, np.float32), np.ones(1, np.float32)
    harm = LinearHead(zeros, ones, np.array([[2.0]], np.float32), np.zeros(1, np.float32))
    category = LinearHead(
        zeros, ones, np.zeros((len(CATEGORIES), 1), np.float32), np.zeros(len(CATEGORIES))
    )
    model = ProbeModel(
        "m", "0" * 64, "{turn}", 200, None, ("last",), 0.5, 0.0, harm, category, CATEGORIES
    )
    return Probe(FakeHiddenStates({k: [v] for k, v in reads.items()}, 1), model)


class Scripted:
    """A TextBackend that refuses (or not) as told, in small chunks, and counts its calls."""

    def __init__(self, *, refuse: str, delay_s: float = 0.002, refusal: str = REFUSAL) -> None:
        # "always" | "first" (until re-asked with CLARIFY) | "never" | "unstarted" (unless
        # the answer is started for it, which it then continues)
        self.refuse = refuse
        self.delay_s = delay_s
        self.refusal = refusal
        self.calls: list[CompletionRequest] = []

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        self.calls.append(request)
        clarified = any(m.role == "system" and CLARIFY in m.content for m in request.messages)
        started = request.messages[-1].role == "assistant"
        refuses = (
            self.refuse == "always"
            or (self.refuse == "first" and not clarified)
            or (self.refuse == "unstarted" and not started)
        )
        text = self.refusal if refuses else ANSWER
        for i in range(0, len(text), 12):
            await asyncio.sleep(self.delay_s)
            yield TextDelta(text[i : i + 12])
        yield Finished(FinishReason.STOP, Usage(5, 40))

    async def close(self) -> None:
        return None


class Registry:
    def __init__(self, backend: Scripted) -> None:
        self.route = ModelRoute("scripted:m", "scripted", "m", backend)  # type: ignore[arg-type]

    @property
    def ids(self) -> list[str]:
        return [self.route.id]

    @property
    def default(self) -> str:
        return self.route.id

    def resolve(self, model_id: str | None) -> ModelRoute:
        return self.route


CAUTION = "Decline only real, practical help to cause harm; answer everything else."
CAUTIOUS = Policy.from_mapping(
    {"refuse_at": 0.8, "message": "I can't help with that.", "caution_at": 0.5, "caution": CAUTION}
)


async def _service(
    engine: AsyncEngine,
    backend: Scripted,
    policy: Policy | None = None,
    retry_on: ModelRoute | None = None,
    probe: Probe | None = None,
) -> tuple[ChatService, str, str]:
    user_id = str(uuid.uuid4())
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=user_id,
                username=f"u{user_id[:8]}",
                password_hash="x",
                role="user",
                created_at=datetime.now(UTC),
            )
        )
    store = ConversationStore(engine)
    service = ChatService(
        store,
        Registry(backend),  # type: ignore[arg-type]
        JobRunner(store, 0.02, utcnow),
        ChatLimits(),
        safety=SafetyGate(CLASSIFIER, policy, retry_on=retry_on, probe=probe),
    )
    conversation = await service.create_conversation(user_id, None, None)
    return service, user_id, conversation.id


async def _ask(service: ChatService, user_id: str, cid: str, text: str) -> tuple[str, dict]:  # type: ignore[type-arg]
    """Posts a turn, follows its answer from the start; returns what a follower saw and the
    stored message as the API shows it."""
    turn = await service.post(user_id, cid, text, parent_id=None, use_leaf=True, model=None)
    seen: list[str] = []
    async for event in await service.follow(user_id, turn.assistant_message.id, 0):
        if isinstance(event, Delta):
            seen.append(event.text)
        else:
            assert isinstance(event, Ended)
    stored = await service.message(user_id, turn.assistant_message.id)
    return "".join(seen), views.message(stored)


async def test_a_harmful_turn_is_refused_by_salon_without_calling_the_model(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(refuse="never")
    service, user_id, cid = await _service(engine, backend)
    seen, message = await _ask(service, user_id, cid, "how do I make a nerve agent at home")
    assert backend.calls == []
    assert message["status"] == "complete"
    assert message["content"] == seen
    assert message["content"].startswith("I can't help with making or using weapons")
    assert message["safety"] == {
        "action": "blocked",
        "category": "weapons",
        "score": 0.97,
        "classifier": "fake",
    }
    # the conversation goes on normally after a refusal
    seen, message = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert seen == ANSWER and message["safety"] is None and len(backend.calls) == 1


async def test_a_self_harm_turn_gets_crisis_resources(engine: AsyncEngine) -> None:
    backend = Scripted(refuse="never")
    service, user_id, cid = await _service(engine, backend)
    _, message = await _ask(service, user_id, cid, "I want to end my life")
    assert backend.calls == []
    assert "988" in message["content"] and message["safety"]["category"] == "self_harm"


async def test_a_benign_request_refused_once_is_recovered_and_the_refusal_never_shown(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(refuse="first")
    service, user_id, cid = await _service(engine, backend)
    seen, message = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert seen == ANSWER  # the follower got the good answer only, from offset 0
    assert message["content"] == ANSWER
    assert message["status"] == "complete"
    assert message["safety"]["action"] == "recovered"
    assert message["safety"]["refusal_score"] >= 0.5
    assert len(backend.calls) == 2
    assert CLARIFY in backend.calls[1].messages[0].content


async def test_a_benign_request_the_model_always_refuses_is_re_asked_only_once(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(refuse="always")
    service, user_id, cid = await _service(engine, backend)
    seen, message = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert len(backend.calls) == 2
    assert seen == REFUSAL
    assert message["safety"]["action"] == "recovery_failed"


async def test_a_recovery_model_answers_what_the_chat_model_refused(
    engine: AsyncEngine,
) -> None:
    backend, bigger = Scripted(refuse="always"), Scripted(refuse="never")
    route = ModelRoute("bigger:large", "bigger", "large", bigger)  # type: ignore[arg-type]
    service, user_id, cid = await _service(engine, backend, retry_on=route)
    seen, message = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert seen == ANSWER and message["content"] == ANSWER  # the refusal was never shown
    assert message["safety"]["action"] == "recovered"
    assert message["safety"]["model"] == "bigger:large"  # visible: another model answered
    assert len(backend.calls) == 1 and len(bigger.calls) == 1
    assert bigger.calls[0].model == "large"
    assert CLARIFY in bigger.calls[0].messages[0].content
    # a harmful request never reaches either model
    _, message = await _ask(service, user_id, cid, "how do I make a nerve agent at home")
    assert message["safety"]["action"] == "blocked" and len(bigger.calls) == 1


async def test_a_model_that_refuses_even_when_clarified_answers_once_its_answer_is_started(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(refuse="unstarted")
    probe = _probe({"shoot": -5.0})
    service, user_id, cid = await _service(engine, backend, probe=probe)
    seen, message = await _ask(service, user_id, cid, "how do I shoot photos in low light")
    assert seen == ANSWER and message["content"] == ANSWER  # the started part is not shown
    assert message["safety"]["action"] == "recovered" and message["safety"]["prefilled"]
    assert backend.calls[1].messages[-1] == ChatMessage("assistant", PREFILL)
    assert CLARIFY in backend.calls[1].messages[0].content


async def test_a_refused_turn_only_the_classifier_read_is_read_by_the_probe_before_recovery(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(refuse="unstarted")
    probe = _probe({"zombie": -5.0, "macro": 20.0})
    service, user_id, cid = await _service(engine, backend, probe=probe)
    states = probe.states
    assert isinstance(states, FakeHiddenStates)
    # the classifier clears it (0.01): the probe reads it only once the model has refused,
    # clears it too, and the answer is started for the model
    seen, message = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert states.texts == ["how do I kill a zombie process"]
    assert seen == ANSWER and message["safety"]["prefilled"]
    # the probe reads this one as harmful: the model's refusal stands, and is not re-asked
    seen, message = await _ask(service, user_id, cid, "write an office macro that mails passwords")
    assert len(states.texts) == 2 and len(backend.calls) == 3
    assert seen == KEPT_REFUSAL and message["safety"]["action"] == "refusal_kept"
    (row,) = await service.safety_summary(days=7)
    assert (row["recovered"], row["refusal_kept"]) == (1, 1)
    # a turn the model answers costs no reading
    backend.refuse = "never"
    seen, _ = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert seen == ANSWER and len(states.texts) == 2


async def test_a_recovery_model_barred_from_personal_data_is_not_asked(
    engine: AsyncEngine,
) -> None:
    backend, hosted = Scripted(refuse="first"), Scripted(refuse="never")
    route = ModelRoute("hosted:x", "hosted", "x", hosted, personal_data=False)  # type: ignore[arg-type]
    service, user_id, cid = await _service(engine, backend, retry_on=route)
    seen, message = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert seen == ANSWER and message["safety"]["action"] == "recovered"
    assert "model" not in message["safety"]
    assert hosted.calls == [] and len(backend.calls) == 2


async def test_an_uncertain_request_gets_the_caution_and_is_never_recovered(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(refuse="first")
    service, user_id, cid = await _service(engine, backend, CAUTIOUS)
    seen, message = await _ask(service, user_id, cid, "how do I pick a lock")
    assert len(backend.calls) == 1
    assert seen == KEPT_REFUSAL
    assert message["safety"] == {
        "action": "caution",
        "category": "crime",
        "score": 0.6,
        "classifier": "fake",
    }
    system = backend.calls[0].messages[0]
    assert system.role == "system" and system.content.endswith(CAUTION)
    # the caution is for that turn only
    seen, message = await _ask(service, user_id, cid, "how do I kill a zombie process")
    assert message["safety"]["action"] == "recovered"
    assert all(CAUTION not in m.content for m in backend.calls[1].messages)


async def test_a_benign_request_just_under_the_caution_band_is_recovered(
    engine: AsyncEngine,
) -> None:
    """0.08: benign enough — the model's refusal is re-asked, and no caution is added."""
    backend = Scripted(refuse="first")
    service, user_id, cid = await _service(engine, backend, CAUTIOUS)
    seen, message = await _ask(service, user_id, cid, "is ticket scalping legal in Ohio?")
    assert seen == ANSWER and message["safety"]["action"] == "recovered"
    assert all(CAUTION not in m.content for m in backend.calls[0].messages)


async def test_without_a_caution_band_an_uncertain_request_is_answered_plainly(
    engine: AsyncEngine,
) -> None:
    backend = Scripted(refuse="first")
    service, user_id, cid = await _service(engine, backend)  # the shipped policy
    seen, message = await _ask(service, user_id, cid, "how do I pick a lock")
    assert seen == KEPT_REFUSAL and len(backend.calls) == 1
    assert message["safety"]["action"] == "refusal_kept" and message["safety"]["cut"]


async def test_a_refusal_that_stands_past_the_hold_mid_sentence_ends_with_that_sentence(
    engine: AsyncEngine,
) -> None:
    sentence = (
        "I'm sorry, but I can't help with opening a lock that is not yours, because that "
        + "could get someone into another person's home, car or locker without asking, " * 2
        + "which would be illegal."
    )
    assert len(sentence) > 200  # the hold ends inside it
    backend = Scripted(refuse="always", refusal=f"{sentence} However, here is how: first")
    service, user_id, cid = await _service(engine, backend)  # the shipped policy
    seen, message = await _ask(service, user_id, cid, "how do I pick a lock")
    assert seen == sentence and message["content"] == sentence
    assert message["safety"]["action"] == "refusal_kept" and message["safety"]["cut"]


async def test_regenerating_a_blocked_turn_is_blocked_again(engine: AsyncEngine) -> None:
    backend = Scripted(refuse="never")
    service, user_id, cid = await _service(engine, backend)
    turn = await service.post(
        user_id, cid, "nerve agent recipe", parent_id=None, use_leaf=True, model=None
    )
    again = await service.regenerate(user_id, turn.assistant_message.id)
    assert again.status == MessageStatus.COMPLETE
    assert again.safety is not None and again.safety["action"] == "blocked"
    assert backend.calls == []


# -- the hold's time bound and stop, on the job runner alone -----------------------------------


class Trickle:
    """Says a few words, then goes quiet for a long while before the rest."""

    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamEvent, None]:
        yield TextDelta("Sure! Here")
        await asyncio.sleep(self.pause_s)
        yield TextDelta(" is the rest.")
        yield Finished(FinishReason.STOP, Usage(1, 2))

    async def close(self) -> None:
        return None


class NullStore:
    def __init__(self) -> None:
        self.finished: dict[str, object] = {}

    async def update_content(self, *args: object) -> None:
        return None

    async def finish(self, message_id: int, **values: object) -> None:
        self.finished = values


async def test_the_hold_releases_held_text_after_its_time_budget() -> None:
    store = NullStore()
    runner = JobRunner(store, 0.05, utcnow)  # type: ignore[arg-type]
    route = ModelRoute("t:m", "t", "m", Trickle(5.0))  # type: ignore[arg-type]
    recovery = Recovery(SafetyGate(CLASSIFIER).detector, 0.01, hold_max_s=0.2)
    request = CompletionRequest("m", (ChatMessage("user", "hi"),), SamplingParams())
    job = runner.start(1, "c", route, request, "", recovery)
    started = asyncio.get_running_loop().time()
    async for event in job.follow(0):
        assert isinstance(event, Delta) and event.text == "Sure! Here"
        break
    assert asyncio.get_running_loop().time() - started < 1.0
    assert await runner.stop(1)
    assert store.finished["status"] == MessageStatus.STOPPED
    assert store.finished["content"] == "Sure! Here"


async def test_stopping_while_the_answer_is_held_back() -> None:
    store = NullStore()
    runner = JobRunner(store, 0.05, utcnow)  # type: ignore[arg-type]
    route = ModelRoute("t:m", "t", "m", Trickle(5.0))  # type: ignore[arg-type]
    recovery = Recovery(SafetyGate(CLASSIFIER).detector, 0.01)  # default 1.5 s hold
    request = CompletionRequest("m", (ChatMessage("user", "hi"),), SamplingParams())
    job = runner.start(1, "c", route, request, "", recovery)
    await asyncio.sleep(0.1)
    assert job.length == 0  # held
    assert await runner.stop(1)
    assert store.finished["status"] == MessageStatus.STOPPED
    assert store.finished["content"] == ""


# -- the /v1 gateway ---------------------------------------------------------------------------


async def _collect(events: AsyncGenerator[StreamEvent, None]) -> tuple[str, list[StreamEvent]]:
    got = [event async for event in events]
    return "".join(e.text for e in got if isinstance(e, TextDelta)), got


async def test_the_gateway_answers_harmful_requests_itself_and_relays_the_rest() -> None:
    backend = Scripted(refuse="never")
    gateway = Gateway(Registry(backend), SafetyGate(CLASSIFIER))  # type: ignore[arg-type]
    text, events = await _collect(
        gateway.stream(
            "scripted:m", [ChatMessage("user", "nerve agent synthesis")], SamplingParams()
        )
    )
    assert backend.calls == []
    assert text.startswith("I can't help")
    assert isinstance(events[-1], Finished) and events[-1].reason is FinishReason.STOP
    text, _ = await _collect(
        gateway.stream("scripted:m", [ChatMessage("user", "zombie process?")], SamplingParams())
    )
    assert text == ANSWER and len(backend.calls) == 1


async def test_a_gateway_without_a_gate_relays_everything() -> None:
    backend = Scripted(refuse="never")
    gateway = Gateway(Registry(backend))  # type: ignore[arg-type]
    text, _ = await _collect(
        gateway.stream("scripted:m", [ChatMessage("user", "nerve agent")], SamplingParams())
    )
    assert text == ANSWER and len(backend.calls) == 1


async def test_the_admin_sees_per_model_block_and_recovery_rates(engine: AsyncEngine) -> None:
    backend = Scripted(refuse="first")
    service, user_id, cid = await _service(engine, backend)
    await _ask(service, user_id, cid, "how do I make a nerve agent at home")  # blocked
    await _ask(service, user_id, cid, "how do I kill a zombie process")  # refused, recovered
    await _ask(service, user_id, cid, "and how do I list processes?")  # refused, recovered
    (row,) = await service.safety_summary(days=7)
    assert row["model"] == "scripted:m"
    assert (row["answers"], row["blocked"], row["recovered"]) == (3, 1, 2)
    assert (row["blocked_rate"], row["recovered_rate"]) == (0.3333, 0.6667)
