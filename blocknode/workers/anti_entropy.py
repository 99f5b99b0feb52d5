"""Reference anti-entropy: make the `refs` of every partition agree between its replicas.

For each partition this node holds and each other node of that partition:

1. one `ae_digests` call compares a digest per partition (`MetadataStore.ref_digests`:
   BLAKE2b over the refs whose hash starts with the partition byte);
2. for each partition that differs, a second `ae_digests` call compares the
   256 sub-ranges (two-byte prefixes), so a single missed reference costs a
   few hundred bytes, not the whole partition;
3. for each differing sub-range, `exchange_range` sends our entries and gets
   the peer's back; each side merges the other's by last writer wins
   (`LocalBlocks.apply_refs`), so after it both hold the same versions.

An exchange is **paged**, so that no message head outgrows `HEAD_MAX` however
many references a range holds (a popular block can have thousands): entries
are ordered by (hash, ref_id); each `ae_exchange` call covers a key window
``(after, until]``. The caller sends its entries of the window (at most
`PAGE_BYTES` of them: `until` is the last one it sends, or None for the end
of the prefix); the peer merges them and answers with its own entries of the
window, at most `PAGE_BYTES` too — if it had more, it answers with a shorter
window (`until` = the last key it sent). The next call starts after the window
the peer answered for, until a window reaches the end of the prefix. A request
without ``paged`` is answered the old way (every entry under the prefix).

| kind          | fields                                              | reply                 |
|---------------|-----------------------------------------------------|-----------------------|
| `ae_digests`  | prefixes: [bytes]                                   | digests: [bytes]      |
| `ae_exchange` | prefix, refs: [[hash, ref_id, deleted, ts]], paged?, after?, until? (bounds: [hash, ref_id] or nil) | refs, changed, until (paged) |

Merging goes through `RefTable.tx_apply`, which updates the RC and queues the
resyncs that follow (a newly referenced block gets fetched, a released one
collected after the GC delay). A range whose exchange fails is counted
(``ranges_failed``) and the round goes on with the next one; only a peer that
cannot be reached (or does not answer in time) ends the round with that peer.
Digests and listings read LMDB through the context's `run_sync`. Rounds run
every `interval` seconds (±25 % jitter from the context's `random`), first
shortly after start (a node that was down catches up), and on demand
(`run_round`); each round runs under the worker's `Supervisor`.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any

import trio

from blocknode import defects
from blocknode.context import NodeContext
from blocknode.errors import NodeUnreachable, RemoteProtocolError, RpcTimeout
from blocknode.manager import BlockManager, Reply
from blocknode.protocol import AE_DIGESTS, AE_EXCHANGE, HEAD_MAX, get_hash, get_int, get_str
from blocknode.rpc.wire import PRIO_BACKGROUND
from blocknode.storage import MetadataStore, RefEntry
from blocknode.workers.base import Worker

log = logging.getLogger(__name__)

MAX_PREFIXES = 1024
MAX_REFS = 100_000
PAGE_BYTES = HEAD_MAX // 4
"""Encoded reference rows one side puts in one `ae_exchange` message (a page)."""
_ROW_OVERHEAD = 48
"""Bytes of one encoded row besides its ref id: the hash, the flag, the timestamp, framing."""

_UNPAGED = 1 << 62  # the page size of re-introduced defect C.8 (everything at once)

Key = tuple[bytes, str]
"""A reference's position in the table: (hash, ref_id)."""


def _order(key: Key) -> tuple[bytes, bytes]:
    return key[0], key[1].encode()


def refs_under(meta: MetadataStore, prefix: bytes) -> list[list[Any]]:
    """The refs under `prefix` as wire tuples [hash, ref_id, deleted, ts] (blocking)."""
    return [[r.hash, r.ref_id, r.deleted, r.ts_ms] for r in meta.iter_refs(prefix)]


def refs_page(meta: MetadataStore, prefix: bytes, after: Key | None, until: Key | None,
              max_bytes: int | None = None) -> tuple[list[list[Any]], bool]:
    """The refs under `prefix` in the window ``(after, until]`` (None: open end), as wire
    tuples, at most `max_bytes` (default `PAGE_BYTES`) of them (at least one); and whether
    more were left out (blocking)."""
    max_bytes = PAGE_BYTES if max_bytes is None else max_bytes
    rows: list[list[Any]] = []
    size = 0
    end = _order(until) if until is not None else None
    for r in meta.iter_refs(prefix, after=after):
        if end is not None and (r.hash, r.ref_id.encode()) > end:
            break
        row_size = _ROW_OVERHEAD + len(r.ref_id.encode())
        if rows and size + row_size > max_bytes:
            return rows, True
        rows.append([r.hash, r.ref_id, r.deleted, r.ts_ms])
        size += row_size
    return rows, False


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


