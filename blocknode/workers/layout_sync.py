"""Layout sync: move this node's data to the newest layout version, and drop what it left.

After a new layout version becomes current (`blocknode.layout_service`), every
node of it runs, until it succeeds:

1. an anti-entropy round (`AntiEntropy.run_round`) over the partitions it holds
   in any live version, with every node of those partitions in any live version:
   the references of its new partitions arrive (and those it had go out). Every
   peer of the *newest* version must answer; a peer only of older versions
   (a node leaving, maybe dead) is tried but may fail: what it alone held is
   lost with it (its copies are rebuilt from the survivors).
2. a scan of its partitions in the newest version: every block referenced here
   (by a reference older than the version, `APPLY_MARGIN_MS` included) and not
   held is queued for resync (the resync worker fetches it from the old and new
   nodes, `BlockManager.read_order`). The step is done when none is missing.
   Newer references were written to a write quorum of every live version, the
   newest included (the resync worker's arrival check fetches any copy that
   is still missing here), so a steady write load does not hold the migration up.

Then it reports the version synced (`LayoutService.ack_synced`, gossiped); once
every node of the newest version has, the older versions retire everywhere.

With one live version left, a partition this node holds no more but still has
references of is dropped (`MetadataStore.drop_refs_under`): its blocks become
Deletable after the GC delay and the resync worker hands each to the nodes that
need it (`need_block` of every write node) and deletes it — the normal GC path.

`run_once` does one step now (tests, `admin_resync_run_once`-style driving).
`status` (a `worker list` row) shows the migration's progress.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from blocknode.context import NodeContext
from blocknode.errors import BlockNotFound
from blocknode.layout import PARTITION_COUNT, layout_of
from blocknode.workers.base import Worker

if TYPE_CHECKING:
    from blocknode.layout_service import LayoutService
    from blocknode.manager import BlockManager
    from blocknode.storage.resync_queue import ErrorEntry
    from blocknode.workers.anti_entropy import AntiEntropy

log = logging.getLogger(__name__)

RETRY_S: Final = 5.0
"""Seconds between two attempts while the newest version is not synced."""
APPLY_MARGIN_MS: Final = 10_000
"""References made up to this long after a version was applied count as older than it
(a coordinator may not have heard of the version yet, and wrote to the old nodes only);
later ones were written to a quorum of every live version, the new one included."""


def _held_nowhere(err: ErrorEntry | None) -> bool:
    """The block's last resync found no copy on any node it asked (`BlockManager.get`
    raises `BlockNotFound` only when every node of every live version said so)."""
    return err is not None and err.message.startswith(f"{BlockNotFound.__name__}:")


class LayoutSync(Worker):
    """The layout migration of one node (see module docstring)."""

    name = "layout-sync"

    def __init__(self, service: LayoutService, manager: BlockManager,
                 anti_entropy: AntiEntropy, ctx: NodeContext, *, retry_s: float = RETRY_S) -> None:
        super().__init__(ctx)
        self.service = service
        self.manager = manager
        self.meta = manager.meta
        self.blocks = manager.blocks
        self.anti_entropy = anti_entropy
        self.node_id = manager.node_id
        self.retry_s = retry_s
        self.busy = False
        self.progress: dict[str, Any] = {}
        self.dropped_partitions = 0

    async def run(self) -> None:
        while True:
            seen = self.service.changed.snapshot()
            await self.supervisor.step(self.run_once, about="layout sync")
            if self._idle():
                await self.service.changed.wait(seen)
            else:
                with trio.move_on_after(self.retry_s):
                    await self.service.changed.wait(seen)

    def _idle(self) -> bool:
        s = self.service.state
        if not s.versions:
            return True  # no layout yet (joining): woken when one arrives
        mine = self.node_id in {n.id for n in s.current_cluster.nodes}
        return (not mine or s.node_synced(self.node_id) >= s.current) and not s.pending_sync() \
            and len(s.live) == 1 and not self.progress.get("to_drop")

    async def run_once(self) -> dict[str, Any]:
        """One step: sync the newest version if not done; drop left partitions. Returns progress."""
        self.busy = True
        try:
            s = self.service.state
            if not s.versions:
                self.progress = {"version": 0, "state": "no layout yet (joining)"}
                return self.progress
            cur = s.current
            mine = self.node_id in {n.id for n in s.current_cluster.nodes}
            if mine and s.node_synced(self.node_id) < cur:
                await self._sync(cur)
            elif len(s.live) == 1:
                await self._drop_left()
            else:
                self.progress = {"version": cur, "state": "waiting for "
                                 + ", ".join(s.pending_sync())}
            return self.progress
        finally:
            self.busy = False

    async def _sync(self, version: int) -> None:
        newest = layout_of(self.service.state.versions[version])
        stats = await self.anti_entropy.run_round()
        failed = sorted(p for p in stats["peers_failed"] if p in newest.node_ids)
        lost = sorted(p for p in stats["peers_failed"] if p not in newest.node_ids)
        parts = newest.partitions_of_node(self.node_id)
        applied = self.service.state.history[version].applied_ms
        cutoff = applied + APPLY_MARGIN_MS if applied else 2**63
        missing = 0
        checked = 0
        nowhere = 0
        for p in parts:
            hashes: list[bytes] = []
            last: bytes | None = None
            for r in self.meta.iter_refs(bytes([p])):
                if r.hash != last and not r.deleted and r.ts_ms <= cutoff:
                    hashes.append(r.hash)
                    last = r.hash
            for h in hashes:
                checked += 1
                if self.meta.rc_get(h).is_nonzero() and not await self.blocks.aexists(h):
                    if _held_nowhere(self.meta.error_get(h)):
                        # Referenced, but every node of every live version said it has
                        # no copy (e.g. a reference to a block whose put failed): there
                        # is nothing to move, and waiting for it would hold the
                        # migration forever (simulation, `--layout-changes` seed 0). The
                        # resync worker keeps retrying it as before.
                        nowhere += 1
                        continue
                    missing += 1
                    await self.meta.resync_put(h, 0)
        self.progress = {"version": version, "state": "syncing", "partitions": len(parts),
                         "blocks_checked": checked, "blocks_missing": missing,
                         "blocks_held_nowhere": nowhere,
                         "peers_failed": failed, "peers_lost": lost}
        if lost:
            log.warning("layout sync to version %d: %s unreachable (they leave the layout); "
                        "copies only they held are lost, the rest are rebuilt from the "
                        "survivors", version, ", ".join(lost))
        if failed or missing:
            return
        self.progress["state"] = "synced"
        log.info("layout version %d synced here (%d partitions, %d blocks)", version, len(parts),
                 checked)
        await self.service.ack_synced(version)

    async def _drop_left(self) -> None:
        live = self.manager.layout
        held = set(live.partitions_of_node(self.node_id))
        to_drop = []
        for p in range(PARTITION_COUNT):
            if p in held:
                continue
            if next(iter(self.meta.iter_refs(bytes([p]))), None) is not None:
                to_drop.append(p)
        dropped = 0
        for p in to_drop:
            dropped += await self.meta.drop_refs_under(bytes([p]))
        if to_drop:
            self.dropped_partitions += len(to_drop)
            log.info("dropped %d reference(s) of %d partition(s) this node no longer holds: "
                     "their blocks are handed over and deleted after the GC delay", dropped,
                     len(to_drop))
        s = self.service.state
        self.progress = {"version": s.current, "state": "synced" if
                         s.node_synced(self.node_id) >= s.current else "not in layout",
                         "dropped_refs": dropped}

    def describe(self) -> str:
        """One line of migration progress (the `worker list` column)."""
        s = self.service.state
        if not s.versions:
            return "no layout yet (joining via bootstrap_peers)"
        if len(s.live) == 1 and not s.pending_sync():
            return f"v{s.current} synced everywhere"
        p = self.progress
        here = ("synced here" if s.node_synced(self.node_id) >= s.current else
                f"syncing here ({p.get('blocks_missing', '?')} of {p.get('blocks_checked', '?')} "
                "blocks missing)")
        return (f"v{s.live[0]}->v{s.current}: {here}; waiting for "
                f"{','.join(s.pending_sync()) or '-'}")

    def status(self) -> dict[str, Any]:
        s = self.service.state
        return {"state": "busy" if self.busy else "idle", "tranquility": None,
                "migration": self.describe(),
                "version": s.current, "live_versions": s.live,
                "synced": s.node_synced(self.node_id), "pending_nodes": s.pending_sync(),
                "dropped_partitions": self.dropped_partitions, "progress": self.progress}


__all__ = ["LayoutSync"]
