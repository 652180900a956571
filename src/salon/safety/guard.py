"""Guard models served by an OpenAI-compatible backend, asked in their own published formats:
Llama Guard 3 (Meta), WildGuard (AI2) and ShieldGemma (Google).

The harm gate (``salon.chat.safety``) consults a guard on the turns its mode selects; the
guard's verdict, an `Assessment` like the embedded classifier's, then goes through the same
policy. A guard that times out, fails or answers out of format gives no verdict (`None`): the
embedded one stands. That outcome is logged without any conversation text and counted in
`salon_safety_guard_consultations_total`.

Prompts (a user's text is stripped of the families' control tokens first, so it cannot close
the guard's prompt and answer for it):

- Llama Guard 3: the conversation (user/assistant turns alternating, ending with the turn to
  judge) under the S1-S14 hazard categories; "safe", or "unsafe" and a line of categories
  ("unsafe\\nS1,S10"). The unsafe probability is that of the first token when the backend
  returns log-probabilities, as the model card computes it.
- WildGuard: one request (and an empty response) in its instruction format; it answers
  "Harmful request: yes|no" then the refusal and response-harm lines (N/A without a response).
  No categories: the embedded classifier's, if it named one, is kept.
- instruct: any instruction-tuned chat model (the embedded one too), with salon's own system
  prompt and examples; P(Yes) of its one-token answer is averaged with the embedded
  classifier's probability (a general model is a weaker judge than a trained guard), and mode
  "gray" asks it over a wider band (`InstructJudge`).
- ShieldGemma: one request against one policy per call, as the model card recommends (four in
  parallel: dangerous content, harassment, hate speech, sexually explicit); P(Yes) from the
  Yes/No log-probabilities of the first token, the highest policy winning.

Without log-probabilities, a verdict in words maps to `UNSAFE_P` / `SAFE_P`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from time import perf_counter
from typing import ClassVar, Literal, Protocol

from salon.backends.base import TextBackend
from salon.domain import ChatMessage, CompletionRequest, SamplingParams, TextDelta, TokenLogprobs
from salon.errors import BackendTimeout, ConfigError
from salon.observability.metrics import GuardMetrics
from salon.safety.harm import CATEGORY_FROM, Assessment

log = logging.getLogger(__name__)

Family = Literal["llama-guard-3", "wildguard", "shieldgemma", "instruct"]
Mode = Literal["gray", "always"]
Render = Literal["salon", "server"]
FAMILIES: tuple[Family, ...] = ("llama-guard-3", "wildguard", "shieldgemma", "instruct")

# A verdict in words, without log-probabilities, as a probability: roughly the published
# precision of these guards on prompt classification (Llama Guard 3, English: 0.95), so an
# "unsafe" passes every shipped refusal threshold and a "safe" counts as clearly benign.
UNSAFE_P = 0.95
SAFE_P = 0.05
# Mode "gray" asks the guard from this embedded probability up to the policy's refusal
# threshold. Below it the embedded classifier is clearly calm (a benign everyday turn scores
# ~0.01-0.1); from it, benign requests that merely sound sensitive (the refusal eval in
# docs/benchmarks.md: 0.33-0.39 for ones the model refused flatly) mix with harmful ones,
# which the guard can tell apart.
GRAY_FROM = 0.3
# As the gate reads the embedded classifier: the turn, and up to two earlier user turns (with
# the answers between them, for the families that read a conversation).
CONTEXT_TURNS = 2
# Single-turn families read earlier user turns only with a short follow-up, as the embedded
# classifier does ("ok, how much would be enough?"); a self-contained turn is judged alone.
FOLLOW_UP_WORDS = 12
# Earlier messages are cut to this many characters: they only give context, and the guard's
# cost grows with its prompt. The turn itself is sent whole.
CONTEXT_CHARS = 2000
TOP_LOGPROBS = 5
GUARD_SESSION = "salon-safety-guard"
# When one answer names several harms, the reply of the most protective one is sent (a
# self-harm helpline before a generic refusal).
PRIORITY = (
    "child_safety",
    "self_harm",
    "weapons",
    "violence",
    "cyber",
    "drugs",
    "sexual",
    "fraud",
    "crime",
    "hate_harassment",
    "privacy",
    "misinformation",
    "other",
)
# Control tokens of the three prompt formats; a user's text never needs them.
_CONTROL = re.compile(
    r"<\|[a-z_]+\|>|</?s>|\[/?INST\]|<(?:start|end)_of_turn>|<(?:bos|eos)>", re.IGNORECASE
)


class Unparseable(ValueError):
    """The guard answered, but not in its format."""


# -- what the guard reads ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exchange:
    """The user turn to judge with the conversation before it: user and assistant turns
    alternating, starting and ending with the user's, cleaned of control tokens."""

    messages: tuple[ChatMessage, ...]

    @classmethod
    def of(cls, messages: Sequence[ChatMessage]) -> Exchange | None:
        """None when the conversation does not end with a user turn (nothing to judge)."""
        kept = [m for m in messages if m.role != "system" and m.content.strip()]
        if not kept or kept[-1].role != "user":
            return None
        users = [i for i, m in enumerate(kept) if m.role == "user"]
        start = users[max(0, len(users) - 1 - CONTEXT_TURNS)]
        merged: list[ChatMessage] = []
        for m in kept[start:]:
            if merged and merged[-1].role == m.role:  # an answer that failed, say
                m = ChatMessage(m.role, f"{merged.pop().content}\n\n{m.content}")
            merged.append(m)
        last = len(merged) - 1
        return cls(
            tuple(
                ChatMessage(m.role, _clean(m.content if i == last else m.content[:CONTEXT_CHARS]))
                for i, m in enumerate(merged)
            )
        )

    @property
    def turn(self) -> str:
        return self.messages[-1].content

    def request(self) -> tuple[str, bool]:
        """For the single-turn families: the request, and whether earlier turns are in it."""
        earlier = [m.content for m in self.messages[:-1] if m.role == "user"]
        if earlier and len(self.turn.split()) <= FOLLOW_UP_WORDS:
            return "\n".join([*earlier, self.turn]), True
        return self.turn, False


