"""The worker interface: a node's background tasks, their tunables and their supervision.

Like Garage's `Worker` trait and its registry of tunables (`BgVars`):

- `Worker`: a background task of the node. `name`; `run()` (the long-running
  task); `status()` (a dict: at least ``state`` and ``tranquility``, then the
  worker's own keys); `settings()` (its `Setting`s); `supervisor` (its
  `Supervisor`). A worker takes the node's `NodeContext` (clock, randomness,
  blocking calls) and nothing else of the node beyond what it works on.
- `Setting`: one named tunable (``resync-workers``, ``scrub-tranquility``, ...):
  `parse` validates a value (type, bounds, finite; a number or its decimal
  text), `get` reads it, `set` parses, applies and persists it.
- `Supervisor`: every step of a worker runs under `Supervisor.step`. An
  exception escaping a step is logged with what it concerned (a block, a
  peer), counted (``errors`` / ``last_error`` in `worker list`), then the
  worker backs off (exponential, capped) and goes on. A failure a worker
  handles itself (one block, one peer) is counted with `Supervisor.record`.
  Only cancellation and a failure of the node's own foundations end the node:
  after any failure the supervisor asks the node's `health` check (data dir
  there? metadata readable?), and if it names a problem it logs it as its last
  line and raises `NodeFoundationError`.
- `WorkerRegistry`: the node's workers by name. `rows()` is `worker list`,
  `get`/`set` are `worker get`/`worker set` (every setting of every worker,
  names unique), `run()` runs every worker for the node's whole life, each
  restarted by its supervisor if its `run` ever raises.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from blocknode import defects
from blocknode.context import NodeContext
from blocknode.errors import BlocknodeError

__all__ = [
    "InvalidSetting",
    "NodeFoundationError",
    "Setting",
    "Supervisor",
    "Worker",
    "WorkerRegistry",
]

log = logging.getLogger("blocknode.workers")

Number = int | float

BACKOFF_BASE_S = 1.0
"""The rest after a step's first failure in a row; it doubles with each further one..."""
BACKOFF_MAX_S = 60.0
"""... up to this."""
LAST_ERROR_MAX = 300
"""Characters of the last error kept for `worker list`."""


class InvalidSetting(BlocknodeError, ValueError):
    """A worker setting name or value was refused (the admin call answers ``bad_request``)."""


class NodeFoundationError(BlocknodeError):
    """The node's own foundations failed (data dir gone, metadata unreadable): the node stops."""


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


# ---------------------------------------------------------------- supervision


