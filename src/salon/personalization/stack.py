"""The instruction stack of one turn: each layer's text, in the documented order, and the
one system message the model receives (what the preview shows, byte for byte).

Order, highest authority first: operator → personality (account, persona or conversation)
→ characteristics and length → about you → how to respond → saved memories → earlier
conversations. The user's message itself comes after the system message and is read by the
checks: what it asks overrides the stored settings (see checks.derive_constraints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from salon.personalization.checks import Constraint
from salon.personalization.profile import Characteristics, Effective

OPERATOR_NOTE = (
    "The instructions above come from the operator of this service and take precedence "
    "over everything below."
)
# Tone has no code check; it is asked for in words. Checkable settings are listed as rules.
TONE = {
    ("warm", "less"): "Keep a neutral, matter-of-fact tone.",
    ("warm", "more"): "Be especially warm and caring toward the user.",
    ("enthusiastic", "less"): "Stay calm and understated; avoid exclamation marks.",
    ("enthusiastic", "more"): "Be upbeat and enthusiastic.",
    ("headers_lists", "more"): "Organise multi-part answers with markdown headers and lists.",
    ("headers_lists", "less"): "Write in plain paragraphs.",
}
LENGTH = {
    "concise": "Keep answers short and to the point.",
    "detailed": "Give thorough, detailed answers.",
}
WITHHELD = "not sent to this model (the operator keeps personal data from it)"


@dataclass(frozen=True, slots=True)
class Recalled:
    """A memory or an earlier message chosen for the context."""

    key: str  # "memory:<id>" | "message:<id>"
    kind: str
    text: str
    created_at: datetime
    score: float


@dataclass(frozen=True, slots=True)
class Layer:
    id: str
    title: str
    source: str  # "operator" | "account" | "persona" | "conversation" | "memory" | "history"
    text: str
    withheld: str | None = None  # why it is not sent, when it is not


@dataclass(frozen=True, slots=True)
class TurnContext:
    layers: tuple[Layer, ...]
    system: str
    constraints: tuple[Constraint, ...]
    recalled: tuple[Recalled, ...]


def compose(
    *,
    operator: str | None,
    effective: Effective,
    constraints: Sequence[Constraint],
    memories: Sequence[Recalled] = (),
    history: Sequence[Recalled] = (),
    share_personal: bool = True,
) -> TurnContext:
    layers = [
        layer
        for layer in (
            _operator(operator),
            _personality(effective),
            _style(effective, constraints),
            _about(effective, share_personal),
            _how_to_respond(effective, share_personal),
            _memories(memories, share_personal),
            _history(history, share_personal),
        )
        if layer is not None
    ]
    sent = [layer.text for layer in layers if layer.withheld is None and layer.text]
    recalled = (*memories, *history) if share_personal else ()
    return TurnContext(tuple(layers), "\n\n".join(sent), tuple(constraints), tuple(recalled))


def _operator(text: str | None) -> Layer | None:
    if not text or not text.strip():
        return None
    return Layer(
        "operator", "Operator instructions", "operator", f"{text.strip()}\n{OPERATOR_NOTE}"
    )


def _personality(effective: Effective) -> Layer:
    source = effective.sources.get("personality", "account")
    return Layer("personality", "Personality", source, effective.personality_text)


def _style(effective: Effective, constraints: Sequence[Constraint]) -> Layer | None:
    lines = _tone(effective.characteristics)
    if effective.length in LENGTH:
        lines.append(LENGTH[effective.length])
    rules = [c.describe() for c in constraints if c.source != "message"]
    if rules:
        lines.append("Rules for every reply:")
        lines.extend(f"- {rule}" for rule in rules)
    if not lines:
        return None
    source = effective.sources.get("characteristics", "account")
    return Layer("style", "Characteristics", source, "\n".join(lines))


def _tone(characteristics: Characteristics) -> list[str]:
    chosen = characteristics.model_dump().items()
    return [TONE[(name, level)] for name, level in chosen if (name, level) in TONE]


def _about(effective: Effective, share: bool) -> Layer | None:
    about = effective.about
    parts = []
    if about.nickname:
        parts.append(f"Call the user {about.nickname}.")
    if about.occupation:
        parts.append(f"Their occupation: {about.occupation}.")
    if about.more:
        parts.append(about.more)
    if not parts:
        return None
    text = "About the user:\n" + " ".join(parts)
    return Layer("about", "About you", "account", text, None if share else WITHHELD)


def _how_to_respond(effective: Effective, share: bool) -> Layer | None:
    text = effective.how_to_respond.strip()
    if not text:
        return None
    source = effective.sources.get("how_to_respond", "account")
    body = f"The user's instructions for your replies:\n{text}"
    return Layer("instructions", "How to respond", source, body, None if share else WITHHELD)


def _memories(items: Sequence[Recalled], share: bool) -> Layer | None:
    if not items:
        return None
    lines = ["Saved memories about the user (use them when relevant; do not invent others):"]
    lines.extend(f"- {item.text} (saved {item.created_at:%Y-%m-%d})" for item in items)
    return Layer("memory", "Saved memories", "memory", "\n".join(lines), _withheld(share))


def _history(items: Sequence[Recalled], share: bool) -> Layer | None:
    if not items:
        return None
    lines = ["From the user's earlier conversations (may help; may be outdated):"]
    lines.extend(f"- {item.created_at:%Y-%m-%d}: {item.text}" for item in items)
    return Layer("history", "Earlier conversations", "history", "\n".join(lines), _withheld(share))


def _withheld(share: bool) -> str | None:
    return None if share else WITHHELD