def _clean(text: str) -> str:
    return _CONTROL.sub("", text).strip()


@dataclass(frozen=True, slots=True)
class Probe:
    """One request to the guard model; `label` names what it asks about (a ShieldGemma
    policy)."""

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    label: str = ""
    stop: tuple[str, ...] = ()
    logprobs: bool = True


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    first: TokenLogprobs | None  # the first output position, when the backend gave it


@dataclass(frozen=True, slots=True)
class Reading:
    """One answer, read: the unsafe probability and the family's labels of what is unsafe."""

    probability: float
    labels: tuple[str, ...] = ()


class GuardFormat(Protocol):
    name: ClassVar[str]
    # the family's labels -> salon's categories (datasets.CATEGORIES), the usual one first
    categories: ClassVar[Mapping[str, tuple[str, ...]]]
    # The embedded probability's share of the verdict: 0 for a trained guard, whose verdict
    # replaces it; a general chat model asked as a judge is weaker, so the two are averaged.
    embedded_weight: ClassVar[float]
    # Mode "gray" asks from this embedded probability up to `gray_until` (None: the policy's
    # refusal threshold).
    gray_from: ClassVar[float]
    gray_until: ClassVar[float | None]

    def probes(self, exchange: Exchange) -> tuple[tuple[Probe, ...], bool]:
        """The requests to send, and whether they carry context beyond the turn."""
        ...

    def read(self, probe: Probe, answer: Answer) -> Reading: ...


def first_token_probability(position: TokenLogprobs, positive: str, negative: str) -> float | None:
    """P(positive answer) against P(negative answer) at the first output position: each
    answer's mass is that of the listed tokens that begin it and not the other ("un" counts
    for "unsafe", "s" for "safe"). None when neither answer is among the listed tokens."""
    yes = no = 0.0
    for token, logprob in position.top:
        t = token.strip().lower()
        if not t:
            continue
        starts_yes, starts_no = positive.startswith(t), negative.startswith(t)
        if starts_yes and not starts_no:
            yes += math.exp(logprob)
        elif starts_no and not starts_yes:
            no += math.exp(logprob)
    return yes / (yes + no) if yes + no > 0 else None


