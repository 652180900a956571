"""The safety policy: per category, the harm probability at which salon refuses by itself.

Thresholds and refusal texts are data (``data/policy.json``, or a deployment's own file) so an
operator can tune them without code. Two rules are enforced, whatever the file says: a turn
below a probability of 0.5 is never refused (benign is never blocked by salon), and a refusal
always carries a short message, ideally with a safe alternative.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from salon.errors import ConfigError
from salon.safety.datasets import DATA
from salon.safety.harm import Assessment

DEFAULT_POLICY = DATA / "policy.json"
# Below this no configuration may refuse: the classifier then thinks "benign" is more likely.
MIN_REFUSE_AT = 0.5


class Action(StrEnum):
    ALLOW = "allow"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class CategoryRule:
    action: Action  # what to do when the threshold is reached; ALLOW turns blocking off
    refuse_at: float
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    category: str | None
    probability: float
    message: str | None = None  # the reply to send instead of calling the model

    @property
    def refused(self) -> bool:
        return self.action is Action.REFUSE


@dataclass(frozen=True, slots=True)
class Policy:
    default: CategoryRule
    categories: Mapping[str, CategoryRule] = field(default_factory=dict)

    def rule(self, category: str | None) -> CategoryRule:
        return self.categories.get(category or "", self.default)

    def decide(self, assessment: Assessment) -> Decision:
        p = assessment.harmful_probability
        rule = self.rule(assessment.category)
        if rule.action is Action.REFUSE and p >= rule.refuse_at:
            return Decision(Action.REFUSE, assessment.category, p, rule.message)
        return Decision(Action.ALLOW, assessment.category, p)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        default = _rule(data, None)
        categories = {
            name: _rule(entry, default) for name, entry in data.get("categories", {}).items()
        }
        return cls(default, categories)

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
    except ValueError as exc:
        raise ConfigError(f"invalid safety policy entry {dict(entry)}: {exc}") from exc
    if not MIN_REFUSE_AT <= refuse_at <= 1.0:
        raise ConfigError(f"refuse_at must be within [{MIN_REFUSE_AT}, 1], got {refuse_at}")
    if action is Action.REFUSE and not message.strip():
        raise ConfigError("a refusing policy rule needs a message")
    return CategoryRule(action, refuse_at, message)
