"""Personalization in the generation pipeline: the stream passes through the deterministic
repairs before anyone sees it, the finished answer is checked, and a failure that only a new
answer can repair gets one — as a visible revision (a sibling answer), never by changing
text that was already shown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from salon.domain import ChatMessage
from salon.personalization.checks import CheckResult, Constraint, check_reply
from salon.personalization.enforce import StreamEnforcer, needs_regeneration, repair_instruction


@dataclass(frozen=True, slots=True)
class Enforcement:
    constraints: tuple[Constraint, ...]
    # Whether a failed check may start a revision (a revision itself is not revised again).
    may_revise: bool = True
    revision_of: int | None = None

    def enforcer(self) -> StreamEnforcer:
        return StreamEnforcer(self.constraints)

    def judge(self, text: str, fixes: Sequence[str]) -> tuple[dict[str, Any], list[CheckResult]]:
        """The record stored with the answer, and the failures that call for a revision."""
        results = check_reply(text, self.constraints)
        note: dict[str, Any] = {
            "checks": [_result(r) for r in results],
            "passed": sum(r.passed for r in results),
            "total": len(results),
            "fixes": list(fixes),
        }
        if self.revision_of is not None:
            note["revision_of"] = self.revision_of
        return note, needs_regeneration(results) if self.may_revise else []

    def revision(self, revision_of: int) -> Enforcement:
        return Enforcement(self.constraints, may_revise=False, revision_of=revision_of)


def with_repair(
    messages: Sequence[ChatMessage], failed: Sequence[CheckResult], answer: str
) -> tuple[ChatMessage, ...]:
    """The conversation the first answer was written for, that answer, and the request to
    rewrite it: the instruction comes last, where even a small model heeds it after a long
    history, and the prompt extends the one just processed (its cached prefix is reused)."""
    return (
        *messages,
        ChatMessage("assistant", answer),
        ChatMessage("user", repair_instruction(failed)),
    )


def _result(result: CheckResult) -> dict[str, Any]:
    return {
        "rule": result.constraint.describe(),
        "kind": result.constraint.kind,
        "source": result.constraint.source,
        "passed": result.passed,
        "detail": result.detail,
    }