class TrainedGuard:
    """What the published guard families share: their verdict replaces the embedded one, and
    mode "gray" asks them from GRAY_FROM up to the policy's refusal threshold."""

    __slots__ = ()
    embedded_weight: ClassVar[float] = 0.0
    gray_from: ClassVar[float] = GRAY_FROM
    gray_until: ClassVar[float | None] = None


# -- Llama Guard 3 -------------------------------------------------------------------------

LLAMA_GUARD_3_CATEGORIES = (
    ("S1", "Violent Crimes"),
    ("S2", "Non-Violent Crimes"),
    ("S3", "Sex Crimes"),
    ("S4", "Child Exploitation"),
    ("S5", "Defamation"),
    ("S6", "Specialized Advice"),
    ("S7", "Privacy"),
    ("S8", "Intellectual Property"),
    ("S9", "Indiscriminate Weapons"),
    ("S10", "Hate"),
    ("S11", "Self-Harm"),
    ("S12", "Sexual Content"),
    ("S13", "Elections"),
    ("S14", "Code Interpreter Abuse"),
)
_LLAMA_GUARD_HEAD = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    "Task: Check if there is unsafe content in 'User' messages in conversations according our "
    "safety policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    + "\n".join(f"{code}: {name}." for code, name in LLAMA_GUARD_3_CATEGORIES)
    + "\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
)
_LLAMA_GUARD_TAIL = (
    "\n\n<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST User message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)
_LLAMA_GUARD_CODES = re.compile(r"S\d{1,2}")


def llama_guard_prompt(exchange: Exchange) -> str:
    """The published Llama Guard 3 prompt for the last user turn (what its chat template
    renders from the same conversation)."""
    turns = "\n\n".join(
        f"{'User' if m.role == 'user' else 'Agent'}: {m.content}" for m in exchange.messages
    )
    return f"{_LLAMA_GUARD_HEAD}{turns}{_LLAMA_GUARD_TAIL}"


def parse_llama_guard(text: str) -> tuple[str, ...] | None:
    """None for "safe"; for "unsafe", the violated categories (possibly none listed)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    verdict = lines[0].lower() if lines else ""
    if verdict == "safe":
        return None
    if verdict != "unsafe":
        raise Unparseable("Llama Guard answers 'safe' or 'unsafe'")
    if len(lines) < 2:
        return ()
    codes = tuple(code.strip().upper() for code in lines[1].split(",") if code.strip())
    if not all(_LLAMA_GUARD_CODES.fullmatch(code) for code in codes):
        raise Unparseable("Llama Guard's second line lists categories S1-S14")
    return codes


@dataclass(frozen=True, slots=True)
class LlamaGuard3(TrainedGuard):
    render: Render = "server"
    name: ClassVar[str] = "llama-guard-3"
    categories: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "S1": ("violence", "weapons", "hate_harassment"),
        "S2": ("crime", "fraud", "drugs", "cyber", "weapons", "privacy"),
        "S3": ("sexual",),
        "S4": ("child_safety",),
        "S5": ("misinformation", "hate_harassment"),
        "S6": ("other",),
        "S7": ("privacy",),
        "S8": ("other",),
        "S9": ("weapons",),
        "S10": ("hate_harassment",),
        "S11": ("self_harm",),
        "S12": ("sexual",),
        "S13": ("misinformation",),
        "S14": ("cyber",),
    }

    def probes(self, exchange: Exchange) -> tuple[tuple[Probe, ...], bool]:
        if self.render == "server":  # the model's chat template renders the same prompt
            messages = exchange.messages
        else:
            messages = (ChatMessage("user", llama_guard_prompt(exchange)),)
        # "unsafe\nS1,S2,S10" is about ten tokens.
        return (Probe(messages, max_tokens=20),), len(exchange.messages) > 1

    def read(self, probe: Probe, answer: Answer) -> Reading:
        codes = parse_llama_guard(answer.text)
        p = first_token_probability(answer.first, "unsafe", "safe") if answer.first else None
        if p is None:
            p = SAFE_P if codes is None else UNSAFE_P
        return Reading(p, codes or ())


# -- WildGuard -----------------------------------------------------------------------------

_WILDGUARD_FORMAT = (
    "<s><|user|>\n"
    "[INST] You are a classifier for analyzing interactions between humans and LLMs. Given a "
    "request from a human user and a response from an LLM assistant, determine 1) whether the "
    "human user's request is harmful, 2) whether the AI assistant's response is a refusal, and "
    "3) whether the AI assistant's response is harmful.\n\n"
    "Human user:\n{prompt}\n\n"
    "AI assistant:\n{response}\n\n"
    "---\n\n"
    "Answers: [/INST]\n"
    "<|assistant|>\n"
)


def wildguard_prompt(request: str, response: str = "") -> str:
    """The published WildGuard instruction format; an empty response classifies the request
    alone, as AI2's own wildguard package does."""
    return _WILDGUARD_FORMAT.format(prompt=request, response=response)


def parse_wildguard(text: str) -> bool:
    """Whether WildGuard calls the request harmful ("Harmful request: yes")."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "harmful request":
            answer = value.strip().lower()
            if answer not in ("yes", "no"):
                break
            return answer == "yes"
    raise Unparseable("WildGuard answers 'Harmful request: yes|no'")


@dataclass(frozen=True, slots=True)
class WildGuard(TrainedGuard):
    name: ClassVar[str] = "wildguard"
    # WildGuard names no category: the embedded classifier's stands (see GuardModelClassifier).
    categories: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def probes(self, exchange: Exchange) -> tuple[tuple[Probe, ...], bool]:
        request, used = exchange.request()
        messages = (ChatMessage("user", wildguard_prompt(request)),)
        # Only the first of its three lines matters here: stop after it.
        return (Probe(messages, max_tokens=16, stop=("\n",), logprobs=False),), used

    def read(self, probe: Probe, answer: Answer) -> Reading:
        return Reading(UNSAFE_P if parse_wildguard(answer.text) else SAFE_P)


# -- ShieldGemma ---------------------------------------------------------------------------

# The model card's prompt-only guidelines for the four harm types ShieldGemma was evaluated on.
SHIELDGEMMA_POLICIES = {
    "dangerous": (
        '"No Dangerous Content": The prompt shall not contain or seek generation of content that '
        "harming oneself and/or others (e.g., accessing or building firearms and explosive "
        "devices, promotion of terrorism, instructions for suicide)."
    ),
    "harassment": (
        '"No Harassment": The prompt shall not contain or seek generation of content that is '
        "malicious, intimidating, bullying, or abusive content targeting another individual "
        "(e.g., physical threats, denial of tragic events, disparaging victims of violence)."
    ),
    "hate": (
        '"No Hate Speech": The prompt shall not contain or seek generation of content that '
        "targeting identity and/or protected attributes (e.g., racial slurs, promotion of "
        "discrimination, calls to violence against protected groups) or "
        "dehumanizing/belittling/vilifying on the bases of race, ethnicity, religion, "
        "disability, age, nationality, veteran status, sexual orientation, gender, gender "
        "identity, caste, or any other protected status. We do allow content that includes a "
        "reference to a protected individual or group in a positive manner."
    ),
    "sexual": (
        '"No Sexually Explicit Information": The prompt shall not contain or seek generation of '
        "content that contains references to sexual acts or other lewd content (e.g., sexually "
        "graphic descriptions, content aimed at causing arousal). Medical or scientific terms "
        "related to human anatomy or sex education are permitted."
    ),
}


def shieldgemma_prompt(request: str, policy: str) -> str:
    """The model card's prompt for one user request against one policy. `<bos>` is written
    out because a pass-through chat template adds nothing (the card tokenizes with it)."""
    return (
        "<bos>You are a policy expert trying to help determine whether a user prompt is in "
        "violation of the defined safety policies.\n\n"
        f"<start_of_turn>\nHuman Question: {request}\n<end_of_turn>\n\n"
        "Our safety principle is defined in the below:\n\n"
        f"* {policy}\n\n"
        "===\n\n"
        "Does the human question violate the above principle? Your answer must start with "
        "'Yes' or 'No'. And then walk through step by step to be sure we answer correctly.\n\n"
    )


def parse_shieldgemma(text: str) -> bool:
    """Whether ShieldGemma says the policy is violated (its answer starts with Yes or No)."""
    word = text.strip().split(maxsplit=1)[0].strip(".,:!").lower() if text.strip() else ""
    if word not in ("yes", "no"):
        raise Unparseable("ShieldGemma answers 'Yes' or 'No'")
    return word == "yes"


@dataclass(frozen=True, slots=True)
class ShieldGemma(TrainedGuard):
    name: ClassVar[str] = "shieldgemma"
    categories: ClassVar[Mapping[str, tuple[str, ...]]] = {
        # "dangerous" spans weapons, terrorism and suicide: the embedded classifier's category
        # says which, when it is one of these; otherwise the generic refusal.
        "dangerous": ("other", "weapons", "violence", "self_harm", "drugs", "cyber", "crime"),
        "harassment": ("hate_harassment", "violence"),
        "hate": ("hate_harassment",),
        "sexual": ("sexual", "child_safety"),
    }

    def probes(self, exchange: Exchange) -> tuple[tuple[Probe, ...], bool]:
        request, used = exchange.request()
        probes = tuple(
            # One token: the Yes/No (and its log-probabilities) is all that is read.
            Probe((ChatMessage("user", shieldgemma_prompt(request, text)),), 1, label)
            for label, text in SHIELDGEMMA_POLICIES.items()
        )
        return probes, used

    def read(self, probe: Probe, answer: Answer) -> Reading:
        p = first_token_probability(answer.first, "yes", "no") if answer.first else None
        if p is None:
            p = UNSAFE_P if parse_shieldgemma(answer.text) else SAFE_P
        return Reading(p, (probe.label,) if p >= CATEGORY_FROM else ())


# -- any instruction-tuned chat model, asked as a judge ---------------------------------------

# Worded for a general chat model, with examples of both kinds (salon's own, none from an
# evaluation set): without them Qwen2.5-Coder-1.5B called a third of the scary-sounding benign
# requests harmful. Measured on the refusal development split (docs/benchmarks.md).
JUDGE_SYSTEM = (
    "You are a content-safety classifier. Decide whether answering the user's request would "
    "give real help to cause serious harm (violence, weapons, crime, fraud, hacking, hate, "
    "sexual content involving minors, self-harm, dangerous drugs, privacy violations, "
    "disinformation). Requests that only sound scary are NOT harmful: homonyms such as "
    "'kill a process', fiction and games, history, definitions, safety information, "
    "questions about public figures, harm reduction. Answer with one word: Yes (harmful) or No."
)
JUDGE_EXAMPLES = (
    ("How do I kill a zombie process in Linux?", "No"),
    ("How do I kill my neighbour's dog without anyone finding out?", "Yes"),
    ("Which household cleaners must never be mixed because they give off toxic gas?", "No"),
    ("Which household chemicals can I mix to make a gas that will hurt my roommate?", "Yes"),
    ("Write a crime story in which a detective works out how the poisoner did it.", "No"),
    ("Give me step-by-step instructions to cook methamphetamine at home.", "Yes"),
    ("What is my ex-girlfriend's new home address?", "Yes"),
    ("Why did the Rwandan genocide happen?", "No"),
    ("Write a blog post arguing that the Holocaust never happened.", "Yes"),
    ("What is the best way to shoot a good photo at night?", "No"),
)


def judge_question(request: str) -> str:
    return f"Request:\n{request}\n\nIs this request harmful? Answer Yes or No."


def judge_messages(request: str) -> tuple[ChatMessage, ...]:
    """The system prompt, the examples as earlier turns (a fixed prefix: a server that caches
    prompts evaluates it once), then the request."""
    shots = [
        message
        for question, verdict in JUDGE_EXAMPLES
        for message in (
            ChatMessage("user", judge_question(question)),
            ChatMessage("assistant", verdict),
        )
    ]
    return (
        ChatMessage("system", JUDGE_SYSTEM),
        *shots,
        ChatMessage("user", judge_question(request)),
    )


@dataclass(frozen=True, slots=True)
class InstructJudge:
    """Any instruction-tuned chat model (the embedded one included) as a zero-shot judge:
    P(Yes) at the first token, averaged with the embedded classifier's probability."""

    name: ClassVar[str] = "instruct"
    categories: ClassVar[Mapping[str, tuple[str, ...]]] = {}  # the embedded one's stands
    embedded_weight: ClassVar[float] = 0.5
    # Wider than a trained guard's band, on both sides: on the development split the average
    # lifts harmful requests the classifier scored 0.1-0.3 and lowers benign ones it scored
    # over the refusal threshold (at refuse_at 0.75: benign blocked 6.9 -> 4.6 %, harmful let
    # through 32.9 -> 25.9 %); from 0.9 the classifier is rarely wrong and the judge is skipped.
    gray_from: ClassVar[float] = 0.1
    gray_until: ClassVar[float | None] = 0.9

    def probes(self, exchange: Exchange) -> tuple[tuple[Probe, ...], bool]:
        request, used = exchange.request()
        return (Probe(judge_messages(request), max_tokens=1),), used

    def read(self, probe: Probe, answer: Answer) -> Reading:
        p = first_token_probability(answer.first, "yes", "no") if answer.first else None
        if p is None:
            word = (
                answer.text.strip().split(maxsplit=1)[0].strip(".,:!").lower()
                if answer.text.strip()
                else ""
            )
            if word not in ("yes", "no"):
                raise Unparseable("the judge answers 'Yes' or 'No'")
            p = UNSAFE_P if word == "yes" else SAFE_P
        return Reading(p)


def guard_format(family: Family, render: Render | None = None) -> GuardFormat:
    """The family's format; `render` is who renders its prompt (unset: the family's usual)."""
    if family == "llama-guard-3":
        return LlamaGuard3(render or "server")
    if family == "instruct":  # plain chat messages: the model's own template renders them
        return InstructJudge()
    if render == "server":
        raise ConfigError(f"{family} has no chat template of its own: use prompt = salon")
    if family == "wildguard":
        return WildGuard()
    if family == "shieldgemma":
        return ShieldGemma()
    raise ConfigError(f"unknown guard family {family!r}; one of {', '.join(FAMILIES)}")


def salon_category(fmt: GuardFormat, labels: Sequence[str], embedded: str | None) -> str | None:
    """A guard's labels as one of salon's categories: the embedded classifier's when the labels
    allow it (it knows salon's finer ones: "drugs" within "non-violent crimes"), else the most
    protective usual one. No labels (WildGuard names none): the embedded classifier's."""
    if not labels:
        return embedded
    allowed = [c for label in labels for c in fmt.categories.get(label, ("other",))]
    if embedded in allowed:
        return embedded
    usual = [fmt.categories.get(label, ("other",))[0] for label in labels]
    return min(usual, key=PRIORITY.index)


# -- the classifier ------------------------------------------------------------------------


class GuardModelClassifier:
    """Asks a guard model served by `backend` (the model's name there: `model`) about the last
    user turn of a conversation, within `timeout_s` for the whole consultation."""

    def __init__(
        self,
        backend: TextBackend,
        model: str,
        family: Family,
        *,
        timeout_s: float = 3.0,
        render: Render | None = None,
        metrics: GuardMetrics | None = None,
    ) -> None:
        self._backend = backend
        self._model = model
        self._format = guard_format(family, render)
        self._timeout_s = timeout_s
        self._metrics = metrics

    @property
    def name(self) -> str:
        return self._format.name

    def band(self, refuse_at: float) -> tuple[float, float]:
        """The embedded probabilities for which mode "gray" asks this guard."""
        until = self._format.gray_until
        return self._format.gray_from, refuse_at if until is None else until

    async def assess(
        self, messages: Sequence[ChatMessage], embedded: Assessment | None = None
    ) -> Assessment | None:
        """The guard's verdict on the last user turn, or None when it gave none (timed out,
        failed, answered out of format: logged and counted here). `embedded`, the embedded
        classifier's verdict, only narrows the category when the guard's is broad."""
        exchange = Exchange.of(messages)
        if exchange is None:
            return None
        probes, used_context = self._format.probes(exchange)
        start = perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                readings = await self._ask_all(probes)
        except Exception as exc:  # whatever goes wrong with the guard, the embedded verdict stands
            self._failed(exc, perf_counter() - start)
            return None
        assessment = self._assessment(readings, used_context, embedded)
        outcome = "unsafe" if assessment.harmful_probability >= CATEGORY_FROM else "safe"
        self._observe(outcome, perf_counter() - start)
        return assessment

    async def _ask_all(self, probes: Sequence[Probe]) -> list[Reading]:
        if len(probes) == 1:
            return [await self._ask(probes[0])]
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the others
                tasks = [group.create_task(self._ask(probe)) for probe in probes]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _ask(self, probe: Probe) -> Reading:
        params = SamplingParams(
            max_tokens=probe.max_tokens,
            temperature=0.0,
            stop=probe.stop,
            top_logprobs=TOP_LOGPROBS if probe.logprobs else None,
        )
        # One session for every consultation: the embedded backend (with two slots or more)
        # pins it to a slot of its own, so the guard's fixed prompt prefix stays evaluated
        # between turns instead of being evicted by each chat; an engine with prefix-aware
        # routing keeps it on one replica.
        request = CompletionRequest(self._model, probe.messages, params, session_key=GUARD_SESSION)
        return self._format.read(probe, await _collect(self._backend, request))

    def _assessment(
        self, readings: Sequence[Reading], used_context: bool, embedded: Assessment | None
    ) -> Assessment:
        p = max(reading.probability for reading in readings)
        if embedded is not None and (weight := self._format.embedded_weight):
            p = weight * embedded.harmful_probability + (1 - weight) * p
        if p < CATEGORY_FROM:
            return Assessment(p, None, 0.0, used_context, self.name)
        labels = [label for reading in readings for label in reading.labels]
        category = salon_category(self._format, labels, embedded.category if embedded else None)
        return Assessment(p, category, p if category else 0.0, used_context, self.name)

    def _failed(self, exc: BaseException, seconds: float) -> None:
        if isinstance(exc, TimeoutError | BackendTimeout):
            outcome = "timeout"
        elif isinstance(exc, Unparseable):
            outcome = "unparseable"
        else:
            outcome = "error"
        # Never the prompt, the answer or an upstream's message (which may quote the request).
        log.warning(
            "guard %s gave no verdict (%s, %s after %.2f s); the embedded classifier's stands",
            self.name,
            outcome,
            type(exc).__name__,
            seconds,
            extra={"guard": self.name, "outcome": outcome},
        )
        self._observe(outcome, seconds)

    def _observe(self, outcome: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.consulted(outcome, seconds)


async def _collect(backend: TextBackend, request: CompletionRequest) -> Answer:
    """The whole (short) answer and its first position's log-probabilities; the stream is
    closed whatever happens, so a timeout releases the connection at once."""
    parts: list[str] = []
    first: TokenLogprobs | None = None
    async with aclosing(backend.stream(request)) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                if first is None and event.logprobs:
                    first = event.logprobs[0]
    return Answer("".join(parts), first)


@dataclass(frozen=True, slots=True)
class Guard:
    """A guard model and when the harm gate consults it."""

    classifier: GuardModelClassifier
    mode: Mode = "gray"

    def wanted(self, embedded: Assessment, refuse_at: float) -> bool:
        """Every turn ("always"), or one the embedded classifier is unsure about: for a
        trained guard, neither clearly benign (below GRAY_FROM) nor refused by the policy
        (from `refuse_at`); for a chat model as judge, its wider band."""
        if self.mode == "always":
            return True
        low, high = self.classifier.band(refuse_at)
        return low <= embedded.harmful_probability < high
