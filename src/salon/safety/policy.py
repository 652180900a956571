"""The safety policy: per category, the harm probability at which salon refuses by itself,
and the band below it where the model answers with a safety instruction.

Three bands, by the classifier's harmful probability p:

- p < ``caution_at``: benign. The model answers as usual, and if it refuses anyway salon may
  recover (re-ask once).
- ``caution_at`` <= p < ``refuse_at``: uncertain. The model answers with the policy's caution
  instruction added to its system prompt — decline only real, practical help to cause harm,
  answer the rest — and its refusals are final. A small model told nothing refuses far less
  of what it should; the classifier alone is not sure enough here to refuse for it.
- p >= ``refuse_at``: harmful. salon answers itself with a short refusal and a safe
  alternative, without calling the model.

Thresholds and texts are data (``data/policy.json``, or a deployment's own file) so an
operator can tune them without code. Two rules are enforced, whatever the file says: a turn
below a probability of 0.5 is never refused (benign is never blocked by salon), and a refusal
always carries a short message, ideally with a safe alternative.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from salon.errors import ConfigError
from salon.safety.datasets import DATA
from salon.safety.harm import Assessment

DEFAULT_POLICY = DATA / "policy.json"
# Below this no configuration may refuse: the classifier then thinks "benign" is more likely.
MIN_REFUSE_AT = 0.5
# A refusal carries its category's own message (crisis lines for self-harm, ...) only when the
# category is this probable; below it, the general message. A wrong specific message is worse
# than a general one: crisis lines for a tax-evasion request. Cross-validated, 39 % of harmful
# prompts reach it, and 96 % of those categories are right (training_report.md).
CATEGORY_MESSAGE_FROM = 0.4


class Action(StrEnum):
    ALLOW = "allow"
    CAUTION = "caution"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class CategoryRule:
    action: Action  # what to do when the threshold is reached; ALLOW turns blocking off
    refuse_at: float
    message: str
    caution_at: float = 1.0
    caution: str = ""  # the instruction for the uncertain band; empty turns the band off


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    category: str | None
    probability: float
    message: str | None = None  # the reply to send instead of calling the model
    instruction: str | None = None  # added to the model's system prompt (CAUTION)

    @property
    def refused(self) -> bool:
        return self.action is Action.REFUSE

    @property
    def benign(self) -> bool:
        """Below the uncertain band: a refusal by the model is a mistake to recover from."""
        return self.action is Action.ALLOW


@dataclass(frozen=True, slots=True)
class Policy:
    default: CategoryRule
    categories: Mapping[str, CategoryRule] = field(default_factory=dict)
    category_message_from: float = CATEGORY_MESSAGE_FROM

    @property
    def cautious(self) -> bool:
        """Whether any rule has a caution band (an instruction for uncertain requests)."""
        return any(rule.caution for rule in (self.default, *self.categories.values()))

    def without_caution(self) -> Policy:
        """The same policy with the uncertain band off (what evaluations compare against)."""
        return Policy(
            replace(self.default, caution=""),
            {name: replace(rule, caution="") for name, rule in self.categories.items()},
            self.category_message_from,
        )

    def rule(self, category: str | None) -> CategoryRule:
        return self.categories.get(category or "", self.default)

    def decide(self, assessment: Assessment) -> Decision:
        p = assessment.harmful_probability
        rule = self.rule(assessment.category)
        if rule.action is Action.REFUSE and p >= rule.refuse_at:
            sure = assessment.category_probability >= self.category_message_from
            message = rule.message if sure else self.default.message
            return Decision(Action.REFUSE, assessment.category, p, message)
        if rule.caution and p >= rule.caution_at:
            return Decision(Action.CAUTION, assessment.category, p, instruction=rule.caution)
        return Decision(Action.ALLOW, assessment.category, p)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        default = _rule(data, None)
        categories = {
            name: _rule(entry, default) for name, entry in data.get("categories", {}).items()
        }
        try:
            message_from = float(data.get("category_message_from", CATEGORY_MESSAGE_FROM))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid category_message_from: {exc}") from exc
        if not 0.0 <= message_from <= 1.0:
            raise ConfigError(f"category_message_from must be within [0, 1], got {message_from}")
        return cls(default, categories, message_from)

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> Policy:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read safety policy {path}: {exc}") from exc
        return cls.from_mapping(data)


def _rule(entry: Mapping[str, Any], parent: CategoryRule | None) -> CategoryRule:
    """A category rule; what it leaves out comes from the policy's defaults."""
    try:
        action = Action(entry.get("action", parent.action if parent else Action.REFUSE))
        refuse_at = float(entry.get("refuse_at", parent.refuse_at if parent else 0.8))
        message = str(entry.get("message", parent.message if parent else ""))
        caution_at = float(entry.get("caution_at", parent.caution_at if parent else 1.0))
        caution = str(entry.get("caution", parent.caution if parent else ""))
    except ValueError as exc:
        raise ConfigError(f"invalid safety policy entry {dict(entry)}: {exc}") from exc
    if action is Action.CAUTION:
        raise ConfigError("'caution' is a band below refuse_at, not an action; set caution_at")
    if not MIN_REFUSE_AT <= refuse_at <= 1.0:
        raise ConfigError(f"refuse_at must be within [{MIN_REFUSE_AT}, 1], got {refuse_at}")
    if not 0.0 <= caution_at <= 1.0:
        raise ConfigError(f"caution_at must be within [0, 1], got {caution_at}")
    if action is Action.REFUSE and not message.strip():
        raise ConfigError("a refusing policy rule needs a message")
    return CategoryRule(action, refuse_at, message, caution_at, caution)
