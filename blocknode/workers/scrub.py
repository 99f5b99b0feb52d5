"""Scrub: read and verify every block held here, slowly, and heal the corrupt ones.

The seed's `scrub_data_store`, made resumable. Blocks are visited in hash order
(`LocalBlocks.walk(start_after=position)`, listed in a worker thread in
batches); each is read and hashed (`BlockManager.read_local`: file reads and
hashing run in worker threads), with BLAKE2b whatever the block file's checksum
attribute says (`blocknode.storage.checksum.thorough_reads`: the scrub is the
slow, thorough check; a normal read trusts a matching xxh3 checksum). A corrupt block is quarantined (renamed
`.corrupted`, or dropped when inline) and its resync queued at once, so a
valid copy comes back from a peer.

A `Tranquilizer` rests `tranquility` × the recent mean step time after each
step; a step is one block, or as many consecutive blocks as take `MIN_STEP_S`
(the event loop rounds a sleep up to about 1 ms, so resting after every
sub-millisecond block — inline ones, or a cached 1 MiB file read — rested up to
twice the asked time: measured 0.27× of T=0's speed at T=1 instead of 0.5×).
The state lives in the `state` table under ``"scrub"`` and survives restarts: ``state`` (running / paused / idle), ``position`` (last hash
checked), ``blocks_checked``, ``corruptions``, ``tranquility``,
``last_completed`` and ``next_run`` (ms since the epoch), ``progress``. A scrub
running or paused when the node stopped carries on from its position.

Besides `start`, a scrub starts by itself every `interval` seconds (±15 %
jitter, from the context's `random`) after the last one completed; the next run
time is persisted too. `step` does one batch without resting (tests and "run
once" calls).

Each run has an identity (``run``, a counter persisted with the state, new at
every `start` from idle): a step belongs to the run that was current when it
began, and after every wait (a listing, a block's read, a rest) it checks that
its run is still the current one and still running. A step of a cancelled run
does nothing more — it neither advances the new run's position nor completes
it (a scrub cancelled and started again at once used to lose the blocks the
old step's stale batch skipped).

A block whose check fails unexpectedly is counted by the worker's
`Supervisor` (logged with the block) and skipped; every step (listing, checks,
saving the state) runs under it, so a failure backs off instead of stopping
the node. The setting ``scrub-tranquility`` is the tranquility.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from blocknode import defects
from blocknode.context import NodeContext
from blocknode.errors import BlockCorrupted, BlockNotFound
from blocknode.manager import BlockManager
from blocknode.notify import Notify
from blocknode.storage import checksum
from blocknode.tranquilizer import Tranquilizer
from blocknode.workers.base import Setting, Worker

log = logging.getLogger(__name__)

STATE_KEY = "scrub"
RUNNING, PAUSED, IDLE = "running", "paused", "idle"
JITTER = 0.15
MIN_STEP_S = 0.005
"""Blocks are grouped into one tranquilizer step until the group has taken this long."""


def progress_of(position: bytes | None) -> float:
    """How far through the hash space `position` is (hashes are uniform), 0..1."""
    if not position:
        return 0.0
    return int.from_bytes(position[:4].ljust(4, b"\0"), "big") / 2**32


class Scrub(Worker):
    """The scrub worker of one node (see module docstring)."""

    name = "scrub"

    def __init__(
        self,
        manager: BlockManager,
        ctx: NodeContext,
        *,
        tranquility: float = 4.0,
        interval: float = 30 * 24 * 3600.0,
        batch: int = 64,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.manager = manager
        self.meta = manager.meta
        self.bytes_checked = 0  # block bytes verified, all runs (metrics)
        self.blocks = manager.blocks
        self.interval = interval
        self.batch = batch
        self._clock = clock
        self._tranquility_setting = Setting(
            "scrub-tranquility", float, 0, math.inf, lambda: self.st["tranquility"],
            self._apply_tranquility, help="rest this many times the step time after each block")
        saved = self.meta.state_get(STATE_KEY) or {}
        self.st: dict[str, Any] = {
            "state": IDLE,
            "position": None,
            "blocks_checked": 0,
            "corruptions": 0,
            "tranquility": float(tranquility),
            "last_completed": None,
            "next_run": None,
            "progress": 0.0,
            "started": None,
            "run": 0,
        }
        self.st.update({k: v for k, v in saved.items() if k in self.st})
        self.changed = Notify()
        """Notified on every state change and after every batch."""
        self._step_lock = trio.Lock()

    # ------------------------------------------------------------ status

    def settings(self) -> tuple[Setting, ...]:
        """``scrub-tranquility``."""
        return (self._tranquility_setting,)

    def status(self) -> dict[str, Any]:
        """The scrub state (JSON keys of `scrub status` are a contract; a `worker list` row)."""
        st = self.st
        progress = progress_of(st["position"]) if st["state"] != IDLE else st["progress"]
        return {
            "state": st["state"],
            "tranquility": st["tranquility"],
            "blocks_checked": st["blocks_checked"],
            "corruptions": st["corruptions"],
            "progress": progress,
            "position": st["position"].hex() if st["position"] else None,
            "last_completed": st["last_completed"],
            "next_run": st["next_run"],
            "started": st["started"],
            "run": st["run"],
        }

    async def _save(self) -> None:
        await self.meta.state_set(STATE_KEY, dict(self.st))
        self.changed.notify()

    # ------------------------------------------------------------ commands

    async def start(self, tranquility: float | None = None) -> dict[str, Any]:
        """Start a scrub from the first block (a paused one resumes; a running one goes on)."""
        if tranquility is not None:
            self.st["tranquility"] = self._tranquility_setting.parse(tranquility)
        if self.st["state"] == IDLE:
            self.st.update(state=RUNNING, position=None, blocks_checked=0, corruptions=0,
                           progress=0.0, started=self.meta.now_ms(), run=self.st["run"] + 1)
            log.info("scrub started (tranquility %g)", self.st["tranquility"])
        else:
            self.st["state"] = RUNNING
        await self._save()
        return self.status()

    async def pause(self) -> dict[str, Any]:
        """Pause a running scrub (it keeps its position)."""
        if self.st["state"] == RUNNING:
            self.st["state"] = PAUSED
            await self._save()
        return self.status()

    async def resume(self) -> dict[str, Any]:
        """Resume a paused scrub from its position."""
        if self.st["state"] == PAUSED:
            self.st["state"] = RUNNING
            await self._save()
        return self.status()

    async def cancel(self) -> dict[str, Any]:
        """Stop the scrub and forget its position (the next one starts from the beginning)."""
        if self.st["state"] != IDLE:
            self.st.update(state=IDLE, position=None, progress=progress_of(self.st["position"]))
            log.info("scrub cancelled: %d blocks checked, %d corrupt", self.st["blocks_checked"],
                     self.st["corruptions"])
            await self._save()
        return self.status()

    async def set_tranquility(self, tranquility: object) -> dict[str, Any]:
        """Change the tranquility (validated, persisted; takes effect at the next block)."""
        await self._tranquility_setting.set(tranquility)
        return self.status()

    async def _apply_tranquility(self, tranquility: float) -> None:
        self.st["tranquility"] = tranquility
        await self._save()

    # ------------------------------------------------------------ work

    async def step(self, limit: int | None = None, *, tranquilizer: Tranquilizer | None = None) -> int:
        """Check the next batch of blocks (while running); returns how many were checked.

        When no block is left the scrub completes (state idle, `last_completed`,
        `next_run`). With a `tranquilizer`, rests after each block.
        """
        async with self._step_lock:  # the worker task and a "run once" caller never interleave
            return await self._step(limit, tranquilizer)

    def _current(self, run: int) -> bool:
        """Whether run `run` is still the current one, and running."""
        if defects.on("c13-scrub-stale-step"):
            return self.st["state"] == RUNNING  # re-introduced: any run will do
        return self.st["run"] == run and self.st["state"] == RUNNING

    async def _step(self, limit: int | None, tranquilizer: Tranquilizer | None) -> int:
        if self.st["state"] != RUNNING:
            return 0
        run = self.st["run"]
        n = limit or self.batch
        pos = self.st["position"]
        hashes = await self.ctx.run_sync(
            lambda: list(itertools.islice(self.blocks.walk(start_after=pos), n))
        )
        checked = 0
        group_start: float | None = None  # start of the current tranquilizer step
        for h in hashes:
            if not self._current(run):
                break
            if tranquilizer is not None and group_start is None:
                tranquilizer.begin()
                group_start = tranquilizer.now()
            await self._check(h)
            if not self._current(run):
                break  # paused or cancelled while checking: the block is not counted
            checked += 1
            self.st["blocks_checked"] += 1
            self.st["position"] = h
            if tranquilizer is not None and tranquilizer.now() - group_start >= MIN_STEP_S:
                await tranquilizer.tranquilize(self.st["tranquility"])
                group_start = None
        if tranquilizer is not None and group_start is not None and self._current(run):
            await tranquilizer.tranquilize(self.st["tranquility"])
        if self.st["run"] != run and not defects.on("c13-scrub-stale-step"):
            return checked  # cancelled (and maybe started again): this step is stale
        if not hashes and self.st["state"] == RUNNING:
            now = self.meta.now_ms()
            self.st.update(state=IDLE, position=None, progress=1.0, last_completed=now,
                           next_run=self._next_run(now))
            log.info("scrub complete: %d blocks checked, %d corrupt",
                     self.st["blocks_checked"], self.st["corruptions"])
        await self._save()
        return checked

    async def _check(self, h: bytes) -> None:
        try:
            with checksum.thorough_reads():
                self.bytes_checked += len(await self.manager.read_local(h))
            if not self.meta.rc_get(h).is_nonzero():
                # A file nothing references here (e.g. a put that failed on this node but
                # whose file survived a power cut, then the reference's deletion): nothing
                # else would ever queue it. Resync decides (grace period, offload, delete).
                await self.meta.resync_put(h, 0)
        except BlockCorrupted:
            # read_local quarantined it and queued its resync (delay 0).
            self.st["corruptions"] += 1
            log.warning("scrub: block %s is corrupt: quarantined, resync queued", h.hex())
        except BlockNotFound:
            pass  # deleted since it was listed
        except Exception as exc:  # this block only: counted, logged with it, skipped
            self.supervisor.record(exc, f"block {h.hex()}")

    async def run_to_completion(self) -> None:
        """Step until the current scrub is no longer running (no rest: tests, `--wait`)."""
        while self.st["state"] == RUNNING:
            await self.step()

    def _next_run(self, now_ms: int) -> int:
        return now_ms + int(self.interval * 1000 * self.ctx.random.uniform(1 - JITTER, 1 + JITTER))

    async def run(self) -> None:
        """The worker task: scrub while running; otherwise wait for a command or `next_run`."""
        tranquilizer = Tranquilizer(30, clock=self._clock)
        while True:
            await self.supervisor.step(self._run_step, tranquilizer,
                                       about=lambda: f"state {self.st['state']}")

    async def _run_step(self, tranquilizer: Tranquilizer) -> None:
        state = self.st["state"]
        if state == RUNNING:
            await self.step(tranquilizer=tranquilizer)
            return
        tranquilizer.reset()
        timeout = math.inf
        if state == IDLE:
            if self.st["next_run"] is None:
                self.st["next_run"] = self._next_run(self.meta.now_ms())
                await self._save()
            delta_ms = self.st["next_run"] - self.meta.now_ms()
            if delta_ms <= 0:
                log.info("scrub: starting the periodic scrub")
                await self.start()
                return
            timeout = delta_ms / 1000
        with trio.move_on_after(timeout):
            await self.changed.wait()

__all__ = ["Scrub", "progress_of", "RUNNING", "PAUSED", "IDLE"]
