"""How records look on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from salon.store.accounts import ApiKeyRecord, UserRecord
from salon.store.conversations import ConversationRecord, MessageRecord, utc


def when(value: datetime | None) -> str | None:
    return utc(value).isoformat() if value else None


def user(record: UserRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "username": record.username,
        "role": record.role,
        "created_at": when(record.created_at),
    }


def api_key(record: ApiKeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "created_at": when(record.created_at),
        "last_used_at": when(record.last_used_at),
    }


def conversation(record: ConversationRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "title": record.title,
        "model": record.model,
        "created_at": when(record.created_at),
        "updated_at": when(record.updated_at),
        "current_leaf_id": record.current_leaf_id,
        "settings": record.settings or {},
        "temporary": record.temporary,
    }


def message(record: MessageRecord) -> dict[str, Any]:
    usage = None
    if record.usage is not None:
        usage = {
            "prompt_tokens": record.usage.prompt_tokens,
            "completion_tokens": record.usage.completion_tokens,
        }
    return {
        "id": record.id,
        "conversation_id": record.conversation_id,
        "parent_id": record.parent_id,
        "role": record.role,
        "content": record.content,
        "status": record.status.value,
        "error": record.error,
        "model": record.model,
        "created_at": when(record.created_at),
        "siblings": list(record.siblings),
        "usage": usage,
        # Set when salon's safety layer answered or intervened (e.g. {"action": "blocked"}).
        "safety": record.safety,
        # What the personalization checks found and repaired (None: nothing checkable).
        "personalization": record.personalization,
    }
