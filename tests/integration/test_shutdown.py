"""Graceful shutdown: running generations may finish within the grace period; past it,
what they have is kept, marked incomplete — never lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from salon.app import services
from salon.domain import MessageStatus
from salon.settings import ProviderSettings, Settings


async def _shut_down_mid_generation(tmp_path: Path, database_url: str, grace_s: float) -> str:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        models=["fake:slow"],
        providers={"fake": ProviderSettings(kind="fake", fake_delay_s=0.01)},
        shutdown_grace_s=grace_s,
    )
    async with services(settings) as built:
        user = await built.accounts.create_user("ann", "correct-horse-battery", admin=False)
        conversation = await built.chat.create_conversation(user.id, None, None)
        turn = await built.chat.post(
            user.id, conversation.id, "go", parent_id=None, use_leaf=True, model=None
        )
        await asyncio.sleep(0.2)  # under way: ~20 of its 400 words
        message_id = turn.assistant_message.id
    async with services(settings) as built:
        return (await built.chat.message(user.id, message_id)).status.value


async def test_a_generation_finishes_within_the_grace_period(
    tmp_path: Path, database_url: str, engine: object
) -> None:
    status = await _shut_down_mid_generation(tmp_path, database_url, grace_s=20.0)
    assert status == MessageStatus.COMPLETE.value


async def test_past_the_grace_period_the_partial_answer_is_kept_incomplete(
    tmp_path: Path, database_url: str, engine: object
) -> None:
    status = await _shut_down_mid_generation(tmp_path, database_url, grace_s=0.1)
    assert status == MessageStatus.INCOMPLETE.value
