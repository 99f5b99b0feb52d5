"""Repair: put every block this node should know about through resync (the seed's `repair_data_store`).

Two sweeps, each listed in a worker thread in batches and queued with delay 0
(`MetadataStore.resync_put_many`, one commit per batch):

1. every referenced block: RC entries with rc > 0 and every hash in `refs`
   (a block needed here but missing gets fetched);
2. every block held here (`LocalBlocks.walk`): blocks held but not needed get
   offloaded if someone needs them, then deleted.

With ``rc=True`` it first recalculates the RC of every block from its
references (`LocalBlocks.recalculate_rc_many`, a batch per commit, under the
blocks' locks), which fixes any RC that drifted from the references (e.g.
after a restore of the LMDB).

Progress is persisted under ``"repair"`` in the `state` table (``state``
running / idle, ``phase``, ``queued``, ``rc_recalculated``, ``started``,
``finished``, ``error``), so the CLI can poll it. A repair interrupted by a
restart is reported as interrupted; run it again.

A repair that fails (any exception) is reported in ``error`` and counted by
the worker's `Supervisor`; its state goes back to idle and is saved whatever
happened (a failed save is counted too: the state in memory stays right), so
the next request runs.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import trio

from blocknode.context import NodeContext
from blocknode.errors import BlocknodeError
from blocknode.storage import LocalBlocks, MetadataStore
from blocknode.workers.base import Worker

log = logging.getLogger(__name__)

STATE_KEY = "repair"
BATCH = 1000


class Repair(Worker):
    """The repair procedure of one node (see module docstring)."""

    name = "repair"

    def __init__(self, meta: MetadataStore, blocks: LocalBlocks, ctx: NodeContext, *,
                 batch: int = BATCH) -> None:
        super().__init__(ctx)
        self.meta = meta
        self.blocks = blocks
        self.batch = batch
        saved = self.meta.state_get(STATE_KEY) or {}
        self.st: dict[str, Any] = {
            "state": "idle", "phase": None, "rc": False, "queued": 0, "rc_recalculated": 0,
            "started": None, "finished": None, "error": None,
        }
        self.st.update({k: v for k, v in saved.items() if k in self.st})
        if self.st["state"] == "running":
            self.st.update(state="idle", error="interrupted by a restart: run it again")
        self._requests: trio.MemorySendChannel[bool] | None = None

    def status(self) -> dict[str, Any]:
        """The repair progress (for `repair --wait`; a `worker list` row)."""
        return {"state": self.st["state"], "tranquility": None,
                **{k: v for k, v in self.st.items() if k != "state"}}

    async def _save(self) -> None:
        await self.meta.state_set(STATE_KEY, dict(self.st))

    async def request(self, *, rc: bool = False) -> bool:
        """Ask the worker task to run a repair; False when one is already running."""
        if self.st["state"] == "running" or self._requests is None:
            if self._requests is None:
                raise BlocknodeError("the repair worker is not running")
            return False
        self.st.update(state="running", phase="queued", rc=rc, error=None)
        self._requests.send_nowait(rc)
        return True

    async def run(self) -> None:
        """The worker task: runs requested repairs one at a time."""
        send, recv = trio.open_memory_channel[bool](16)
        self._requests = send
        try:
            async for rc in recv:
                await self.supervisor.step(self.repair, rc, about="repair")
        finally:
            self._requests = None

    async def repair(self, rc: bool = False) -> dict[str, Any]:
        """Run one repair now (see module docstring); returns the final status."""
        self.st.update(state="running", phase=None, rc=rc, queued=0, rc_recalculated=0,
                       started=self.meta.now_ms(), finished=None, error=None)
        log.info("repair started%s", " (with rc recalculation)" if rc else "")
        try:
            await self._save()
            if rc:
                self.st["phase"] = "rc"
                await self._sweep_refs(recalculate=True)
            self.st["phase"] = "referenced"
            await self._sweep_refs(recalculate=False)
            self.st["phase"] = "local"
            await self._sweep_local()
        except Exception as exc:  # reported in the status; the worker goes on
            self.st["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(
                exc, BlocknodeError | OSError) else str(exc)
            self.supervisor.record(exc, f"repair (phase {self.st['phase']})")
        finally:
            self.st.update(state="idle", phase=None, finished=self.meta.now_ms())
        try:
            await self._save()
        except Exception as exc:  # the state in memory is right; a restart says "interrupted"
            self.supervisor.record(exc, "repair: saving its state")
        log.info("repair done: %d queued, %d rc recalculated", self.st["queued"],
                 self.st["rc_recalculated"])
        return self.status()

    async def _sweep_refs(self, *, recalculate: bool) -> None:
        after: bytes | None = None
        while True:
            hashes = await self.ctx.run_sync(
                lambda a=after: self.meta.referenced_hashes(a, self.batch,
                                                            only_nonzero=not recalculate)
            )
            if not hashes:
                return
            if recalculate:
                await self.blocks.recalculate_rc_many(hashes)
                self.st["rc_recalculated"] += len(hashes)
            else:
                await self.meta.resync_put_many(hashes, 0)
                self.st["queued"] += len(hashes)
            after = hashes[-1]
            await self._save()

    async def _sweep_local(self) -> None:
        after: bytes | None = None
        while True:
            hashes = await self.ctx.run_sync(
                lambda a=after: list(itertools.islice(self.blocks.walk(start_after=a), self.batch))
            )
            if not hashes:
                return
            after = hashes[-1]
            # A block with a live RC was queued by the reference sweep already.
            hashes = [h for h in hashes if not self.meta.rc_get(h).is_nonzero()]
            if hashes:
                await self.meta.resync_put_many(hashes, 0)
                self.st["queued"] += len(hashes)
            await self._save()


__all__ = ["Repair"]
