"""`salon eval personalization`: does the assistant follow what users set, and does memory
find what they said?

Style: every case (a setting × a prompt, after 0, 10 and 30 turns of unrelated chat) runs
through the real chat pipeline — a throwaway SQLite database, the configured model, the
same ChatService the web app uses. The constraints a reply must meet come from salon's own
derivation of the settings; the score is the share of constraints that hold. "Without
enforcement" scores what the model wrote (kept with every adjusted answer; a reply stopped
at a length bound counts as over it); "with enforcement" scores what the user got (after
stream repairs and, where needed, the revision).

Memory: see `memory_suite.py` (retrieval recall@k, updates, forgetting, isolation).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from salon.accounts.service import AccountService
from salon.chat.service import ChatService
from salon.domain import MessageStatus, SamplingParams
from salon.personalization.checks import check_reply
from salon.personalization.service import Personalizer
from salon.store.conversations import MessageRecord, NewMessage

CASES = Path(__file__).parent / "data" / "style_cases.json"
DEPTHS = (0, 10, 30)
# Deterministic and bounded: the same run gives the same numbers, and a case costs at most
# a few seconds of a CPU model.
SAMPLING = SamplingParams(max_tokens=320, temperature=0.0, seed=7)

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StyleCase:
    setting: str
    profile: dict[str, Any]
    prompt: str
    depth: int


@dataclass
class CaseResult:
    case: StyleCase
    raw_passed: int
    final_passed: int
    total: int
    revised: bool
    seconds: float
    failures: list[str] = field(default_factory=list)


@dataclass
class StyleReport:
    model: str
    results: list[CaseResult]

    def rate(self, *, depth: int | None = None, enforced: bool) -> tuple[float, int]:
        chosen = [r for r in self.results if depth is None or r.case.depth == depth]
        total = sum(r.total for r in chosen)
        passed = sum(r.final_passed if enforced else r.raw_passed for r in chosen)
        return (passed / total if total else 1.0), total

    def table(self) -> str:
        lines = [
            f"Style adherence, model `{self.model}` ({len(self.results)} cases)",
            "",
            "| turns of chat before | constraints | without enforcement | with enforcement |",
            "|---|---|---|---|",
        ]
        for depth in sorted({r.case.depth for r in self.results}):
            raw, n = self.rate(depth=depth, enforced=False)
            final, _ = self.rate(depth=depth, enforced=True)
            lines.append(f"| {depth} | {n} | {raw:.1%} | {final:.1%} |")
        raw, n = self.rate(enforced=False)
        final, _ = self.rate(enforced=True)
        lines.append(f"| all | {n} | {raw:.1%} | {final:.1%} |")
        lines += ["", "| setting | without | with | revisions |", "|---|---|---|---|"]
        for setting, rows in _by_setting(self.results).items():
            total = sum(r.total for r in rows) or 1
            raw_rate = sum(r.raw_passed for r in rows) / total
            final_rate = sum(r.final_passed for r in rows) / total
            revised = sum(r.revised for r in rows)
            lines.append(f"| {setting} | {raw_rate:.0%} | {final_rate:.0%} | {revised} |")
        failures = [(r.case, f) for r in self.results for f in r.failures]
        if failures:
            lines += ["", "Failed after enforcement:", ""]
            lines += [
                f"- {c.setting} / depth {c.depth} / {c.prompt[:40]}: {f}" for c, f in failures
            ]
        return "\n".join(lines)

    def drift(self) -> float:
        """Points lost with enforcement between no history and the deepest history."""
        depths = sorted({r.case.depth for r in self.results})
        first, _ = self.rate(depth=depths[0], enforced=True)
        last, _ = self.rate(depth=depths[-1], enforced=True)
        return (first - last) * 100


def _by_setting(results: Sequence[CaseResult]) -> dict[str, list[CaseResult]]:
    grouped: dict[str, list[CaseResult]] = defaultdict(list)
    for result in results:
        grouped[result.case.setting].append(result)
    return dict(grouped)


def load_cases(
    path: Path = CASES, depths: Sequence[int] = DEPTHS, per_setting: int | None = None
) -> tuple[list[StyleCase], list[tuple[str, str]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    prompts: list[str] = data["prompts"]
    count = per_setting or int(data.get("prompts_per_setting", 2))
    cases = []
    for index, setting in enumerate(data["settings"]):
        for j in range(count):
            prompt = prompts[(index * count + j) % len(prompts)]
            cases += [StyleCase(setting["id"], setting["profile"], prompt, d) for d in depths]
    filler = [(str(q), str(a)) for q, a in data["filler"]]
    return cases, filler


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The services a case runs through (built by the caller, e.g. the CLI, on a
    throwaway database with SAMPLING)."""

    accounts: AccountService
    chat: ChatService
    personalizer: Personalizer