def _foundation_failure(exc: BaseException) -> NodeFoundationError | None:
    if isinstance(exc, NodeFoundationError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _foundation_failure(inner)
            if found is not None:
                return found
    return None


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= LAST_ERROR_MAX else text[:LAST_ERROR_MAX - 1] + "…"


class Supervisor:
    """Runs one worker's steps; nothing a step raises (but cancellation) stops the worker.

    `health` (set by the `WorkerRegistry`) returns None while the node's
    foundations are sound, else what is wrong with them. `base_s`/`max_s` are
    the backoff after a failed step (doubling, capped).
    """

    def __init__(self, name: str, ctx: NodeContext, *, base_s: float = BACKOFF_BASE_S,
                 max_s: float = BACKOFF_MAX_S) -> None:
        self.name = name
        self.ctx = ctx
        self.base_s = base_s
        self.max_s = max_s
        self.health: Callable[[], str | None] | None = None
        self.errors = 0
        """Failures seen (steps that raised, and failures the worker recorded itself)."""
        self.in_a_row = 0
        """Steps failed in a row (the backoff grows with it; a good step resets it)."""
        self.last_error: str | None = None
        self.last_error_ms: int | None = None

    def backoff_s(self) -> float:
        """The rest after the current run of failed steps."""
        exponent = min(max(self.in_a_row, 1) - 1, 30)
        return min(self.base_s * 2**exponent, self.max_s)

    def record(self, exc: BaseException, about: str = "") -> None:
        """Count and log a failure the worker handled itself (one block, one peer).

        An expected failure (`BlocknodeError`, `OSError`: a peer down, a full
        disk) is one warning line; anything else is a bug here and is logged
        with its traceback. Then the foundations are checked.
        """
        self.errors += 1
        where = f" ({about})" if about else ""
        self.last_error = _describe(exc) if not about else f"{about}: {_describe(exc)}"
        self.last_error_ms = self.ctx.now_ms()
        if isinstance(exc, BlocknodeError | OSError):
            log.warning("%s%s: %s", self.name, where, _describe(exc))
        else:
            log.error("%s%s failed: %s", self.name, where, _describe(exc), exc_info=exc)
        self.check_foundations()

    def check_foundations(self) -> None:
        """Raise `NodeFoundationError` if the node's health check names a problem."""
        problem = self.health() if self.health is not None else None
        if problem is not None:
            log.critical("%s: %s: the node stops", self.name, problem)
            raise NodeFoundationError(problem)

    async def step(self, fn: Callable[..., Awaitable[Any]], *args: Any,
                   about: str | Callable[[], str] = "") -> bool:
        """Run one step ``await fn(*args)``; True if it succeeded.

        On an exception: record it (with `about`, or what `about()` says at
        that moment), rest `backoff_s()`, return False. Cancellation and
        `NodeFoundationError` propagate.
        """
        try:
            await fn(*args)
        except Exception as exc:
            fatal = _foundation_failure(exc)
            if fatal is not None:
                raise fatal from exc
            if defects.on("a3-no-supervision"):
                raise  # re-introduced defect: the exception reaches the node's nursery
            self.in_a_row += 1
            self.record(exc, about() if callable(about) else about)
            delay = self.backoff_s()
            log.info("%s: resting %.1f s after %d failed step(s) in a row",
                     self.name, delay, self.in_a_row)
            await trio.sleep(delay)
            return False
        self.in_a_row = 0
        return True

    def status(self) -> dict[str, Any]:
        """``errors``, ``last_error`` (and when) for `worker list`."""
        return {"errors": self.errors, "last_error": self.last_error,
                "last_error_at": self.last_error_ms}


# ------------------------------------------------------------------- workers


class Worker(ABC):
    """A background task of the node (see module docstring)."""

    name: ClassVar[str]

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.supervisor = Supervisor(self.name, ctx)

    @abstractmethod
    async def run(self) -> None:
        """The task, for the node's whole life (each step under `self.supervisor`)."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """The worker's state: ``state``, ``tranquility`` (None if it has none), its own keys."""

    def settings(self) -> Sequence[Setting]:
        """The tunables of this worker (none by default)."""
        return ()

# Garage's names for the same tunables (`garage worker set resync-worker-count 4`):
# `setting` answers to them too; `worker get` shows the blocknode name.
SETTING_ALIASES: dict[str, str] = {"resync-worker-count": "resync-workers"}


class WorkerRegistry:
    """The node's workers by name, and every setting of every worker (see module docstring).

    `health` is the node's foundations check, handed to every worker's supervisor.
    """

    def __init__(self, workers: Iterable[Worker], *,
                 health: Callable[[], str | None] | None = None) -> None:
        self._workers: dict[str, Worker] = {}
        self._settings: dict[str, Setting] = {}
        for w in workers:
            if w.name in self._workers:
                raise ValueError(f"two workers named {w.name!r}")
            self._workers[w.name] = w
            w.supervisor.health = health
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
        """One `worker list` row: ``name``, the worker's status, supervision, ``settings``.

        A worker's own keys win over the supervisor's: the resync worker's
        ``errors`` is the number of blocks in the errors table (its blocks'
        failures are recorded there), every other worker's is its supervisor's count.
        """
        return {"name": w.name, **w.supervisor.status(), **w.status(),
                "settings": {s.name: s.get() for s in w.settings()}}

    def rows(self) -> list[dict[str, Any]]:
        """`worker list`: a row per worker, in registration order."""
        return [self.row(w) for w in self]

    def setting(self, name: object) -> Setting:
        """The setting called `name`; `InvalidSetting` naming the valid ones if none is."""
        s = self._settings.get(SETTING_ALIASES.get(name, name)) if isinstance(name, str) else None
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
        """Run every worker until cancelled; each `run` that raises is restarted after a backoff."""
        async with trio.open_nursery() as nursery:
            for w in self:
                nursery.start_soon(self._keep_running, w)

    @staticmethod
    async def _keep_running(w: Worker) -> None:
        while True:
            if await w.supervisor.step(w.run, about="its task ended with an error; restarting it"):
                log.info("%s: its task ended", w.name)
                return
