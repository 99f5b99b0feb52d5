"""`Notify`: a sequence-numbered wake-up for every waiter, as many times as needed.

A waiter takes a `snapshot()` *before* it checks for work, and passes it to
`wait()`: if anything was notified since, `wait` returns at once. Without the
snapshot, a notify landing between the check and the wait (e.g. a commit that
completes while the waiter is still setting up) would wake nobody, and the
waiter would sleep until some unrelated notify.
"""

from __future__ import annotations

import trio


class Notify:
    """Every `notify()` moves the sequence and wakes the tasks waiting at that moment."""

    def __init__(self) -> None:
        self._seq = 0
        self._event = trio.Event()

    def snapshot(self) -> int:
        """The current sequence number (take it before checking for work)."""
        return self._seq

    def notify(self) -> None:
        """Wake the current waiters (call from the Trio thread)."""
        self._seq += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self, since: int | None = None) -> None:
        """Wait for a `notify()` after the `since` snapshot (None: after now)."""
        if since is not None and since != self._seq:
            await trio.lowlevel.checkpoint()
            return
        await self._event.wait()
