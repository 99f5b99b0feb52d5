"""A throttle for background work: after each step, rest `tranquility` × the recent step time.

The seed's `Tranquilizer` (garage_util): it keeps the durations of the last
`window` steps; after a step it sleeps ``tranquility × mean(step durations)``, so
the work occupies about ``1 / (1 + tranquility)`` of the time whatever the
speed of the disk. Tranquility 0 means no rest at all.

Steps shorter than `min_step` are merged with the next ones (see `tranquilize`).
The calculator is pure: `observe(now)` records a step that ended at `now` and
returns the rest to take, `begin(now)` marks the start of the next step. The
clock is injectable (default `trio.current_time`, so `trio.testing.MockClock`
drives it); only `tranquilize` sleeps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio


class Tranquilizer:
    """Tracks recent step durations and computes the rest after each step."""

    def __init__(self, window: int = 30, clock: Callable[[], float] | None = None,
                 *, min_step: float = 0.0) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.min_step = min_step
        self._clock = clock
        self._observations: deque[float] = deque()
        self._sum = 0.0
        self._step_begin: float | None = None

    def now(self) -> float:
        """The current time of the injected clock (seconds)."""
        return self._clock() if self._clock is not None else trio.current_time()

    def begin(self, now: float | None = None) -> None:
        """Mark the start of a step."""
        self._step_begin = self.now() if now is None else now

    def reset(self) -> None:
        """Forget the running step (e.g. after idling: idle time is not work time)."""
        self._step_begin = None

    def mean_step(self) -> float:
        """The mean duration of the recorded steps (0 when none)."""
        return self._sum / len(self._observations) if self._observations else 0.0

    def observe(self, tranquility: float, now: float | None = None) -> float:
        """Record the step that ends now; return how long to rest (seconds)."""
        t = self.now() if now is None else now
        if self._step_begin is not None:
            d = max(0.0, t - self._step_begin)
            self._observations.append(d)
            self._sum += d
            while len(self._observations) > self.window:
                self._sum -= self._observations.popleft()
        self._step_begin = None
        if tranquility <= 0:
            return 0.0
        return tranquility * self.mean_step()

    async def tranquilize(self, tranquility: float) -> float:
        """Record the step just finished, rest as computed, and begin the next step.

        Returns the rest taken. The first call (no `begin` yet) only starts timing.
        With `min_step`, a step shorter than that is not ended yet: it goes on
        through the next call (the event loop rounds a sleep up to about 1 ms, so
        resting after every sub-millisecond step would rest more than asked).
        """
        if (tranquility > 0 and self._step_begin is not None
                and self.now() - self._step_begin < self.min_step):
            return 0.0
        delay = self.observe(tranquility)
        if delay > 0:
            await trio.sleep(delay)
        self.begin()
        return delay


__all__ = ["Tranquilizer"]