def _key_from_wire(fields: dict[str, Any], name: str, prefix: bytes) -> Key | None:
    """A window bound: None, or [hash, ref_id] of an entry under `prefix`."""
    v = fields.get(name)
    if v is None:
        return None
    if not (isinstance(v, list | tuple) and len(v) == 2):
        raise RemoteProtocolError(f"field {name!r}: expected [hash, ref_id] or nil")
    h = get_hash({"hash": v[0]})
    if not h.startswith(prefix):
        raise RemoteProtocolError(f"field {name!r}: outside the prefix")
    return h, get_str({"ref_id": v[1]}, "ref_id")


def _key_to_wire(key: Key | None) -> list[Any] | None:
    return None if key is None else [key[0], key[1]]


def _check_window(refs: list[RefEntry], prefix: bytes, after: Key | None, until: Key | None,
                  who: str) -> None:
    lo = _order(after) if after is not None else None
    hi = _order(until) if until is not None else None
    for r in refs:
        k = (r.hash, r.ref_id.encode())
        if not r.hash.startswith(prefix) or (lo is not None and k <= lo) or (hi is not None and k > hi):
            raise RemoteProtocolError(f"{who}: entry outside the exchanged range")


def _prefix(fields: dict[str, Any]) -> bytes:
    prefix = fields.get("prefix")
    if not isinstance(prefix, bytes) or not 1 <= len(prefix) <= 32:
        raise RemoteProtocolError("prefix: expected 1..32 bytes")
    return prefix


def _prefixes(fields: dict[str, Any]) -> list[bytes]:
    ps = fields.get("prefixes")
    if (not isinstance(ps, list) or len(ps) > MAX_PREFIXES
            or not all(isinstance(p, bytes) and 1 <= len(p) <= 32 for p in ps)):
        raise RemoteProtocolError("prefixes: expected a list of 1..32-byte prefixes")
    return ps


async def exchange_range(manager: BlockManager, ctx: NodeContext, peer: str, prefix: bytes, *,
                         timeout: float) -> tuple[int, int, int]:
    """Merge every reference under `prefix` with `peer`, both ways, page by page.

    Returns (calls made, entries merged here, entries merged there). Raises on
    the first failed page (`RemoteProtocolError` for a malformed answer).
    """
    meta = manager.meta
    after: Key | None = None
    calls = merged_here = merged_there = 0
    while True:
        ours, more = await ctx.run_sync(refs_page, meta, prefix, after, None,
                                        _UNPAGED if defects.on("c8-ae-unpaged") else None)
        until: Key | None = (ours[-1][0], ours[-1][1]) if more else None
        reply, _ = await manager.net.call(
            peer, AE_EXCHANGE,
            {"prefix": prefix, "refs": ours, "paged": True,
             "after": _key_to_wire(after), "until": _key_to_wire(until)},
            timeout=timeout, priority=PRIO_BACKGROUND)
        calls += 1
        theirs = refs_from_wire(reply.get("refs"))
        answered = _key_from_wire(reply, "until", prefix)
        if until is not None and (answered is None or _order(answered) > _order(until)):
            raise RemoteProtocolError("ae_exchange: the answered range is not within the asked one")
        if answered is not None and after is not None and _order(answered) <= _order(after):
            raise RemoteProtocolError("ae_exchange: the answered range does not move forward")
        _check_window(theirs, prefix, after, answered, "ae_exchange")
        changed = reply.get("changed", 0)
        if not isinstance(changed, int) or isinstance(changed, bool) or changed < 0:
            raise RemoteProtocolError("ae_exchange: 'changed' is not a count")
        merged_there += changed
        if theirs:
            merged_here += await manager.blocks.apply_refs(
                manager.versions_from_peer(peer, theirs))
        if answered is None:
            return calls, merged_here, merged_there
        after = answered


