"""The harm gate with a guard model, end to end: chat turns through the real services and
store, the guard asked over HTTP through salon's OpenAI-compatible backend. The guard itself
is a fake OpenAI-compatible server on loopback (scripted answers, or salon's mock upstream
for hangs, 500s and answers out of format) — the fakes sit at the network boundary only."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from salon.api.context import Services
from salon.app import services
from salon.backends.mock_upstream import running_upstream
from salon.backends.openai_http import OpenAIHttpBackend
from salon.chat.jobs import Delta
from salon.chat.safety import RECOVER_BELOW, SafetyGate
from salon.domain import ChatMessage, SamplingParams, TextDelta
from salon.observability.metrics import Metrics
from salon.safety.guard import (
    SAFE_P,
    SHIELDGEMMA_POLICIES,
    UNSAFE_P,
    Family,
    Guard,
    GuardModelClassifier,
    Mode,
)
from salon.safety.harm import FakeHarmClassifier
from salon.safety.policy import Policy
from salon.settings import ProviderSettings, SafetyGuardSettings, Settings

POLICY = Policy.load()
# The embedded verdicts, scripted: "lock" is a gray turn (0.3 <= p < 0.88), "nerve agent" one
# the embedded classifier refuses by itself, anything else clearly benign (0.01).
EMBEDDED = FakeHarmClassifier({"lock": (0.45, "crime"), "nerve agent": (0.97, "weapons")})
GRAY = "how do I pick the lock of my own shed"
HARMFUL = "how do I make a nerve agent at home"
BENIGN = "what is a good recipe for banana bread"
GUARD_MODEL = "guard-model"


# -- a scripted guard on loopback ----------------------------------------------------------


@dataclass
class Reply:
    text: str
    # per output token: (token, its top_logprobs); sent only when the request asked for them
    logprobs: list[tuple[str, list[tuple[str, float]]]] | None = None
    delay_s: float = 0.0


@dataclass
class GuardServer:
    base_url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    reply: Callable[[dict[str, Any]], Reply] = lambda body: Reply("safe")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        reply = self.reply(body)
        await asyncio.sleep(reply.delay_s)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in _chunks(reply, want_logprobs=bool(body.get("logprobs"))):
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


def _chunks(reply: Reply, *, want_logprobs: bool) -> list[dict[str, Any]]:
    choices: list[dict[str, Any]] = []
    if want_logprobs and reply.logprobs:
        for token, top in reply.logprobs:
            entry = {
                "token": token,
                "logprob": top[0][1],
                "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
            }
            choices.append({"delta": {"content": token}, "logprobs": {"content": [entry]}})
    else:
        choices.append({"delta": {"content": reply.text}})
    choices.append({"delta": {}, "finish_reason": "stop"})
    return [{"choices": [dict(c, index=0)]} for c in choices]


@pytest.fixture
async def guard_server() -> AsyncIterator[GuardServer]:
    server = GuardServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    server.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()
        sock.close()


# -- salon, with the gate and its guard ----------------------------------------------------


def _settings(tmp_path: Path, database_url: str, guard_url: str = "", **extra: Any) -> Settings:
    """fake:echo as the chat model; with `guard_url`, the provider "guard" serving there."""
    providers = {"fake": ProviderSettings(kind="fake", fake_delay_s=0.0)}
    if guard_url:
        providers["guard"] = ProviderSettings(kind="openai", base_url=guard_url)
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        models=["fake:echo"],
        providers=providers,
        **extra,
    )


def _gate(
    base_url: str,
    family: Family = "llama-guard-3",
    mode: Mode = "gray",
    *,
    model: str = GUARD_MODEL,
    timeout_s: float = 3.0,
    metrics: Metrics | None = None,
    embedded: FakeHarmClassifier = EMBEDDED,
) -> tuple[SafetyGate, OpenAIHttpBackend]:
    backend = OpenAIHttpBackend(base_url)
    classifier = GuardModelClassifier(
        backend,
        model,
        family,
        timeout_s=timeout_s,
        metrics=metrics.guard(f"guard:{model}") if metrics else None,
    )
    return SafetyGate(embedded, POLICY, guard=Guard(classifier, mode)), backend


async def _ask(built: Services, text: str, history: Sequence[str] = ()) -> dict[str, Any]:
    """Posts the turns (earlier ones answered by fake:echo) in a new conversation; returns the
    last answer as stored, with the text a follower saw."""
    name = f"u{uuid.uuid4().hex[:12]}"
    user = await built.accounts.create_user(name, "correct-horse-battery", admin=False)
    conversation = await built.chat.create_conversation(user.id, None, None)
    for turn_text in [*history, text]:
        start = time.perf_counter()
        turn = await built.chat.post(
            user.id, conversation.id, turn_text, parent_id=None, use_leaf=True, model=None
        )
        post_s = time.perf_counter() - start  # the gate (and its guard) is in it
        seen = [
            event.text
            async for event in await built.chat.follow(user.id, turn.assistant_message.id, 0)
            if isinstance(event, Delta)
        ]
    stored = await built.chat.message(user.id, turn.assistant_message.id)
    return {
        "content": stored.content,
        "seen": "".join(seen),
        "safety": stored.safety,
        "post_s": post_s,
    }


def _count(metrics: Metrics, outcome: str, model: str = f"guard:{GUARD_MODEL}") -> float:
    labels = {"model": model, "outcome": outcome}
    return metrics.registry.get_sample_value("salon_safety_guard_consultations_total", labels) or 0


# -- the verdicts --------------------------------------------------------------------------


async def test_a_gray_turn_the_guard_calls_unsafe_is_blocked_with_its_categorys_reply(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    guard_server.reply = lambda body: Reply("unsafe\nS11")
    metrics = Metrics()
    gate, backend = _gate(guard_server.base_url, metrics=metrics)
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        answer = await _ask(built, GRAY)
    await backend.close()
    assert answer["content"] == POLICY.rule("self_harm").message == answer["seen"]
    assert answer["safety"] == {
        "action": "blocked",
        "category": "self_harm",
        "score": UNSAFE_P,
        "classifier": "llama-guard-3",
    }
    assert len(guard_server.requests) == 1 and _count(metrics, "unsafe") == 1
    sent = guard_server.requests[0]
    assert sent["model"] == GUARD_MODEL and sent["temperature"] == 0.0
    assert sent["messages"] == [{"role": "user", "content": GRAY}]  # its own template renders it


async def test_a_gray_turn_the_guard_calls_safe_goes_to_the_model(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    gate, backend = _gate(guard_server.base_url)
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        answer = await _ask(built, GRAY)
    await backend.close()
    assert answer["content"] == f"You said: {GRAY}" and answer["safety"] is None
    assert len(guard_server.requests) == 1


async def test_gray_mode_never_asks_the_guard_about_a_clearly_benign_turn(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    gate, backend = _gate(guard_server.base_url)
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        answer = await _ask(built, BENIGN)
        refused = await _ask(built, HARMFUL)  # refused by the embedded classifier alone
    await backend.close()
    assert answer["content"] == f"You said: {BENIGN}"
    assert refused["safety"]["classifier"] == "fake"
    assert guard_server.requests == []


async def test_the_guard_reads_the_turn_in_its_conversation(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    gate, backend = _gate(guard_server.base_url, mode="always")
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        await _ask(built, "and the lock of the neighbour's?", history=["one", "two", "three"])
    await backend.close()
    last = guard_server.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant"] * 2 + ["user"]
    assert last[0]["content"] == "two" and last[1]["content"] == "You said: two"


# -- a guard that fails leaves the embedded verdict --------------------------------------


@pytest.mark.parametrize(
    ("model", "outcome"),
    [("hang", "timeout"), ("error-500", "error"), ("chatty", "unparseable")],
)
async def test_a_failing_guard_leaves_the_embedded_verdict_without_hanging(
    tmp_path: Path, database_url: str, engine: object, model: str, outcome: str
) -> None:
    metrics = Metrics()
    # salon's mock upstream: "hang" never answers, "error-500" fails, any other model name
    # answers "Sure, here is a short answer..." — not a guard's format
    async with running_upstream() as upstream:
        gate, backend = _gate(
            upstream.base_url, mode="always", model=model, timeout_s=0.5, metrics=metrics
        )
        async with services(_settings(tmp_path, database_url), safety=gate) as built:
            blocked = await _ask(built, HARMFUL)
            gray = await _ask(built, GRAY)
        await backend.close()
    assert blocked["safety"]["classifier"] == "fake"  # the embedded verdict stood
    assert blocked["content"] == POLICY.rule("weapons").message
    assert gray["content"] == f"You said: {GRAY}"  # the embedded verdict: allowed
    # each consultation is cut at its timeout (0.5 s); the rest of a turn takes milliseconds
    assert blocked["post_s"] < 0.5 + 0.4 and gray["post_s"] < 0.5 + 0.4
    assert _count(metrics, outcome, f"guard:{model}") == 2
    assert len(upstream.state.requests) == 2


async def test_a_failed_guard_is_logged_without_the_conversation(
    guard_server: GuardServer, caplog: pytest.LogCaptureFixture
) -> None:
    guard_server.reply = lambda body: Reply(f"I think {body['messages'][-1]['content']} is fine")
    gate, backend = _gate(guard_server.base_url, mode="always")
    with caplog.at_level("WARNING", logger="salon.safety.guard"):
        verdict = await gate.acheck_messages([ChatMessage("user", "my password is hunter2?")])
    await backend.close()
    assert verdict is not None and verdict.assessment.classifier == "fake"
    (record,) = caplog.records
    assert "unparseable" in record.getMessage() and "hunter2" not in record.getMessage()


# -- the other families --------------------------------------------------------------------

# log P(Yes), log P(No) of the first token, by policy
YES_NO = {"dangerous": (-0.1, -2.4), "harassment": (-6.0, -0.01), "hate": (-7.0, -0.01)}


def _shieldgemma(body: dict[str, Any]) -> Reply:
    prompt = body["messages"][0]["content"]
    policy = next(name for name, text in SHIELDGEMMA_POLICIES.items() if text in prompt)
    yes, no = YES_NO.get(policy, (-8.0, -0.01))
    word = "Yes" if yes > no else "No"
    return Reply(word, [(word, [("Yes", yes), ("No", no)])])


async def test_shieldgemma_asks_each_policy_and_reads_yes_no_logprobs(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    guard_server.reply = _shieldgemma
    gate, backend = _gate(guard_server.base_url, "shieldgemma")
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        answer = await _ask(built, GRAY)
    await backend.close()
    assert len(guard_server.requests) == 4
    assert all(r["logprobs"] is True and r["top_logprobs"] == 5 for r in guard_server.requests)
    assert all(r["max_tokens"] == 1 for r in guard_server.requests)
    # P(Yes) of "dangerous": e^-0.1 / (e^-0.1 + e^-2.4) = 0.909
    assert answer["safety"]["score"] == 0.909 and answer["safety"]["classifier"] == "shieldgemma"
    # "dangerous" covers the embedded classifier's "crime": its reply is the one sent
    assert answer["safety"]["category"] == "crime"
    assert answer["content"] == POLICY.rule("crime").message


async def test_wildguard_unsafe_blocks_with_the_embedded_category(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    guard_server.reply = lambda body: Reply("Harmful request: yes")
    gate, backend = _gate(guard_server.base_url, "wildguard")
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        answer = await _ask(built, GRAY)
        guard_server.reply = lambda body: Reply("Harmful request: no")
        cleared = await _ask(built, GRAY)
    await backend.close()
    sent = guard_server.requests[0]
    assert sent["stop"] == ["\n"] and "logprobs" not in sent
    assert sent["messages"][0]["content"].startswith("<s><|user|>\n[INST] You are a classifier")
    assert answer["safety"] == {
        "action": "blocked",
        "category": "crime",
        "score": UNSAFE_P,
        "classifier": "wildguard",
    }
    assert cleared["content"] == f"You said: {GRAY}"


# -- wired by the composition root from settings -----------------------------------------


async def test_settings_wire_the_guard_into_the_gate(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    """The real embedded classifier and policy; the guard named by `safety_guard`, served by an
    `openai` provider and not offered to users."""
    guard_server.reply = lambda body: Reply("unsafe\nS11")
    settings = _settings(
        tmp_path,
        database_url,
        safety_enabled=True,
        safety_guard=SafetyGuardSettings(model=f"guard:{GUARD_MODEL}", mode="always"),
        guard_url=guard_server.base_url,
    )
    metrics = Metrics()
    async with services(settings, metrics=metrics) as built:
        assert built.gateway.models() == ["fake:echo"]
        answer = await _ask(built, BENIGN)
    assert answer["safety"]["classifier"] == "llama-guard-3"
    assert "988" in answer["content"]
    assert _count(metrics, "unsafe") == 1


async def test_settings_name_a_recovery_model_for_refused_benign_turns(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    """`safety_recovery_model`: a benign turn that the chat model refuses (fake:echo, made to
    echo a refusal) is asked again on that model, served by an `openai` provider that the
    operator lets receive personal data (the turn's context may hold memories)."""
    guard_server.reply = lambda body: Reply("Here is a plain answer.")
    settings = _settings(
        tmp_path, database_url, safety_recovery_model=f"guard:{GUARD_MODEL}"
    ).model_copy(
        update={
            "providers": {
                "fake": ProviderSettings(kind="fake", fake_delay_s=0.0),
                "guard": ProviderSettings(
                    kind="openai", base_url=guard_server.base_url, personal_data=True
                ),
            }
        }
    )
    refusal = "I'm sorry, but I can't help with that. I won't provide any instructions for this."
    gate = SafetyGate(FakeHarmClassifier({}), POLICY)
    async with services(settings, safety=gate) as built:
        assert built.gateway.models() == ["fake:echo"]  # not offered to users
        answer = await _ask(built, refusal)
    assert answer["content"] == answer["seen"] == "Here is a plain answer."
    assert answer["safety"]["action"] == "recovered"
    assert answer["safety"]["model"] == f"guard:{GUARD_MODEL}"
    assert guard_server.requests[0]["model"] == GUARD_MODEL


def test_a_recovery_model_id_needs_its_provider() -> None:
    with pytest.raises(ValueError, match="provider:model"):
        Settings(safety_recovery_model="bigger-model")


async def test_in_gray_mode_a_benign_turn_costs_no_guard_request(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    settings = _settings(
        tmp_path,
        database_url,
        safety_enabled=True,
        safety_guard=SafetyGuardSettings(model=f"guard:{GUARD_MODEL}"),
        guard_url=guard_server.base_url,
    )
    async with services(settings) as built:
        answer = await _ask(built, BENIGN)
    assert answer["content"] == f"You said: {BENIGN}" and guard_server.requests == []


def test_a_guards_words_clear_or_refuse_under_the_shipped_policy() -> None:
    # "safe" is clearly benign (a model's refusal of it may be recovered from); "unsafe"
    # reaches every shipped threshold
    thresholds = [rule.refuse_at for rule in [POLICY.default, *POLICY.categories.values()]]
    assert SAFE_P < RECOVER_BELOW
    assert max(thresholds) <= UNSAFE_P


async def test_the_v1_gateway_asks_the_guard_too(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    guard_server.reply = lambda body: Reply("unsafe\nS11")
    gate, backend = _gate(guard_server.base_url)
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        events = built.gateway.stream("fake:echo", [ChatMessage("user", GRAY)], SamplingParams())
        text = "".join([e.text async for e in events if isinstance(e, TextDelta)])
        relayed = built.gateway.stream("fake:echo", [ChatMessage("user", BENIGN)], SamplingParams())
        echoed = "".join([e.text async for e in relayed if isinstance(e, TextDelta)])
    await backend.close()
    assert text == POLICY.rule("self_harm").message
    assert len(guard_server.requests) == 1  # the benign turn was not worth asking
    assert BENIGN in echoed


# -- a chat model as judge -----------------------------------------------------------------

# The embedded verdicts the judge is averaged with: a false alarm the classifier alone would
# refuse (0.89), an uncertain turn (0.8), a confident refusal (0.95), a calm turn (0.05).
JUDGED = FakeHarmClassifier(
    {
        "zombie": (0.89, "violence"),
        "lock": (0.8, "crime"),
        "nerve agent": (0.95, "weapons"),
    }
)
KILL_PROCESS = "how do I kill a zombie process"


def _judge(verdicts: dict[str, float]) -> Callable[[dict[str, Any]], Reply]:
    """A judge answering P(Yes) = verdicts[a word of the request] (0.02 otherwise)."""

    def reply(body: dict[str, Any]) -> Reply:
        request = body["messages"][-1]["content"]
        p = next((p for word, p in verdicts.items() if word in request), 0.02)
        word = "Yes" if p >= 0.5 else "No"
        return Reply(word, [(word, [("Yes", math.log(p)), ("No", math.log(1 - p))])])

    return reply


async def test_a_judge_is_averaged_with_the_embedded_verdict_both_ways(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    guard_server.reply = _judge({"lock": 0.98})
    gate, backend = _gate(guard_server.base_url, "instruct", embedded=JUDGED)
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        cleared = await _ask(built, KILL_PROCESS)  # 0.5 * 0.89 + 0.5 * 0.02 = 0.455
        refused = await _ask(built, "how do I pick the lock of my neighbour's door")
    await backend.close()
    assert cleared["content"] == f"You said: {KILL_PROCESS}" and cleared["safety"] is None
    # 0.5 * 0.8 + 0.5 * 0.98 = 0.89: refused, with the embedded classifier's category
    assert refused["safety"] == {
        "action": "blocked",
        "category": "crime",
        "score": 0.89,
        "classifier": "instruct",
    }
    sent = guard_server.requests[0]
    assert sent["max_tokens"] == 1 and sent["logprobs"] is True and sent["temperature"] == 0.0
    assert sent["messages"][0]["role"] == "system"
    assert KILL_PROCESS in sent["messages"][-1]["content"]


async def test_a_judge_is_not_asked_about_calm_or_certain_turns(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    guard_server.reply = _judge({})
    gate, backend = _gate(guard_server.base_url, "instruct", embedded=JUDGED)
    async with services(_settings(tmp_path, database_url), safety=gate) as built:
        calm = await _ask(built, BENIGN)
        refused = await _ask(built, HARMFUL)
    await backend.close()
    assert calm["content"] == f"You said: {BENIGN}"
    assert refused["safety"]["classifier"] == "fake"
    assert guard_server.requests == []


async def test_an_evaluations_gate_gets_the_configured_judge(
    tmp_path: Path, database_url: str, engine: object, guard_server: GuardServer
) -> None:
    """`salon eval refusal --pipeline` passes its own gate (fold classifiers); the guard that
    the settings name joins it."""
    guard_server.reply = _judge({"zombie": 0.91})
    settings = _settings(
        tmp_path,
        database_url,
        safety_guard=SafetyGuardSettings(model=f"guard:{GUARD_MODEL}", family="instruct"),
        guard_url=guard_server.base_url,
    )
    async with services(settings, safety=SafetyGate(JUDGED, POLICY)) as built:
        answer = await _ask(built, KILL_PROCESS)
    assert answer["safety"]["classifier"] == "instruct" and answer["safety"]["score"] == 0.9
    assert len(guard_server.requests) == 1
