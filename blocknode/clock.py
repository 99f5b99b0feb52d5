"""The time base of every persisted time: milliseconds since the Unix epoch.

Kept apart from the metadata store so that code which only needs the time (the
client, the CLI) does not import LMDB. Node code takes its clock from
`blocknode.context.NodeContext.now_ms`, so tests and the simulation can move it.
"""

from __future__ import annotations

import time

__all__ = ["wall_ms"]


def wall_ms() -> int:
    """Milliseconds since the Unix epoch, from the system clock."""
    return time.time_ns() // 1_000_000
