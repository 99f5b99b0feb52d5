"""Rebalance: move block files to the data directory the current placement gives
them (`repair rebalance`), and fetch again the blocks of a directory that failed.

After the data directories change (one added, a capacity changed, one made
``read_only``), blocks sit where the old placement put them; reads still find
them (a read looks in every directory in service), but new capacity stays
unused and a read-only disk never empties. `Rebalance` walks every directory
in service, one batch of hashes at a time (listed in a worker thread), and
moves each block whose primary is another directory there
(`LocalBlocks.relocate`: under the block's lock, the copy is written and
verified in its new place before the old file goes, so reads keep working
throughout). A `Tranquilizer` rests `tranquility` × the recent step time
between steps (steps shorter than `MIN_STEP_S` are merged, as in scrub).

Its state lives in the `state` table under ``"rebalance"`` and survives a
restart: ``state`` (running / idle), ``dir`` and ``position`` (where the walk
is), ``scanned``, ``moved``, ``errors``, ``tranquility``, ``started``,
``finished``, ``error``, plus ``refetch_queued`` (below). A rebalance running
when the node stopped carries on from its position.

Failed directories: when `BlockFiles` takes a directory out of service (at
start: marker missing, directory gone or removed from the config; later: I/O
errors), it lists it in `refetch_pending` and calls `on_failure`, which wakes
this worker; the worker then queues a resync (delay 0) of every block this node
references but no longer holds, and the resync workers fetch them from the
other nodes.

API: `start()`, `status()`, `step()` (one batch, no rest: tests and "run
once"), `run_to_completion()`, `run()` (the worker task for the node's
nursery), `refetch()`, and `handle_admin` (the ``admin_rebalance`` RPC:
``action`` start / status, ``tranquility``?).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from blocknode.context import NodeContext
from blocknode.errors import BlocknodeError, RemoteProtocolError
from blocknode.notify import Notify
from blocknode.storage.local_blocks import LocalBlocks
from blocknode.tranquilizer import Tranquilizer
from blocknode.workers.base import Setting, Worker

log = logging.getLogger(__name__)

STATE_KEY = "rebalance"
RUNNING, IDLE = "running", "idle"
BATCH = 256
REFETCH_BATCH = 1000
MIN_STEP_S = 0.005
"""Blocks are grouped into one tranquilizer step until the group has taken this long."""
DEFAULT_TRANQUILITY = 1.0


class Rebalance(Worker):
    """The rebalance worker of one node (see module docstring)."""

    name = "rebalance"

    def __init__(self, blocks: LocalBlocks, ctx: NodeContext | None = None, *,
                 tranquility: float = DEFAULT_TRANQUILITY,
                 batch: int = BATCH, clock: Callable[[], float] | None = None) -> None:
        super().__init__(ctx or NodeContext())
        self._tranquility_setting = Setting(
            "rebalance-tranquility", float, 0, math.inf, lambda: self.st["tranquility"],
            self._apply_tranquility, help="rest this many times the step time after each block")
        self.blocks = blocks
        self.files = blocks.files
        self.meta = blocks.meta
        self.batch = batch
        self._clock = clock
        saved = self.meta.state_get(STATE_KEY) or {}
        self.st: dict[str, Any] = {
            "state": IDLE, "dir": None, "position": None, "scanned": 0, "moved": 0,
            "errors": 0, "tranquility": float(tranquility), "started": None, "finished": None,
            "error": None, "refetch_queued": 0,
        }
        self.st.update({k: v for k, v in saved.items() if k in self.st})
        self.changed = Notify()
        """Notified on every state change, after every batch and when a directory fails."""
        self._step_lock = trio.Lock()

    # ------------------------------------------------------------ settings and status

    def settings(self) -> tuple[Setting, ...]:
        """``rebalance-tranquility``."""
        return (self._tranquility_setting,)

    async def _apply_tranquility(self, value: float) -> None:
        self.st["tranquility"] = float(value)
        await self._save()

    def status(self) -> dict[str, Any]:
        """The rebalance state (plain values; `repair rebalance --wait` polls it)."""
        st = dict(self.st)
        st["position"] = st["position"].hex() if st["position"] else None
        st["progress"] = self._progress()
        return st

    def _progress(self) -> float:
        if self.st["state"] != RUNNING:
            return 1.0 if self.st["finished"] else 0.0
        dirs = [d.path for d in self.files.in_service()]
        if not dirs or self.st["dir"] not in dirs:
            return 0.0
        i = dirs.index(self.st["dir"])
        pos = self.st["position"]
        within = int.from_bytes(pos[:4], "big") / 2**32 if pos else 0.0
        return (i + within) / len(dirs)

    async def _save(self) -> None:
        await self.meta.state_set(STATE_KEY, dict(self.st))
        self.changed.notify()

    # ------------------------------------------------------------ commands

    async def start(self, tranquility: float | None = None) -> dict[str, Any]:
        """Start a rebalance from the beginning (a running one goes on)."""
        if tranquility is not None:
            self.st["tranquility"] = _check_tranquility(tranquility)
        if self.st["state"] != RUNNING:
            dirs = self.files.in_service()
            self.st.update(state=RUNNING, dir=dirs[0].path if dirs else None, position=None,
                           scanned=0, moved=0, errors=0, started=self.meta.now_ms(),
                           finished=None, error=None)
        await self._save()
        return self.status()

    # ------------------------------------------------------------ work

    async def step(self, limit: int | None = None, *,
                   tranquilizer: Tranquilizer | None = None) -> int:
        """Look at the next batch of blocks (while running), moving the misplaced ones;
        returns how many were looked at. Past the last directory, the rebalance ends."""
        async with self._step_lock:
            return await self._step(limit or self.batch, tranquilizer)

    async def _step(self, n: int, tranquilizer: Tranquilizer | None) -> int:
        if self.st["state"] != RUNNING:
            return 0
        dirs = self.files.in_service()
        current = next((d for d in dirs if d.path == self.st["dir"]), None)
        if current is None:  # gone out of service meanwhile, or none to start with
            self._next_dir(dirs, None)
            await self._save()
            return 0
        pos = self.st["position"]
        hashes = await self.ctx.run_sync(
            lambda: list(itertools.islice(self.files.walk_dir(current, pos), n)))
        group_start: float | None = None
        for h in hashes:
            if tranquilizer is not None and group_start is None:
                tranquilizer.begin()
                group_start = tranquilizer.now()
            if self.files.primary(h) is not current:
                try:
                    if await self.blocks.relocate(h):
                        self.st["moved"] += 1
                except BlocknodeError as exc:
                    self.st["errors"] += 1
                    log.warning("rebalance: cannot move block %s: %s", h.hex(), exc)
            self.st["scanned"] += 1
            self.st["position"] = h
            if tranquilizer is not None and tranquilizer.now() - group_start >= MIN_STEP_S:
                await tranquilizer.tranquilize(self.st["tranquility"])
                group_start = None
        if tranquilizer is not None and group_start is not None:
            await tranquilizer.tranquilize(self.st["tranquility"])
        if not hashes:
            self._next_dir(dirs, current)
        await self._save()
        return len(hashes)

    def _next_dir(self, dirs: list[Any], current: Any) -> None:
        later = dirs[dirs.index(current) + 1:] if current in dirs else []
        if current is None and self.st["dir"] is not None:
            # The current one went out of service: go on with the first not yet walked.
            paths = [d.path for d in self.files.dirs]
            done = paths.index(self.st["dir"]) if self.st["dir"] in paths else len(paths)
            later = [d for d in dirs if paths.index(d.path) > done]
        if later:
            self.st.update(dir=later[0].path, position=None)
            return
        self.st.update(state=IDLE, dir=None, position=None, finished=self.meta.now_ms())
        log.info("rebalance done: %d blocks looked at, %d moved, %d errors",
                 self.st["scanned"], self.st["moved"], self.st["errors"])

    async def run_to_completion(self) -> dict[str, Any]:
        """Step until the current rebalance is done (no rest: tests, `--wait`)."""
        while self.st["state"] == RUNNING:
            await self.step()
        return self.status()

    async def refetch(self) -> int:
        """Queue a resync of every referenced block no longer held here (after a data
        directory failed); returns how many were queued."""
        pending = list(self.files.refetch_pending)
        if not pending:
            return 0
        del self.files.refetch_pending[:len(pending)]
        log.warning("data directories %s are out of service or gone: queueing every referenced "
                    "block not held here for a fetch from the other nodes", ", ".join(pending))
        queued = 0
        after: bytes | None = None
        while True:
            hashes = await self.ctx.run_sync(
                lambda a=after: self.meta.referenced_hashes(a, REFETCH_BATCH, only_nonzero=True))
            if not hashes:
                break
            after = hashes[-1]
            missing = await self.ctx.run_sync(
                lambda hs=hashes: [h for h in hs if not self.blocks.exists(h)])
            if missing:
                await self.meta.resync_put_many(missing, 0)
                queued += len(missing)
        self.st["refetch_queued"] += queued
        await self._save()
        log.info("refetch: %d blocks queued for resync", queued)
        return queued

    async def run(self) -> None:
        """The worker task: fetch again what failed directories held; rebalance while running."""
        token = trio.lowlevel.current_trio_token()

        def on_failure(path: str) -> None:  # from any thread
            try:
                token.run_sync_soon(self.changed.notify)
            except trio.RunFinishedError:
                pass

        self.files.on_failure = on_failure
        tranquilizer = Tranquilizer(30, clock=self._clock)
        try:
            while True:
                seen = self.changed.snapshot()
                if self.files.refetch_pending:
                    await self.supervisor.step(self.refetch, about="refetch")
                    continue
                if self.st["state"] == RUNNING:
                    if not await self.supervisor.step(self._run_step, tranquilizer,
                                                      about=lambda: f"dir {self.st['dir']}"):
                        self.st["error"] = self.supervisor.last_error
                    continue
                tranquilizer.reset()
                await self.changed.wait(seen)
        finally:
            self.files.on_failure = None

    async def _run_step(self, tranquilizer: Tranquilizer) -> None:
        await self.step(tranquilizer=tranquilizer)

    # ------------------------------------------------------------ admin RPC

    async def handle_admin(self, peer: str, fields: dict[str, Any],
                           data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        """``admin_rebalance``: ``action`` start (``tranquility``?) or status."""
        action = fields.get("action", "status")
        if action == "start":
            try:
                return await self.start(fields.get("tranquility")), None
            except ValueError as exc:
                raise RemoteProtocolError(str(exc)) from None
        if action == "status":
            return self.status(), None
        raise RemoteProtocolError(f"unknown rebalance action {action!r}")


def _check_tranquility(t: Any) -> float:
    if not (isinstance(t, int | float) and not isinstance(t, bool) and t >= 0 and math.isfinite(t)):
        raise ValueError(f"rebalance tranquility: expected a number >= 0, got {t!r}")
    return float(t)


__all__ = ["Rebalance", "STATE_KEY"]
