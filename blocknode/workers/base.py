"""The worker interface: a node's background tasks, their tunables and their supervision.

Like Garage's `Worker` trait and its registry of tunables (`BgVars`):

- `Worker`: a background task of the node. `name`; `run()` (the long-running
  task); `status()` (a dict: at least ``state`` and ``tranquility``, then the
  worker's own keys); `settings()` (its `Setting`s). A worker takes the node's
  `NodeContext` (clock, randomness, blocking calls) and nothing else of the
  node beyond what it works on.
- `Setting`: one named tunable (``resync-workers``, ``scrub-tranquility``, ...):
  `parse` validates a value (type, bounds, finite; a number or its decimal
  text), `get` reads it, `set` parses, applies and persists it.
- `WorkerRegistry`: the node's workers by name. `rows()` is `worker list`,
  `get`/`set` are `worker get`/`worker set` (every setting of every worker,
  names unique), `run()` runs every worker for the node's whole life.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from blocknode.context import NodeContext
from blocknode.errors import BlocknodeError

__all__ = [
    "InvalidSetting",
    "Setting",
    "Worker",
    "WorkerRegistry",
]

Number = int | float


class InvalidSetting(BlocknodeError, ValueError):
    """A worker setting name or value was refused (the admin call answers ``bad_request``)."""


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Setting:
    """One named tunable of a worker (see module docstring).

    `kind` is `int` or `float`; `minimum`/`maximum` bound it (inclusive);
    `get()` reads the current value; `apply(value)` applies an already parsed
    value and persists it.
    """

    name: str
    kind: type[int] | type[float]
    minimum: Number
    maximum: Number
    get: Callable[[], Number]
    apply: Callable[[Any], Awaitable[None]]
    help: str = ""

    def describe(self) -> str:
        """What a valid value looks like, e.g. ``an integer from 1 to 64``."""
        what = "an integer" if self.kind is int else "a number"
        if math.isinf(self.maximum):
            return f"{what} >= {self.minimum:g}"
        return f"{what} from {self.minimum:g} to {self.maximum:g}"

    def parse(self, value: object) -> Number:
        """`value` (a number, or its decimal text) as this setting's type; `InvalidSetting` if not."""
        v: Number
        if isinstance(value, str):
            text = value.strip()
            try:
                v = int(text)
            except ValueError:
                try:
                    v = float(text)
                except ValueError:
                    raise self._refuse(value) from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            v = value
        else:
            raise self._refuse(value)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise self._refuse(value)
            if self.kind is int:
                if not v.is_integer():
                    raise self._refuse(value)
                v = int(v)
        if not self.minimum <= v <= self.maximum:
            raise self._refuse(value)
        return self.kind(v)

    def _refuse(self, value: object) -> InvalidSetting:
        shown = value if isinstance(value, str) else repr(value)
        return InvalidSetting(f"{self.name}: expected {self.describe()}, got {shown}")

    async def set(self, value: object) -> Number:
        """Parse, apply and persist `value`; returns the value set."""
        v = self.parse(value)
        await self.apply(v)
        return v


# ------------------------------------------------------------------- workers


class Worker(ABC):
    """A background task of the node (see module docstring)."""

    name: ClassVar[str]

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    @abstractmethod
    async def run(self) -> None:
        """The task, for the node's whole life."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """The worker's state: ``state``, ``tranquility`` (None if it has none), its own keys."""

    def settings(self) -> Sequence[Setting]:
        """The tunables of this worker (none by default)."""
        return ()


class WorkerRegistry:
    """The node's workers by name, and every setting of every worker (see module docstring)."""

    def __init__(self, workers: Iterable[Worker]) -> None:
        self._workers: dict[str, Worker] = {}
        self._settings: dict[str, Setting] = {}
        for w in workers:
            if w.name in self._workers:
                raise ValueError(f"two workers named {w.name!r}")
            self._workers[w.name] = w
            for s in w.settings():
                if s.name in self._settings:
                    raise ValueError(f"two settings named {s.name!r}")
                self._settings[s.name] = s

    def __iter__(self) -> Iterator[Worker]:
        return iter(self._workers.values())

    def __getitem__(self, name: str) -> Worker:
        return self._workers[name]

    def __len__(self) -> int:
        return len(self._workers)

    # ---- worker list / get / set

    def row(self, w: Worker) -> dict[str, Any]:
        """One `worker list` row: ``name``, the worker's status, ``settings``."""
        return {"name": w.name, **w.status(), "settings": {s.name: s.get() for s in w.settings()}}

    def rows(self) -> list[dict[str, Any]]:
        """`worker list`: a row per worker, in registration order."""
        return [self.row(w) for w in self]

    def setting(self, name: object) -> Setting:
        """The setting called `name`; `InvalidSetting` naming the valid ones if none is."""
        s = self._settings.get(name) if isinstance(name, str) else None
        if s is None:
            valid = ", ".join(self._settings) or "none"
            raise InvalidSetting(f"unknown setting {name!r} (valid settings: {valid})")
        return s

    def settings(self) -> list[dict[str, Any]]:
        """Every setting: ``name``, ``value``, ``worker``, ``valid`` (what a value must be), ``help``."""
        owner = {s.name: w.name for w in self for s in w.settings()}
        return [{"name": s.name, "value": s.get(), "worker": owner[s.name],
                 "valid": s.describe(), "help": s.help} for s in self._settings.values()]

    async def set(self, name: object, value: object) -> Number:
        """Validate, apply and persist one setting; returns the value set."""
        return await self.setting(name).set(value)

    # ---- running

    async def run(self) -> None:
        """Run every worker until cancelled."""
        async with trio.open_nursery() as nursery:
            for w in self:
                nursery.start_soon(w.run)
