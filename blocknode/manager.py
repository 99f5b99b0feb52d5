"""The block manager: this node's block operations, as RPC handlers and as a coordinator.

Two roles (as in the seed's `BlockManager`):

- **Replica**: handlers for `put_block` / `put_blocks` (verify, store, apply the
  reference in the same commit), `get_block`, `need_block` (the seed's
  NeedBlockQuery), `add_ref` / `del_ref`.
- **Coordinator**: `put` writes a block and its reference to the partition's
  write nodes and returns once the write quorum has both; `get` asks read nodes
  in order with hedging (a second node is asked when the first has not answered
  within `hedge_delay`), verifies the bytes end to end and skips a node that
  answers with corrupt data; `put_many` groups small blocks per write-node set;
  `set_ref` goes to the write quorum too.

Compression: the coordinator decides each block's form once, at its
`compression_level` (`blocknode.block.compress`), and sends every replica that
form (the zstd frame with ``z: true``, see `blocknode.protocol`); replicas
store the form they receive, so nothing is compressed twice, and verify it
(decompress within `block_size`, hash). Reads between nodes ask for the stored
form too (`get_block` with ``z: true``); clients always get the plain bytes.

Reference times come from this node's hybrid logical clock (`blocknode.hlc`),
never from a client: a client request carrying `ts` is refused. A replica
refuses a version further ahead of its wall clock than `max_clock_skew` (and
logs it) and answers with the version it holds when that one wins over the
version sent (`newer`). A coordinator that sees its change lose to a version
made elsewhere observes that version and applies its change once more, newer
than it (a change made after seeing a version wins over it); if it loses
again, or the version is beyond the allowed skew, the caller gets a
`VersionConflict`.

Calls to this node itself go straight to the handlers (the RPC layer
short-circuits them), so a single node and a cluster run the same code. Message
kinds, request parsing and limits live in `blocknode.protocol`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import trio

from blocknode import block, defects, fastpath
from blocknode.block import VerifiedBlock
from blocknode.clock import wall_ms
from blocknode.context import RunSync, run_in_thread
from blocknode.errors import (
    BlockCorrupted,
    BlocknodeError,
    BlockNotFound,
    ClockSkewError,
    HashMismatch,
    QuorumError,
    VersionConflict,
)
from blocknode.hlc import HLC_STATE_KEY, HybridClock
from blocknode.layout import Layout, LiveLayout
from blocknode.protocol import (
    ADD_REF,
    CLIENT_GET,
    CLIENT_PUT,
    CLIENT_PUT_MANY,
    CLIENT_REF,
    DEFAULT_BLOCK_SIZE,
    DEL_REF,
    GET_BLOCK,
    NEED_BLOCK,
    PUT_BLOCK,
    PUT_BLOCKS,
    get_data,
    get_flag,
    get_flags,
    get_hash,
    get_ref,
    get_str,
    parse_batch_items,
    refuse_client_ts,
)
from blocknode.rpc.wire import PRIO_HIGH, PRIO_NORMAL, fit_texts
from blocknode.storage import LocalBlocks, MetadataStore, RefEntry

Reply = tuple[dict[str, Any], bytes | None]
Handler = Callable[[str, dict[str, Any], bytes | None], Awaitable[Reply]]

log = logging.getLogger(__name__)

DEFAULT_MAX_CLOCK_SKEW_MS = 5000
_SKEW_LOG_EVERY_S = 10.0


class Network(Protocol):
    """What the manager needs from the RPC layer (`blocknode.rpc.network.RpcNetwork`)."""

    node_id: str

    async def call(
        self, node_id: str, kind: str, fields: dict[str, Any], data: bytes | None = None, *,
        timeout: float, priority: int = PRIO_NORMAL,
    ) -> Reply: ...

    async def call_many(
        self, node_ids: list[str], kind: str, fields: dict[str, Any], data: bytes | None = None, *,
        quorum: int, timeout: float, interrupt_after_quorum: bool = True, priority: int = PRIO_NORMAL,
        quorum_sets: list[tuple[tuple[str, ...], int]] | None = None,
    ) -> list[tuple[str, Reply]]: ...

    def is_up(self, node_id: str) -> bool: ...

    def latency(self, node_id: str) -> float | None: ...


def ref_from_fields(hash: bytes, fields: dict[str, Any], *, deleted: bool) -> RefEntry:
    """The reference version a request carries (`ref_id`, `ts`), as stored."""
    ref_id, ts = get_ref(fields)
    return RefEntry(hash, ref_id, deleted, ts)


def version_of(value: Any) -> tuple[bool, int] | None:
    """A ``[deleted, ts]`` version from a reply (None when absent or malformed)."""
    if (isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return value[0], value[1]
    return None


def node_clock(meta: MetadataStore | None, max_skew_ms: int) -> HybridClock:
    """The node's hybrid logical clock: `meta`'s time base, its high-water mark kept in `meta`."""
    if meta is None:
        return HybridClock(wall_ms, max_skew_ms=max_skew_ms)
    clock = HybridClock(
        meta.now_ms, max_skew_ms=max_skew_ms,
        load=lambda: meta.state_get(HLC_STATE_KEY),
        store=lambda mark: meta.state_set(HLC_STATE_KEY, mark),
    )
    if clock.too_far_ahead(clock.last):
        log.warning("this node's reference clock starts %.1f s ahead of its wall clock (the "
                    "clock was set back since it last ran?): the other nodes refuse its "
                    "versions until the wall clock catches up", (clock.last - clock.now_ms()) / 1000)
    return clock


def _describe(deleted: bool) -> str:
    return "deletion" if deleted else "reference"


class BlockManager:
    """Block operations of one node (see module docstring)."""

    def __init__(
        self,
        *,
        node_id: str,
        layout: Layout | LiveLayout,
        net: Network,
        blocks: LocalBlocks,
        meta: MetadataStore,
        rpc_timeout: float = 30.0,
        hedge_delay: float = 0.05,
        block_size: int = DEFAULT_BLOCK_SIZE,
        run_sync: RunSync = run_in_thread,
        compression_level: int | None = None,
        max_clock_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS,
        clock: HybridClock | None = None,
        zone: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.layout = layout if isinstance(layout, LiveLayout) else LiveLayout.single(layout)
        """The live layout versions (updated in place by `blocknode.layout_service`)."""
        self.net = net
        self.blocks = blocks
        self.meta = meta
        self.rpc_timeout = rpc_timeout
        self.hedge_delay = hedge_delay
        self.hedged_reads = 0  # reads that asked a next node because one was slow (metrics)
        # (kind, count): items of a batch that failed for want of a quorum (the node's metrics)
        self.on_quorum_failures: Callable[[str, int], None] = lambda kind, n: None
        self.block_size = block_size
        self.run_sync = run_sync
        self.compression_level = compression_level
        """zstd level of the blocks this node coordinates (None: stored plain)."""
        self.zone = zone if zone is not None else (
            self.layout.node(node_id).zone if self.layout.has_node(node_id) else "default")
        self.clock = clock or node_clock(meta, max_clock_skew_ms)
        self._skew_log: dict[str, tuple[float, int]] = {}
        self.put_batch: Callable[[list[tuple[bytes, str]]], Awaitable[list[bytes | BlocknodeError]]] = \
            self.put_many
        """What stores a client's small-block batch: `put_many`, or the node's group commit
        across clients in front of it (`blocknode.group_commit`)."""

    def handlers(self) -> dict[str, Handler]:
        """The RPC handlers this manager serves, by message kind."""
        return {
            PUT_BLOCK: self.handle_put_block,
            GET_BLOCK: self.handle_get_block,
            NEED_BLOCK: self.handle_need_block,
            ADD_REF: self.handle_add_ref,
            DEL_REF: self.handle_del_ref,
            PUT_BLOCKS: self.handle_put_blocks,
            CLIENT_PUT: self.handle_client_put,
            CLIENT_PUT_MANY: self.handle_client_put_many,
            CLIENT_GET: self.handle_client_get,
            CLIENT_REF: self.handle_client_ref,
        }

    # ------------------------------------------------------------ replica side

    def accept_version(self, peer: str, ts: int) -> None:
        """Check a version time a peer sent: refused (`ClockSkewError`, logged) when it is
        further ahead of this node's clock than `max_clock_skew`; else observed."""
        ahead = self.clock.too_far_ahead(ts)
        if ahead:
            self._log_skew(peer, 1, ts)
            raise ClockSkewError(
                f"reference version at {ts} ms is {self._ahead_s(ts)} s ahead of node "
                f"{self.node_id}'s clock (max_clock_skew {self.clock.max_skew_ms / 1000:g} s): "
                "refused; check the clocks (NTP)")
        self.clock.observe(ts)

    def versions_from_peer(self, peer: str, refs: list[RefEntry]) -> list[RefEntry]:
        """The versions of `refs` this node accepts from `peer` (anti-entropy): those too
        far ahead of its clock are left out and logged; the rest are observed."""
        ok = [r for r in refs if not self.clock.too_far_ahead(r.ts_ms)]
        if len(ok) < len(refs):
            self._log_skew(peer, len(refs) - len(ok), max(r.ts_ms for r in refs))
        if ok:
            self.clock.observe(max(r.ts_ms for r in ok))
        return ok

    def _ahead_s(self, ts: int) -> str:
        return f"{(ts - self.clock.now_ms()) / 1000:.1f}"

    def _log_skew(self, peer: str, count: int, ts: int) -> None:
        # One line per peer per _SKEW_LOG_EVERY_S at most, with what was left unsaid.
        now = time.monotonic()
        last, held = self._skew_log.get(peer, (-math.inf, 0))
        held += count
        if now - last < _SKEW_LOG_EVERY_S:
            self._skew_log[peer] = (last, held)
            return
        self._skew_log[peer] = (now, 0)
        log.warning("refused %d reference version(s) from %s timestamped up to %s s ahead of "
                    "this node's clock (max_clock_skew %g s): check the clocks (NTP)",
                    held, peer, self._ahead_s(ts), self.clock.max_skew_ms / 1000)

    def _newer(self, refs: list[RefEntry]) -> list[RefEntry | None]:
        """For each version just applied: the stored version when it is a different one
        that wins over it (the change lost here), else None."""
        current = self.meta.ref_versions([(r.hash, r.ref_id) for r in refs])
        return [c if c is not None and c != r and c.wins_over(r) else None
                for r, c in zip(refs, current, strict=True)]

    async def handle_put_block(self, peer: str, fields: dict[str, Any],
                               data: bytes | memoryview | None) -> Reply:
        """Store a block (the receiver verifies the hash: the seed did not).

        Bytes from the wire are verified; the `VerifiedBlock` this node's own
        coordinator hands over in process is taken as it is (`block.accept`).
        The plain bytes of a file block (a view of the receive buffer) are hashed
        and written where they are, in one worker-thread hop (`write_from_wire`).
        """
        h = get_hash(fields)
        data = get_data(data, PUT_BLOCK, block_size=self.block_size)
        ref = ref_from_fields(h, fields, deleted=False) if "ref_id" in fields else None
        if ref is not None:
            self.accept_version(peer, ref.ts_ms)
        compressed = get_flag(fields, "z")
        if (not compressed and not isinstance(data, VerifiedBlock)
                and len(data) > block.HASH_IN_THREAD_MIN and not self.blocks.is_inline_size(len(data))):
            # Plain bytes of a file block from a peer: verify and write in one thread hop.
            block.check_size(len(data), self.block_size)
            stored = await self.blocks.write_from_wire(data, h, ref=ref)
        else:
            if not isinstance(data, bytes):  # a view of the receive buffer (Node.VIEW_KINDS)
                data = bytes(data)
            blk = await block.accept(data, h, block_size=self.block_size, run_sync=self.run_sync,
                                     compressed=compressed)
            stored = await self.blocks.write(blk, ref=ref)
        reply: dict[str, Any] = {"stored": stored}
        if ref is not None and (newer := self._newer([ref])[0]) is not None:
            reply["newer"] = [newer.deleted, newer.ts_ms]
        return reply, None

    async def handle_put_blocks(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Store a batch of blocks with their references (all verified; inline ones in one commit).

        `items` is a list of ``[hash, ref_id, ts, length]``; `data` is the blocks'
        bytes back to back (`z`: which are zstd frames). The batch succeeds or
        fails as a whole.
        """
        items = parse_batch_items(fields, data, with_hash=True, block_size=self.block_size)
        for it in items:
            self.accept_version(peer, it.ts)
        blks = await block.accept_batch(data, [(h, chunk) for h, _, _, chunk in items],
                                        block_size=self.block_size, run_sync=self.run_sync,
                                        compressed=get_flags(fields, "z", len(items)))
        small: list[tuple[VerifiedBlock, RefEntry]] = []
        refs: list[RefEntry] = []
        for blk, (h, ref_id, ts, _) in zip(blks, items, strict=True):
            ref = RefEntry(h, ref_id, False, ts)
            refs.append(ref)
            if self.blocks.is_inline_size(len(blk)):
                small.append((blk, ref))
            else:
                await self.blocks.write(blk, ref=ref)
        if small:
            await self.blocks.write_inline_many(small)
        reply: dict[str, Any] = {"stored": len(items)}
        newer = [[i, n.deleted, n.ts_ms] for i, n in enumerate(self._newer(refs)) if n is not None]
        if newer:
            reply["newer"] = newer
        return reply, None

    async def handle_get_block(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Return a verified block; a corrupt one is quarantined and queued for resync.

        With ``z: true`` a block stored compressed is sent as its zstd frame (``z: true``
        in the reply); otherwise the plain bytes.
        """
        h = get_hash(fields)
        blk = await self.read_local(h)
        if get_flag(fields, "z") and blk.zst is not None:
            return {"z": True}, blk.zst
        return {}, blk

    async def handle_need_block(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Whether this node needs the block (rc > 0) but does not hold it, and whether
        it references the block at all (a deleting peer that should hold it waits)."""
        h = get_hash(fields)
        return {"needed": await self.need_block(h),
                "referenced": self.meta.rc_get(h).is_nonzero()}, None

    async def handle_add_ref(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Apply a live reference version (idempotent, last writer wins)."""
        return await self._apply_from(peer, ref_from_fields(get_hash(fields), fields, deleted=False))

    async def handle_del_ref(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Apply a deleted reference version (idempotent, last writer wins)."""
        return await self._apply_from(peer, ref_from_fields(get_hash(fields), fields, deleted=True))

    async def _apply_from(self, peer: str, ref: RefEntry) -> Reply:
        # `had`: the reference was live here before (absent when this very version was
        # already here: then nobody can tell); `newer`: the version that won over this one.
        self.accept_version(peer, ref.ts_ms)
        (before,) = self.meta.ref_versions([(ref.hash, ref.ref_id)])
        changed = await self.blocks.apply_ref(ref)
        reply: dict[str, Any] = {"changed": changed}
        if before != ref:
            reply["had"] = before is not None and not before.deleted
        if not changed and (newer := self._newer([ref])[0]) is not None:
            reply["newer"] = [newer.deleted, newer.ts_ms]
        return reply, None

    async def read_local(self, h: bytes) -> VerifiedBlock:
        """Read a local block; on corruption quarantine it and queue a resync at once."""
        try:
            return await self.blocks.read(h)
        except BlockCorrupted:
            await self.meta.resync_put(h, 0)
            raise
        except BlockNotFound:
            if self.meta.rc_get(h).is_nonzero():
                # We should have it: make sure the resync worker fetches it.
                await self.meta.resync_put(h, 0)
            raise

    async def need_block(self, h: bytes) -> bool:
        """rc > 0 and the block is not held here."""
        return self.meta.rc_get(h).is_nonzero() and not await self.blocks.aexists(h)

    # --------------------------------------------------------- coordinator side

    async def put(self, data: bytes, ref_id: str, *, priority: int = PRIO_NORMAL) -> bytes:
        """Store `data` as a block with reference `ref_id` on a write quorum; returns its hash.

        The block is compressed here, once (`compression_level`), and every replica
        gets its stored form; the local replica gets the `VerifiedBlock` itself and
        neither hashes nor decompresses it again. When the reference lost to a newer
        deletion somewhere, it is applied again, newer than that (`set_ref`).
        """
        blk = await block.ahashed(data, block_size=self.block_size, run_sync=self.run_sync,
                                  level=self.compression_level)
        ts = await self.clock.next()
        form, z = block.wire_form(blk)
        fields: dict[str, Any] = {"hash": blk.hash, "ref_id": ref_id, "ts": ts}
        if z:
            fields["z"] = True
        ok = await self.write_call(blk.hash, PUT_BLOCK, fields, form, priority=priority)
        newer = self._newest(version_of(reply.get("newer")) for _, (reply, _) in ok)
        if newer is not None and newer[0]:
            await self._after_loss(blk.hash, ref_id, False, newer)
        return blk.hash

    async def put_many(self, blocks: list[tuple[bytes, str]]) -> list[bytes | BlocknodeError]:
        """Store many (data, ref_id) at once; per block its hash or its error.

        Blocks are grouped by their write nodes; each group goes to its nodes as
        one `put_blocks` message with the group's quorum, so a batch of small puts
        costs one RPC and one commit per node instead of one per block. The
        references of one call share one time.
        """
        for d, _ in blocks:
            block.check_size(len(d), self.block_size)

        level = self.compression_level

        def hash_all() -> list[VerifiedBlock]:
            return [block.compress(block.hashed(d), level) for d, _ in blocks]

        total = sum(len(d) for d, _ in blocks)
        blks = await self.run_sync(hash_all) if total > block.HASH_IN_THREAD_MIN else hash_all()
        groups: dict[tuple[tuple[tuple[str, ...], int], ...], list[int]] = {}
        for i, blk in enumerate(blks):
            # Keyed by each version's node *set*: blocks whose partitions list the same
            # nodes in another order still travel in one message per node.
            key = tuple((tuple(sorted(nodes)), q) for nodes, q in self.layout.write_sets(blk.hash))
            groups.setdefault(key, []).append(i)
        results: list[bytes | BlocknodeError] = [blk.hash for blk in blks]
        ts = await self.clock.next()

        async def send(sets: tuple[tuple[tuple[str, ...], int], ...], idx: list[int]) -> None:
            payload = block.join([blks[i] for i in idx])
            items = [[h, blocks[i][1], ts, length]
                     for i, (h, length, _) in zip(idx, payload.items, strict=True)]
            fields: dict[str, Any] = {"items": items}
            if any(z for _, _, z in payload.items):
                fields["z"] = [z for _, _, z in payload.items]
            try:
                ok = await self._call_sets(list(sets), PUT_BLOCKS, fields, payload)
            except BlocknodeError as exc:
                for i in idx:
                    results[i] = exc
                return
            lost: dict[int, list[tuple[bool, int] | None]] = {}
            for _, (reply, _) in ok:
                rows = reply.get("newer")
                for row in rows if isinstance(rows, list) else []:
                    if (isinstance(row, list) and len(row) == 3 and isinstance(row[0], int)
                            and 0 <= row[0] < len(idx)):
                        lost.setdefault(row[0], []).append(version_of(row[1:]))
            for j, versions in sorted(lost.items()):
                newer = self._newest(versions)
                if newer is not None and newer[0]:
                    i = idx[j]
                    try:
                        await self._after_loss(blks[i].hash, blocks[i][1], False, newer)
                    except BlocknodeError as exc:
                        results[i] = exc

        if len(groups) == 1:
            ((sets, idx),) = groups.items()
            await send(sets, idx)
        else:
            async with trio.open_nursery() as nursery:
                for sets, idx in groups.items():
                    nursery.start_soon(send, sets, idx)
        return results

    async def set_ref(self, h: bytes, ref_id: str, *, deleted: bool, ts_ms: int | None = None) -> bool:
        """Add or delete a reference on a write quorum of the block's nodes.

        The version's time is this node's clock (at least `ts_ms`). Returns whether
        the reference was live before on a write node that answered. When the change
        lost to a version made elsewhere, it is applied once more, newer than that
        one; `VersionConflict` if that is not possible or it loses again.
        """
        at_least = ts_ms or 0
        if self.clock.too_far_ahead(at_least):  # it would carry this node's clock away
            raise self._conflict(h, ref_id, deleted, (not deleted, at_least))
        for attempt in range(2):
            ts = await self.clock.next(at_least)
            ok = await self.write_call(h, DEL_REF if deleted else ADD_REF,
                                       {"hash": h, "ref_id": ref_id, "ts": ts}, priority=PRIO_HIGH)
            existed = any(reply.get("had") is True for _, (reply, _) in ok)
            newer = self._newest(version_of(reply.get("newer")) for _, (reply, _) in ok)
            if newer is None or newer[0] == deleted:
                return existed
            if attempt or not self.clock.observe(newer[1]):
                raise self._conflict(h, ref_id, deleted, newer)
        raise AssertionError("unreachable")

    async def write_call(self, h: bytes, kind: str, fields: dict[str, Any], data: Any = None, *,
                         priority: int = PRIO_NORMAL) -> list[tuple[str, Reply]]:
        """Send a write of block `h` to its write nodes: the write quorum of every live
        layout version (one version: its quorum; during a migration, each version's
        quorum among its own nodes, the union of their nodes called once)."""
        return await self._call_sets(self.layout.write_sets(h), kind, fields, data,
                                     priority=priority)

    async def _call_sets(self, sets: list[tuple[tuple[str, ...], int]], kind: str,
                         fields: dict[str, Any], data: Any, *,
                         priority: int = PRIO_NORMAL) -> list[tuple[str, Reply]]:
        if defects.ACTIVE and kind in (PUT_BLOCK, PUT_BLOCKS) and defects.on("e-put-one-replica"):
            sets = [(nodes, 1) for nodes, _ in sets]  # re-introduced defect: one replica will do
        if len(sets) == 1:
            ((nodes, quorum),) = sets
            return await self.net.call_many(
                list(nodes), kind, fields, data, quorum=quorum, timeout=self.rpc_timeout,
                interrupt_after_quorum=False, priority=priority)
        union = list(dict.fromkeys(n for nodes, _ in sets for n in nodes))
        return await self.net.call_many(
            union, kind, fields, data, quorum=max(q for _, q in sets), timeout=self.rpc_timeout,
            interrupt_after_quorum=False, priority=priority, quorum_sets=sets)

    async def _after_loss(self, h: bytes, ref_id: str, deleted: bool,
                          newer: tuple[bool, int]) -> None:
        # A put's reference lost to a newer deletion: apply it again, newer than that.
        if not self.clock.observe(newer[1]):
            raise self._conflict(h, ref_id, deleted, newer)
        await self.set_ref(h, ref_id, deleted=deleted)

    @staticmethod
    def _newest(versions: Iterable[tuple[bool, int] | None]) -> tuple[bool, int] | None:
        # The version that wins among those replicas answered with (ts, then deletion).
        found = [v for v in versions if v is not None]
        return max(found, key=lambda v: (v[1], v[0])) if found else None

    def _conflict(self, h: bytes, ref_id: str, deleted: bool,
                  newer: tuple[bool, int]) -> VersionConflict:
        ahead = newer[1] - self.clock.now_ms()
        when = (f"timestamped {ahead / 1000:.1f} s ahead of node {self.node_id}'s clock, beyond "
                f"max_clock_skew: it wins until then" if self.clock.too_far_ahead(newer[1])
                else f"at {newer[1]} ms, made meanwhile elsewhere; run the command again to apply "
                "yours after it")
        return VersionConflict(
            f"reference {ref_id!r} of {fastpath.hash_to_hex(h)}: this {_describe(deleted)} lost to "
            f"a newer {_describe(newer[0])} ({when}); it is not in effect")

    def read_order(self, h: bytes) -> list[str]:
        """The block's nodes in the order a read asks them."""
        return self.layout.read_nodes(
            h, self.node_id, is_up=self.net.is_up, latency=self.net.latency, local_zone=self.zone
        )

    async def get(self, h: bytes, *, priority: int = PRIO_NORMAL,
                  nodes: list[str] | None = None) -> VerifiedBlock:
        """Read a block from the first node with a valid copy (hedged; verified end to end).

        Nodes are asked in `read_order`. When this node comes first, it reads its own
        copy in the calling task and asks the others only when that fails. When a
        node fails, the next is asked at once; when it is merely slow (no answer
        within `hedge_delay`), the next is asked too and the first valid copy wins;
        the others are cancelled.
        Raises `BlockNotFound` when every node says it has no copy, `QuorumError`
        (listing each node's failure) when nodes failed otherwise.
        """
        order = nodes if nodes is not None else self.read_order(h)
        failures: dict[str, str] = {}
        not_found = 0
        asked = order
        if order and order[0] == self.node_id:
            # This node comes first: read here, in the calling task (no nursery, channel
            # or task); the hedged path asks the others only when that fails.
            try:
                return await self.read_local(h)
            except (BlocknodeError, OSError) as exc:
                if isinstance(exc, BlockNotFound):
                    not_found += 1
                failures[self.node_id] = f"{type(exc).__name__}: {exc}"
                order = order[1:]
        outcomes_send, outcomes = trio.open_memory_channel[
            tuple[str, VerifiedBlock | BaseException]](len(order))

        async def ask(node: str) -> None:
            try:
                if node == self.node_id:
                    blk = await self.read_local(h)
                else:
                    reply, data = await self.net.call(
                        node, GET_BLOCK, {"hash": h, "z": True}, timeout=self.rpc_timeout,
                        priority=priority,
                    )
                    if data is None:
                        raise BlockCorrupted(fastpath.hash_to_hex(h))
                    try:
                        blk = await block.accept(bytes(data), h, block_size=self.block_size,
                                                 run_sync=self.run_sync,
                                                 compressed=reply.get("z") is True)
                    except HashMismatch:
                        raise BlockCorrupted(fastpath.hash_to_hex(h)) from None
                outcomes_send.send_nowait((node, blk))
            except (BlocknodeError, OSError) as exc:
                outcomes_send.send_nowait((node, exc))

        data: VerifiedBlock | None = None
        async with trio.open_nursery() as nursery:
            started = pending = 0
            while started < len(order) or pending:
                if pending == 0:
                    nursery.start_soon(ask, order[started])
                    started += 1
                    pending += 1
                hedge = self.hedge_delay if started < len(order) else math.inf
                with trio.move_on_after(hedge):
                    node, outcome = await outcomes.receive()
                    pending -= 1
                    if not isinstance(outcome, BaseException):
                        data = outcome
                        break
                    if isinstance(outcome, BlockNotFound):
                        not_found += 1
                    failures[node] = f"{type(outcome).__name__}: {outcome}"
                    continue
                # No answer within the hedge delay: ask the next node as well.
                self.hedged_reads += 1
                nursery.start_soon(ask, order[started])
                started += 1
                pending += 1
            nursery.cancel_scope.cancel()
        if data is not None:
            return data
        hex_h = fastpath.hash_to_hex(h)
        if not_found == len(asked):
            raise BlockNotFound(hex_h, f"no copy on {', '.join(asked)}")
        raise QuorumError(f"get {hex_h}", 1, 0, failures)

    # ------------------------------------------------- client-facing handlers

    async def handle_client_put(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client asks this node to put a block with a reference."""
        refuse_client_ts(fields, CLIENT_PUT)
        data = get_data(data, CLIENT_PUT, block_size=self.block_size)
        h = await self.put(data, get_str(fields, "ref_id"))
        return {"hash": h}, None

    async def handle_client_put_many(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client puts a batch of blocks; the reply lists each block's hash or error."""
        refuse_client_ts(fields, CLIENT_PUT_MANY)
        items = parse_batch_items(fields, data, with_hash=False, block_size=self.block_size)
        results = await self.put_batch([(chunk, ref_id) for _, ref_id, _, chunk in items])
        self.on_quorum_failures(CLIENT_PUT_MANY, sum(isinstance(r, QuorumError) for r in results))
        return {
            "hashes": [r if isinstance(r, bytes) else None for r in results],
            "errors": fit_texts([None if isinstance(r, bytes) else str(r) for r in results]),
        }, None

    async def handle_client_get(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client asks this node to fetch a block from the cluster."""
        return {}, await self.get(get_hash(fields))

    async def handle_client_ref(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client adds (`deleted` false) or deletes a reference; `existed`: it was live
        before on a write node that answered."""
        refuse_client_ts(fields, CLIENT_REF)
        h = get_hash(fields)
        deleted = bool(fields.get("deleted", False))
        existed = await self.set_ref(h, get_str(fields, "ref_id"), deleted=deleted)
        return {"existed": existed}, None


__all__ = ["BlockManager", "Handler", "Network", "Reply", "node_clock", "ref_from_fields", "version_of"]
