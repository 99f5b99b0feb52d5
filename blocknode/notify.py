"""`Notify`: wake every current waiter, as many times as needed (a re-armed `trio.Event`)."""

from __future__ import annotations

import trio


class Notify:
    """Every `notify()` wakes the tasks waiting at that moment; later waiters wait again."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        """Wake the current waiters (call from the Trio thread)."""
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        """Wait for the next `notify()`."""
        await self._event.wait()
