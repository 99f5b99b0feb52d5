"""Timing helpers shared by the benchmarks: a median of several repeats, with spread.

    stat = measure(fn, arg, repeats=5, min_time=0.2)
    print(stat.median_ops_per_s, stat.spread)

`measure` first calibrates how many calls make one repeat last at least
`min_time` seconds (which also warms up), then times `repeats` such loops.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Stat", "measure", "fmt_rate", "fmt_spread"]


@dataclass(frozen=True)
class Stat:
    """The result of `measure`.

    `median_ops_per_s`: the median over the repeats of calls per second;
    `spread`: (fastest - slowest) / median, as a fraction (0.05 = 5 %);
    `repeats`, `calls_per_repeat`: how it was measured.
    """

    median_ops_per_s: float
    spread: float
    repeats: int
    calls_per_repeat: int

    @property
    def median_s_per_op(self) -> float:
        """Seconds per call (the inverse of `median_ops_per_s`)."""
        return 1.0 / self.median_ops_per_s

    def scaled(self, factor: float) -> Stat:
        """The same figure in other units, e.g. bytes per call -> bytes/s."""
        return Stat(
            self.median_ops_per_s * factor, self.spread, self.repeats, self.calls_per_repeat
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)


def _loop(fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> float:
    """Seconds taken by `n` calls of ``fn(*args)`` (arguments unpacked outside the loop)."""
    rep = itertools.repeat(None, n)
    nargs = len(args)
    t0 = time.perf_counter()
    if nargs == 0:
        for _ in rep:
            fn()
    elif nargs == 1:
        (a,) = args
        for _ in rep:
            fn(a)
    elif nargs == 2:
        a, b = args
        for _ in rep:
            fn(a, b)
    else:
        for _ in rep:
            fn(*args)
    return time.perf_counter() - t0


def measure(fn: Callable[..., Any], *args: Any, repeats: int = 5, min_time: float = 0.2) -> Stat:
    """Time ``fn(*args)``: the median calls/s over `repeats` loops of >= `min_time` s each."""
    if repeats < 1 or min_time <= 0:
        raise ValueError("repeats must be >= 1 and min_time > 0")
    n = 1
    while True:  # calibrate (and warm up): double n until one loop lasts min_time
        took = _loop(fn, args, n)
        if took >= min_time:
            break
        n = n * 2 if took < min_time / 8 else max(n + 1, int(n * min_time * 1.1 / max(took, 1e-9)))
    rates = sorted(n / _loop(fn, args, n) for _ in range(repeats))
    med = statistics.median(rates)
    return Stat(med, (rates[-1] - rates[0]) / med, repeats, n)


def fmt_rate(x: float) -> str:
    """A rate with an SI suffix: 1234567 -> '1.23M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def fmt_spread(stat: Stat) -> str:
    """The spread as '±x %' (half the fastest-slowest range, relative to the median)."""
    return f"±{stat.spread * 50:.0f} %"
