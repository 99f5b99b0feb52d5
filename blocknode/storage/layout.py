"""The `layout` table: this node's copy of the replicated cluster layout state.

| db       | key       | value                                                    |
|----------|-----------|----------------------------------------------------------|
| `layout` | `state`   | msgpack of `blocknode.layout_state.LayoutState.to_wire`  |

Storage keeps the encoded bytes only; `blocknode.layout_state` owns their meaning
and `blocknode.layout_service` their replication.
"""

from __future__ import annotations

from blocknode.storage.env import MetadataEnv

__all__ = ["LayoutTable"]

_STATE_KEY = b"state"


class LayoutTable:
    """The encoded layout state of this node."""

    def __init__(self, env: MetadataEnv) -> None:
        self.env = env
        self.db = env.open_db(b"layout")

    def get(self) -> bytes | None:
        """The stored state, or None on a node that has none yet."""
        with self.env.read() as txn:
            raw = txn.get(_STATE_KEY, db=self.db)
        return None if raw is None else bytes(raw)

    async def put(self, raw: bytes) -> None:
        """Store the state, durably."""
        await self.env.submit(lambda txn: txn.put(_STATE_KEY, raw, db=self.db))

    def put_now(self, raw: bytes) -> None:
        """`put` on this thread (blocking: at start, before the writer runs)."""
        self.env.write_now(lambda txn: txn.put(_STATE_KEY, raw, db=self.db))