class AntiEntropy(Worker):
    """Reference anti-entropy of one node (see module docstring)."""

    name = "anti-entropy"

    def __init__(self, manager: BlockManager, ctx: NodeContext, *, interval: float = 600.0,
                 rpc_timeout: float = 30.0) -> None:
        super().__init__(ctx)
        self.manager = manager
        self.meta = manager.meta
        self.layout = manager.layout
        self.node_id = manager.node_id
        self.interval = interval
        self.rpc_timeout = rpc_timeout
        self.last_round: dict[str, Any] | None = None
        self.rounds = 0
        self.merged: Counter[str] = Counter()  # refs merged here / there, all rounds (metrics)
        self._lock = trio.Lock()

    # ------------------------------------------------------------ handlers

    def handlers(self) -> dict[str, Any]:
        """RPC handlers: ``ae_digests`` and ``ae_exchange``."""
        return {AE_DIGESTS: self.handle_digests, AE_EXCHANGE: self.handle_exchange}

    async def handle_digests(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Digests of the refs under each requested prefix."""
        ps = _prefixes(fields)
        return {"digests": await self.ctx.run_sync(self.meta.ref_digests, ps)}, None

    async def handle_exchange(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Merge the peer's refs of a window and answer with ours (as they were before).

        Paged (``paged``: true): the window is ``(after, until]``; we answer at
        most a page and say which window we answered for (``until``, see the
        module docstring). Otherwise: every ref under `prefix`.
        """
        prefix = _prefix(fields)
        theirs = refs_from_wire(fields.get("refs"))
        if not fields.get("paged"):
            if any(not r.hash.startswith(prefix) for r in theirs):
                raise RemoteProtocolError("refs: entry outside the prefix")
            ours = await self.ctx.run_sync(refs_under, self.meta, prefix)
            changed = await self.manager.blocks.apply_refs(
                self.manager.versions_from_peer(peer, theirs))
            return {"refs": ours, "changed": changed}, None
        after = _key_from_wire(fields, "after", prefix)
        until = _key_from_wire(fields, "until", prefix)
        if after is not None and until is not None and _order(until) <= _order(after):
            raise RemoteProtocolError("ae_exchange: empty range")
        _check_window(theirs, prefix, after, until, "refs")
        ours, more = await self.ctx.run_sync(refs_page, self.meta, prefix, after, until,
                                             _UNPAGED if defects.on("c8-ae-unpaged") else None)
        answered = (ours[-1][0], ours[-1][1]) if more else until
        changed = await self.manager.blocks.apply_refs(
            self.manager.versions_from_peer(peer, theirs))
        return {"refs": ours, "changed": changed, "until": _key_to_wire(answered)}, None

    # ------------------------------------------------------------ rounds

    async def run_round(self) -> dict[str, Any]:
        """Compare and merge every partition held here with every other replica.

        Returns statistics: peers reached/failed, partitions and sub-ranges
        that differed, ranges whose exchange failed, refs merged here and
        there. A peer that fails is skipped (and listed); the next round
        retries it.
        """
        async with self._lock:
            by_peer: dict[str, list[int]] = defaultdict(list)
            for p in self.layout.partitions_of_node(self.node_id):
                for n in self.layout.partition_nodes(p):
                    if n != self.node_id:
                        by_peer[n].append(p)
            stats: dict[str, Any] = {"peers_ok": [], "peers_failed": {}, "partitions_differing": 0,
                                     "ranges_exchanged": 0, "ranges_failed": 0, "calls": 0,
                                     "merged_here": 0, "merged_there": 0}
            for peer, parts in sorted(by_peer.items()):
                try:
                    await self._sync_with(peer, parts, stats)
                    stats["peers_ok"].append(peer)
                except Exception as exc:  # one peer's failure: the next round retries it
                    stats["peers_failed"][peer] = f"{type(exc).__name__}: {exc}"
                    self.supervisor.record(exc, f"peer {peer}")
            stats["finished"] = self.meta.now_ms()
            self.rounds += 1
            self.merged.update(here=stats["merged_here"], there=stats["merged_there"])
            self.last_round = stats
            return stats

    async def _digests(self, peer: str, prefixes: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        mine = await self.ctx.run_sync(self.meta.ref_digests, prefixes)
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
        """One range; its failure is counted and the round goes on (unless the peer is gone)."""
        try:
            calls, here, there = await exchange_range(self.manager, self.ctx, peer, prefix,
                                                      timeout=self.rpc_timeout)
        except (NodeUnreachable, RpcTimeout):
            raise  # the peer, not the range: give up on it for this round
        except Exception as exc:  # this range only
            if defects.on("c8-ae-unpaged"):
                raise  # re-introduced defect: abandon every later range with this peer
            stats["ranges_failed"] += 1
            self.supervisor.record(exc, f"peer {peer}, range {prefix.hex()}")
            return
        stats["ranges_exchanged"] += 1
        stats["calls"] += calls
        stats["merged_here"] += here
        stats["merged_there"] += there

    async def run(self, *, first_delay: float | None = None) -> None:
        """The worker task: a round shortly after start, then every `interval` (jittered)."""
        rng = self.ctx.random
        delay = first_delay if first_delay is not None else min(10.0, self.interval) * rng.uniform(0.5, 1.0)
        while True:
            await trio.sleep(delay)
            await self.supervisor.step(self.run_round, about="round")
            delay = self.interval * rng.uniform(0.75, 1.25)

    def status(self) -> dict[str, Any]:
        """State for `worker list`."""
        return {"state": "busy" if self._lock.locked() else "idle", "tranquility": None,
                "interval": self.interval, "rounds": self.rounds, "last_round": self.last_round}


__all__ = ["AntiEntropy", "exchange_range", "refs_from_wire", "refs_page"]