async def run_style_suite(
    pipeline: Pipeline,
    *,
    model: str,
    cases: Sequence[StyleCase],
    filler: Sequence[tuple[str, str]],
    progress: Progress | None = None,
) -> StyleReport:
    results = []
    for number, case in enumerate(cases, 1):
        user = await pipeline.accounts.create_user(f"eval{number}", "eval-password-1", admin=False)
        results.append(await _run_case(pipeline, user.id, model, case, filler))
        if progress:
            r = results[-1]
            progress(
                f"[{number}/{len(cases)}] {case.setting} d={case.depth}: "
                f"raw {r.raw_passed}/{r.total}, final {r.final_passed}/{r.total} "
                f"({r.seconds:.1f} s)"
            )
    return StyleReport(model, results)


async def _run_case(
    pipeline: Pipeline,
    user_id: str,
    model: str,
    case: StyleCase,
    filler: Sequence[tuple[str, str]],
) -> CaseResult:
    started = time.monotonic()
    await pipeline.personalizer.save_profile(user_id, case.profile)
    chat = pipeline.chat
    conversation = await chat.create_conversation(user_id, None, model)
    await _seed(chat, user_id, conversation.id, filler[: case.depth], model)
    context, _ = await chat.preview(user_id, conversation.id, case.prompt, None)
    constraints = context.constraints if context else ()
    turn = await chat.post(
        user_id, conversation.id, case.prompt, parent_id=None, use_leaf=True, model=None
    )
    first = await _wait(chat, user_id, turn.assistant_message.id)
    note = first.personalization or {}
    final = first
    if note.get("revised_by"):
        final = await _wait(chat, user_id, int(note["revised_by"]))
    raw = check_reply(str(note.get("original", first.content)), constraints)
    cut = bool(note.get("cut"))
    raw_passed = sum(r.passed and not (cut and r.constraint.kind == "max_words") for r in raw)
    after = check_reply(final.content, constraints)
    return CaseResult(
        case,
        raw_passed,
        sum(r.passed for r in after),
        len(constraints),
        final is not first,
        time.monotonic() - started,
        [f"{r.constraint.describe()}: {r.detail}" for r in after if not r.passed],
    )


async def _seed(
    chat: ChatService,
    user_id: str,
    conversation_id: str,
    turns: Sequence[tuple[str, str]],
    model: str,
) -> None:
    """Earlier, unrelated turns, stored as if they had happened (no generation)."""
    if not turns:
        return
    messages = []
    for question, answer in turns:
        messages.append(NewMessage("user", question, MessageStatus.COMPLETE))
        messages.append(NewMessage("assistant", answer, MessageStatus.COMPLETE, model))
    await chat.import_messages(user_id, conversation_id, messages, datetime.now(UTC))


async def _wait(chat: ChatService, user_id: str, message_id: int) -> MessageRecord:
    async for _event in await chat.follow(user_id, message_id, 0):
        pass
    return await chat.message(user_id, message_id)
