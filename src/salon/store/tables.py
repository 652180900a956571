"""The schema. Alembic migrations in `migrations/` must match it (a test checks)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Timestamp = sa.DateTime(timezone=True)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    # sha256 of the cookie value: a stolen database does not yield live sessions.
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column(
        "user_id",
        sa.String(36),
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column(
        "user_id",
        sa.String(36),
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("prefix", sa.String(20), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("last_used_at", Timestamp, nullable=True),
)

app_settings = sa.Table(
    "app_settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
)

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column(
        "user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("title", sa.String(200), nullable=False),
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("current_leaf_id", sa.BigInteger, nullable=True),
    # The conversation's personalization overrides (a ProfilePatch), None: the account's.
    sa.Column("settings", sa.JSON, nullable=True),
    # A temporary chat: hidden from the history, never remembered from, purged after a day.
    sa.Column("temporary", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Index("ix_conversations_user_updated", "user_id", "updated_at"),
)

# One row per message (never a whole chat as one blob). A conversation is a tree:
# editing a user message or regenerating an answer adds a sibling; `current_leaf_id`
# on the conversation picks the active branch.
messages = sa.Table(
    "messages",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column(
        "conversation_id",
        sa.String(36),
        sa.ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("user_id", sa.String(36), nullable=False, index=True),
    sa.Column("parent_id", sa.BigInteger, nullable=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("prompt_tokens", sa.Integer, nullable=True),
    sa.Column("completion_tokens", sa.Integer, nullable=True),
    # What salon's safety layer did to this answer, if anything (None: nothing):
    # {"action": "blocked" | "recovered" | ..., "category": ..., "score": ...}.
    sa.Column("safety", sa.JSON, nullable=True),
    # What personalization enforcement found and did: {"checks": [...], "fixes": [...],
    # "revision_of": id?}; None when no checkable setting was active.
    sa.Column("personalization", sa.JSON, nullable=True),
    # The salon node (process) that runs this message's generation while it is `streaming`:
    # only that node writes its text, and a node that stops beating gives its rows up.
    sa.Column("node", sa.String(200), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Index("ix_messages_conversation_parent", "conversation_id", "parent_id"),
    sa.Index("ix_messages_status", "status"),
)


# The salon nodes sharing this database, each with its last heartbeat (store/nodes.py).
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("heartbeat_at", Timestamp, nullable=False),
)


def _owner() -> sa.Column[str]:
    return sa.Column(
        "user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )


# Account-level personalization (a Profile as JSON): one row per user.
profiles = sa.Table(
    "profiles",
    metadata,
    sa.Column(
        "user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

# Personalities a user defines.
personas = sa.Table(
    "personas",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    _owner(),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Index("ix_personas_user", "user_id"),
)

# Saved memories, versioned: an edit or a contradicting fact inserts a new row that
# `supersedes` the old one, which stays as history (status "superseded"). A deletion keeps
# the row only for the undo window with status "deleted"; the purge then erases it.
memories = sa.Table(
    "memories",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    _owner(),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("subject", sa.String(100), nullable=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("language", sa.String(8), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("origin", sa.String(16), nullable=False),
    sa.Column("supersedes_id", sa.BigInteger, nullable=True),
    sa.Column(
        "source_message_id",
        sa.BigInteger,
        sa.ForeignKey("messages.id", ondelete="SET NULL"),
        nullable=True,
    ),
    sa.Column("conversation_id", sa.String(36), nullable=True),
    # The message that asked to forget it ("forget that ..."), for the chat's chip.
    sa.Column("forgotten_by", sa.BigInteger, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Index("ix_memories_user_status", "user_id", "status"),
    sa.Index("ix_memories_source", "source_message_id"),
)

# What retrieval searches: saved memories and past messages, with their embeddings. `rev`
# is the owner's change counter (recall_state) at the item's last change, so a process
# brings its in-memory index up to date by reading only what changed since it last looked.
recall_items = sa.Table(
    "recall_items",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    _owner(),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("ref_id", sa.BigInteger, nullable=False),
    sa.Column("conversation_id", sa.String(36), nullable=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=True),
    sa.Column("removed", sa.Boolean, nullable=False),
    sa.Column("rev", sa.BigInteger, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.UniqueConstraint("user_id", "kind", "ref_id", name="uq_recall_items_ref"),
    sa.Index("ix_recall_items_user_rev", "user_id", "rev"),
)

recall_state = sa.Table(
    "recall_state",
    metadata,
    sa.Column(
        "user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("rev", sa.BigInteger, nullable=False),
)
