"""The salon nodes that share one database, and what happens to a dead node's generations.

Each process is a node with a name (`node_name`, the host name by default). A running
generation's message row carries the name of the node that runs it, and only that node
writes it. Every node beats (a row in `nodes`) every few seconds; a node that has not beaten
for `ttl` is taken for dead, and any node's sweep marks its running generations incomplete:
the text of their last checkpoint is kept, and the user can continue or regenerate. A node
that was only slow, not dead, sees at its next checkpoint that its row was settled and stops
that generation (store/conversations.py, `Checkpoint.SETTLED`), so each row has one writer.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from salon.domain import MessageStatus
from salon.store.tables import messages, nodes

log = logging.getLogger(__name__)


class NodeStore:
    def __init__(self, engine: AsyncEngine, name: str) -> None:
        self._engine = engine
        self.name = name

    async def beat(self, now: datetime) -> None:
        """This node is alive at `now`."""
        async with self._engine.begin() as conn:
            updated = await conn.execute(
                nodes.update().where(nodes.c.name == self.name).values(heartbeat_at=now)
            )
            if not updated.rowcount:
                await conn.execute(nodes.insert().values(name=self.name, heartbeat_at=now))

    async def leave(self) -> None:
        """This node stops (its generations are settled already)."""
        async with self._engine.begin() as conn:
            await conn.execute(nodes.delete().where(nodes.c.name == self.name))

    async def sweep(self, now: datetime, ttl: timedelta) -> int:
        """Marks incomplete the running generations of nodes not heard from within `ttl`
        (or not at all); returns how many."""
        alive = sa.select(nodes.c.name).where(nodes.c.heartbeat_at >= now - ttl)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                messages.update()
                .where(
                    messages.c.status == MessageStatus.STREAMING.value,
                    messages.c.node != self.name,
                    messages.c.node.not_in(alive),
                )
                .values(status=MessageStatus.INCOMPLETE.value, node=None, updated_at=now)
            )
            await conn.execute(nodes.delete().where(nodes.c.heartbeat_at < now - ttl))
        swept = int(result.rowcount or 0)
        if swept:
            log.warning("%d generations of unresponsive nodes were marked incomplete", swept)
        return swept
