"""Reference anti-entropy: make the `refs` of every partition agree between its replicas.

For each partition this node holds and each other node of that partition:

1. one `ae_digests` call compares a digest per partition (`MetadataStore.ref_digests`:
   BLAKE2b over the refs whose hash starts with the partition byte);
2. for each partition that differs, a second `ae_digests` call compares the
   256 sub-ranges (two-byte prefixes), so a single missed reference costs a
   few hundred bytes, not the whole partition;
3. for each differing sub-range, one `ae_exchange` call sends our entries
   and gets the peer's back; each side merges the other's by last writer wins
   (`LocalBlocks.apply_refs`), so after the call both hold the same versions.

Merging goes through `RefTable.tx_apply`, which updates the RC and queues the
resyncs that follow (a newly referenced block gets fetched, a released one
collected after the GC delay). Digests and listings read LMDB in a worker
thread. Rounds run every `interval` seconds (±25 % jitter), first shortly after
start (a node that was down catches up), and on demand (`run_round`).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Any

import trio

from blocknode.errors import BlocknodeError, RemoteProtocolError
from blocknode.manager import BlockManager, Reply
from blocknode.protocol import AE_DIGESTS, AE_EXCHANGE, get_hash, get_int, get_str
from blocknode.rpc.wire import PRIO_BACKGROUND
from blocknode.storage import MetadataStore, RefEntry

log = logging.getLogger(__name__)

MAX_PREFIXES = 1024
MAX_REFS = 100_000


def refs_under(meta: MetadataStore, prefix: bytes) -> list[list[Any]]:
    """The refs under `prefix` as wire tuples [hash, ref_id, deleted, ts] (blocking)."""
    return [[r.hash, r.ref_id, r.deleted, r.ts_ms] for r in meta.iter_refs(prefix)]


def refs_from_wire(items: Any) -> list[RefEntry]:
    """Decode wire tuples; `RemoteProtocolError` on anything malformed."""
    if not isinstance(items, list) or len(items) > MAX_REFS:
        raise RemoteProtocolError("refs: expected a list of [hash, ref_id, deleted, ts]")
    out = []
    for it in items:
        if not (isinstance(it, list | tuple) and len(it) == 4):
            raise RemoteProtocolError("refs: expected [hash, ref_id, deleted, ts] entries")
        h, rid, deleted, ts = it
        if not isinstance(deleted, bool):
            raise RemoteProtocolError("refs: malformed entry")
        out.append(RefEntry(get_hash({"hash": h}), get_str({"ref_id": rid}, "ref_id"), deleted,
                            get_int({"ts": ts}, "ts")))
    return out


def _prefixes(fields: dict[str, Any]) -> list[bytes]:
    ps = fields.get("prefixes")
    if (not isinstance(ps, list) or len(ps) > MAX_PREFIXES
            or not all(isinstance(p, bytes) and 1 <= len(p) <= 32 for p in ps)):
        raise RemoteProtocolError("prefixes: expected a list of 1..32-byte prefixes")
    return ps


class AntiEntropy:
    """Reference anti-entropy of one node (see module docstring)."""

    def __init__(self, manager: BlockManager, *, interval: float = 600.0,
                 rpc_timeout: float = 30.0, rng: random.Random | None = None) -> None:
        self.manager = manager
        self.meta = manager.meta
        self.layout = manager.layout
        self.node_id = manager.node_id
        self.interval = interval
        self.rpc_timeout = rpc_timeout
        self._rng = rng or random.Random()
        self.last_round: dict[str, Any] | None = None
        self.rounds = 0
        self._lock = trio.Lock()

    # ------------------------------------------------------------ handlers

    def handlers(self) -> dict[str, Any]:
        """RPC handlers: ``ae_digests`` and ``ae_exchange``."""
        return {AE_DIGESTS: self.handle_digests, AE_EXCHANGE: self.handle_exchange}

    async def handle_digests(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Digests of the refs under each requested prefix."""
        ps = _prefixes(fields)
        return {"digests": await trio.to_thread.run_sync(self.meta.ref_digests, ps)}, None

    async def handle_exchange(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Merge the peer's refs under `prefix` and answer with ours (as they were before)."""
        prefix = fields.get("prefix")
        if not isinstance(prefix, bytes) or not 1 <= len(prefix) <= 32:
            raise RemoteProtocolError("prefix: expected 1..32 bytes")
        theirs = refs_from_wire(fields.get("refs"))
        if any(not r.hash.startswith(prefix) for r in theirs):
            raise RemoteProtocolError("refs: entry outside the prefix")
        ours = await trio.to_thread.run_sync(refs_under, self.meta, prefix)
        changed = await self.manager.blocks.apply_refs(self.manager.versions_from_peer(peer, theirs))
        return {"refs": ours, "changed": changed}, None

    # ------------------------------------------------------------ rounds

    async def run_round(self) -> dict[str, Any]:
        """Compare and merge every partition held here with every other replica.

        Returns statistics: peers reached/failed, partitions and sub-ranges
        that differed, refs merged here. A peer that fails is skipped (and
        listed); the next round retries it.
        """
        async with self._lock:
            by_peer: dict[str, list[int]] = defaultdict(list)
            for p in self.layout.partitions_of_node(self.node_id):
                for n in self.layout.partition_nodes(p):
                    if n != self.node_id:
                        by_peer[n].append(p)
            stats: dict[str, Any] = {"peers_ok": [], "peers_failed": {}, "partitions_differing": 0,
                                     "ranges_exchanged": 0, "merged_here": 0, "merged_there": 0}
            for peer, parts in sorted(by_peer.items()):
                try:
                    await self._sync_with(peer, parts, stats)
                    stats["peers_ok"].append(peer)
                except (BlocknodeError, OSError) as exc:
                    stats["peers_failed"][peer] = f"{type(exc).__name__}: {exc}"
                    log.info("anti-entropy with %s failed: %s", peer, exc)
            stats["finished"] = self.meta.now_ms()
            self.rounds += 1
            self.last_round = stats
            return stats

    async def _digests(self, peer: str, prefixes: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        mine = await trio.to_thread.run_sync(self.meta.ref_digests, prefixes)
        theirs: list[bytes] = []
        for i in range(0, len(prefixes), MAX_PREFIXES):
            reply, _ = await self.manager.net.call(
                peer, AE_DIGESTS, {"prefixes": prefixes[i:i + MAX_PREFIXES]},
                timeout=self.rpc_timeout, priority=PRIO_BACKGROUND)
            got = reply.get("digests")
            if not isinstance(got, list):
                raise RemoteProtocolError("ae_digests: no digests in the reply")
            theirs.extend(got)
        if len(theirs) != len(prefixes):
            raise RemoteProtocolError("ae_digests: wrong number of digests")
        return mine, theirs

    async def _sync_with(self, peer: str, parts: list[int], stats: dict[str, Any]) -> None:
        prefixes = [bytes([p]) for p in parts]
        mine, theirs = await self._digests(peer, prefixes)
        differing = [p for p, a, b in zip(prefixes, mine, theirs, strict=True) if a != b]
        stats["partitions_differing"] += len(differing)
        for p in differing:
            subs = [p + bytes([b]) for b in range(256)]
            mine, theirs = await self._digests(peer, subs)
            for sp, a, b in zip(subs, mine, theirs, strict=True):
                if a != b:
                    await self._exchange(peer, sp, stats)

    async def _exchange(self, peer: str, prefix: bytes, stats: dict[str, Any]) -> None:
        ours = await trio.to_thread.run_sync(refs_under, self.meta, prefix)
        reply, _ = await self.manager.net.call(
            peer, AE_EXCHANGE, {"prefix": prefix, "refs": ours},
            timeout=self.rpc_timeout, priority=PRIO_BACKGROUND)
        theirs = refs_from_wire(reply.get("refs"))
        if any(not r.hash.startswith(prefix) for r in theirs):
            raise RemoteProtocolError("ae_exchange: entry outside the prefix")
        stats["ranges_exchanged"] += 1
        stats["merged_there"] += int(reply.get("changed", 0) or 0)
        if theirs:
            stats["merged_here"] += await self.manager.blocks.apply_refs(
                self.manager.versions_from_peer(peer, theirs))

    async def run(self, *, first_delay: float | None = None) -> None:
        """The worker task: a round shortly after start, then every `interval` (jittered)."""
        delay = first_delay if first_delay is not None else min(10.0, self.interval) * self._rng.uniform(0.5, 1.0)
        while True:
            await trio.sleep(delay)
            try:
                await self.run_round()
            except BlocknodeError as exc:
                log.warning("anti-entropy round failed: %s", exc)
            delay = self.interval * self._rng.uniform(0.75, 1.25)

    def info(self) -> dict[str, Any]:
        """State for `worker list`."""
        return {"interval": self.interval, "rounds": self.rounds, "last_round": self.last_round}


__all__ = ["AntiEntropy", "refs_from_wire"]
