"""The `state` table: worker settings and progress that survive a restart.

| db      | key        | value                                         |
|---------|------------|-----------------------------------------------|
| `state` | utf-8 name | msgpack value (worker settings, scrub state)  |
"""

from __future__ import annotations

from typing import Any

import msgpack

from blocknode.storage.env import MetadataEnv

__all__ = ["WorkerState"]


class WorkerState:
    """Named msgpack values in the `state` table."""

    def __init__(self, env: MetadataEnv) -> None:
        self.env = env
        self.db = env.open_db(b"state")

    def get(self, name: str, default: Any = None) -> Any:
        """The value stored under `name`, or `default`."""
        with self.env.read() as txn:
            raw = txn.get(name.encode(), db=self.db)
        return default if raw is None else msgpack.unpackb(raw)

    async def set(self, name: str, value: Any) -> None:
        """Store `value` (msgpack-able) under `name`, durably."""
        raw = msgpack.packb(value)
        await self.env.submit(lambda txn: txn.put(name.encode(), raw, db=self.db))

    def set_now(self, name: str, value: Any) -> None:
        """`set` in its own transaction on this thread (blocking: at start, before the writer runs)."""
        raw = msgpack.packb(value)
        self.env.write_now(lambda txn: txn.put(name.encode(), raw, db=self.db))
