"""The cluster's clock for reference versions: a hybrid logical clock (HLC).

A reference version (`RefEntry`) is ordered by its timestamp, last writer wins.
That timestamp is given by the **coordinator** that applies the change (the node
a client talks to), never by the client:

    next() = max(wall time, last issued or observed + 1)

- *wall time* is the node's `NodeContext.now_ms` (ms since the epoch), so
  versions stay ordinary times that `block info` can print;
- *observed* versions (a newer version a replica answered with, a version a peer
  sent in `add_ref`/`del_ref`/`put_block(s)`/anti-entropy) move the clock
  forward, so a change made after seeing a version always wins over it, even
  when this node's wall clock is behind the node that made it;
- a version more than `max_skew_ms` ahead of this node's wall clock is not
  observed (`too_far_ahead`): a node refuses it, so one bad clock cannot drag
  the cluster's versions into the future;
- the high-water mark is persisted (`store`) before a timestamp above the
  persisted one is handed out, in steps of `reserve_ms`, so a restart — even
  with the wall clock set back — never issues a timestamp at or below one it
  issued before. One small commit per `reserve_ms` of issued time at most.

The clock issues one timestamp per call; a node issuing more than 1000 a second
for a long time runs ahead of its wall clock by the excess (the coordinator takes
one per operation, one per batch of small puts).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["HLC_STATE_KEY", "HybridClock"]

HLC_STATE_KEY = "hlc_high_water"
"""Name of the persisted high-water mark (the `state` table)."""


class HybridClock:
    """Timestamps (ms) for the reference versions a node coordinates (see module docstring).

    `load()` returns the persisted high-water mark (None when there is none);
    `store(ms)` persists one. Without them the clock is not persisted (tests,
    a client-less library use).
    """

    def __init__(
        self,
        now_ms: Callable[[], int],
        *,
        max_skew_ms: int,
        load: Callable[[], int | None] | None = None,
        store: Callable[[int], Awaitable[None]] | None = None,
        reserve_ms: int = 1000,
    ) -> None:
        if max_skew_ms <= 0:
            raise ValueError("max_skew_ms must be > 0")
        self.now_ms = now_ms
        self.max_skew_ms = max_skew_ms
        self._store = store
        # A restart may start up to reserve_ms ahead of the wall clock: keep it well
        # inside what the other nodes accept.
        self.reserve_ms = max(1, min(reserve_ms, max_skew_ms // 4))
        persisted = load() if load is not None else None
        self.last = int(persisted) if persisted is not None else 0
        self.ceiling = self.last if store is not None else None
        self._persist_lock = trio.Lock()

    async def next(self, at_least: int = 0) -> int:
        """A new timestamp: above every one issued or observed, and >= wall time and `at_least`.

        Returns only once a high-water mark covering it is persisted.
        """
        ts = max(self.now_ms(), self.last + 1, at_least)
        self.last = ts
        if self.ceiling is not None and ts > self.ceiling:
            async with self._persist_lock:
                if ts > self.ceiling:
                    mark = ts + self.reserve_ms
                    assert self._store is not None
                    await self._store(mark)
                    self.ceiling = mark
        return ts

    def too_far_ahead(self, ts: int) -> int:
        """How many ms `ts` is beyond this node's wall clock plus the allowed skew (0: fine)."""
        return max(0, ts - (self.now_ms() + self.max_skew_ms))

    def observe(self, ts: int) -> bool:
        """Note a version seen elsewhere; False (ignored) when it is too far ahead."""
        if self.too_far_ahead(ts):
            return False
        if ts > self.last:
            self.last = ts
        return True
