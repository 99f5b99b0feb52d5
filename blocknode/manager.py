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

Calls to this node itself go straight to the handlers (the RPC layer
short-circuits them), so a single node and a cluster run the same code.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from blocknode import fastpath
from blocknode.blocks import LocalBlocks
from blocknode.errors import (
    BlockCorrupted,
    BlocknodeError,
    BlockNotFound,
    ProtocolError,
    QuorumError,
)
from blocknode.layout import Layout
from blocknode.meta import MetaStore, RefEntry
from blocknode.rpc.wire import MAX_BATCH_ROWS, PRIO_BACKGROUND, PRIO_HIGH, PRIO_NORMAL, fit_texts

Reply = tuple[dict[str, Any], bytes | None]
Handler = Callable[[str, dict[str, Any], bytes | None], Awaitable[Reply]]


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
    ) -> list[tuple[str, Reply]]: ...

    def is_up(self, node_id: str) -> bool: ...

    def latency(self, node_id: str) -> float | None: ...


def get_hash(fields: dict[str, Any], name: str = "hash") -> bytes:
    """A 32-byte hash field of a request; `ProtocolError` when missing or malformed."""
    h = fields.get(name)
    if not isinstance(h, bytes) or len(h) != fastpath.HASH_LEN:
        raise ProtocolError(f"field {name!r}: expected a 32-byte block hash")
    return h


def get_str(fields: dict[str, Any], name: str) -> str:
    """A non-empty string field of a request."""
    v = fields.get(name)
    if not isinstance(v, str) or not v or len(v.encode()) > 255:
        raise ProtocolError(f"field {name!r}: expected a string of 1 to 255 bytes")
    return v


def get_int(fields: dict[str, Any], name: str) -> int:
    """A non-negative integer field of a request."""
    v = fields.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
        raise ProtocolError(f"field {name!r}: expected a non-negative integer")
    return v


def ref_from_fields(hash: bytes, fields: dict[str, Any], *, deleted: bool) -> RefEntry:
    """The reference version a request carries (`ref_id`, `ts`)."""
    return RefEntry(hash, get_str(fields, "ref_id"), deleted, get_int(fields, "ts"))


class BlockManager:
    """Block operations of one node (see module docstring)."""

    def __init__(
        self,
        *,
        node_id: str,
        layout: Layout,
        net: Network,
        blocks: LocalBlocks,
        meta: MetaStore,
        rpc_timeout: float = 30.0,
        hedge_delay: float = 0.05,
        block_size: int = 1 << 20,
    ) -> None:
        self.node_id = node_id
        self.layout = layout
        self.net = net
        self.blocks = blocks
        self.meta = meta
        self.rpc_timeout = rpc_timeout
        self.hedge_delay = hedge_delay
        self.block_size = block_size
        self.zone = layout.node(node_id).zone
        # Payloads this coordinator has just hashed, by object id, while its put is in
        # flight: the local replica then skips hashing the same bytes again. Only an
        # in-process call can hand over the very same object; bytes from the wire
        # are always verified.
        self._hashed_here: dict[int, bytes] = {}

    def handlers(self) -> dict[str, Handler]:
        """The RPC handlers this manager serves, by message kind."""
        return {
            "put_block": self.handle_put_block,
            "get_block": self.handle_get_block,
            "need_block": self.handle_need_block,
            "add_ref": self.handle_add_ref,
            "del_ref": self.handle_del_ref,
            "put_blocks": self.handle_put_blocks,
            "client_put": self.handle_client_put,
            "client_put_many": self.handle_client_put_many,
            "client_get": self.handle_client_get,
            "client_ref": self.handle_client_ref,
        }

    # ------------------------------------------------------------ replica side

    async def handle_put_block(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Store a block (the receiver verifies the hash: the seed did not)."""
        h = get_hash(fields)
        if data is None:
            raise ProtocolError("put_block carries no data")
        if len(data) > self.block_size:
            raise ProtocolError(f"block of {len(data)} bytes exceeds block_size {self.block_size}")
        ref = ref_from_fields(h, fields, deleted=False) if "ref_id" in fields else None
        verified = self._hashed_here.get(id(data)) == h
        stored = await self.blocks.write(h, data, ref=ref, verify=not verified)
        return {"stored": stored}, None

    async def handle_put_blocks(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Store a batch of blocks with their references (all verified; inline ones in one commit).

        `items` is a list of ``[hash, ref_id, ts, length]``; `data` is the blocks'
        bytes back to back. The batch succeeds or fails as a whole.
        """
        items = _parse_items(fields, data, with_hash=True)
        verified = self._hashed_here.get(id(data)) is not None
        small: list[tuple[bytes, bytes, RefEntry]] = []
        for h, ref_id, ts, chunk in items:
            if len(chunk) > self.block_size:
                raise ProtocolError(f"block of {len(chunk)} bytes exceeds block_size {self.block_size}")
            ref = RefEntry(h, ref_id, False, ts)
            if self.blocks.is_inline_size(len(chunk)):
                small.append((h, chunk, ref))
            else:
                await self.blocks.write(h, chunk, ref=ref, verify=not verified)
        if small:
            await self.blocks.write_inline_many(small, verify=not verified)
        return {"stored": len(items)}, None

    async def handle_get_block(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Return a verified block; a corrupt one is quarantined and queued for resync."""
        h = get_hash(fields)
        return {}, await self.read_local(h)

    async def handle_need_block(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Whether this node needs the block (rc > 0) but does not hold it, and whether
        it references the block at all (a deleting peer that should hold it waits)."""
        h = get_hash(fields)
        return {"needed": await self.need_block(h),
                "referenced": self.meta.rc_get(h).is_nonzero()}, None

    async def handle_add_ref(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Apply a live reference version (idempotent, last writer wins)."""
        h = get_hash(fields)
        return {"changed": await self.meta.apply_ref(ref_from_fields(h, fields, deleted=False))}, None

    async def handle_del_ref(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Apply a deleted reference version (idempotent, last writer wins)."""
        h = get_hash(fields)
        return {"changed": await self.meta.apply_ref(ref_from_fields(h, fields, deleted=True))}, None

    async def read_local(self, h: bytes) -> bytes:
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

    async def put(self, data: bytes, ref_id: str, ts_ms: int | None = None,
                  *, priority: int = PRIO_NORMAL) -> bytes:
        """Store `data` as a block with reference `ref_id` on a write quorum; returns its hash."""
        if len(data) > self.block_size:
            raise ProtocolError(f"block of {len(data)} bytes exceeds block_size {self.block_size}")
        h = await self._hash(data)
        ts = self.meta.now_ms() if ts_ms is None else ts_ms
        key = id(data)
        self._hashed_here[key] = h
        try:
            await self.net.call_many(
                list(self.layout.write_nodes(h)), "put_block",
                {"hash": h, "ref_id": ref_id, "ts": ts}, data,
                quorum=self.layout.write_quorum, timeout=self.rpc_timeout,
                interrupt_after_quorum=False, priority=priority,
            )
        finally:
            # The local replica's call may still be running (quorum reached without it);
            # it then verifies normally, which is only slower.
            self._hashed_here.pop(key, None)
        return h

    async def put_many(self, blocks: list[tuple[bytes, str, int]]) -> list[bytes | BlocknodeError]:
        """Store many (data, ref_id, ts) at once; per block its hash or its error.

        Blocks are grouped by their write nodes; each group goes to its nodes as
        one `put_blocks` message with the group's quorum, so a batch of small puts
        costs one RPC and one commit per node instead of one per block.
        """
        total = sum(len(d) for d, _, _ in blocks)
        for d, _, _ in blocks:
            if len(d) > self.block_size:
                raise ProtocolError(f"block of {len(d)} bytes exceeds block_size {self.block_size}")
        if total > 64 * 1024:
            hashes = await trio.to_thread.run_sync(lambda: [fastpath.block_hash(d) for d, _, _ in blocks])
        else:
            hashes = [fastpath.block_hash(d) for d, _, _ in blocks]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, h in enumerate(hashes):
            groups.setdefault(tuple(self.layout.write_nodes(h)), []).append(i)
        results: list[bytes | BlocknodeError] = list(hashes)

        async def send(nodes: tuple[str, ...], idx: list[int]) -> None:
            payload = b"".join(blocks[i][0] for i in idx)
            items = [[hashes[i], blocks[i][1], blocks[i][2], len(blocks[i][0])] for i in idx]
            key = id(payload)
            self._hashed_here[key] = b""
            try:
                await self.net.call_many(
                    list(nodes), "put_blocks", {"items": items}, payload,
                    quorum=self.layout.write_quorum, timeout=self.rpc_timeout,
                    interrupt_after_quorum=False,
                )
            except BlocknodeError as exc:
                for i in idx:
                    results[i] = exc
            finally:
                self._hashed_here.pop(key, None)

        if len(groups) == 1:
            ((nodes, idx),) = groups.items()
            await send(nodes, idx)
        else:
            async with trio.open_nursery() as nursery:
                for nodes, idx in groups.items():
                    nursery.start_soon(send, nodes, idx)
        return results

    async def set_ref(self, h: bytes, ref_id: str, *, deleted: bool, ts_ms: int | None = None) -> None:
        """Add or delete a reference on a write quorum of the block's nodes."""
        ts = self.meta.now_ms() if ts_ms is None else ts_ms
        await self.net.call_many(
            list(self.layout.write_nodes(h)), "del_ref" if deleted else "add_ref",
            {"hash": h, "ref_id": ref_id, "ts": ts},
            quorum=self.layout.write_quorum, timeout=self.rpc_timeout,
            interrupt_after_quorum=False, priority=PRIO_HIGH,
        )

    def read_order(self, h: bytes) -> list[str]:
        """The block's nodes in the order a read asks them."""
        return self.layout.read_nodes(
            h, self.node_id, is_up=self.net.is_up, latency=self.net.latency, local_zone=self.zone
        )

    async def get(self, h: bytes, *, priority: int = PRIO_NORMAL,
                  nodes: list[str] | None = None) -> bytes:
        """Read a block from the first node with a valid copy (hedged; verified end to end).

        Nodes are asked in `read_order`. When a node fails, the next is asked at
        once; when it is merely slow (no answer within `hedge_delay`), the next is
        asked too and the first valid copy wins; the others are cancelled.
        Raises `BlockNotFound` when every node says it has no copy, `QuorumError`
        (listing each node's failure) when nodes failed otherwise.
        """
        order = nodes if nodes is not None else self.read_order(h)
        failures: dict[str, str] = {}
        not_found = 0
        outcomes_send, outcomes = trio.open_memory_channel[tuple[str, bytes | BaseException]](len(order))

        async def ask(node: str) -> None:
            try:
                if node == self.node_id:
                    data = await self.read_local(h)
                else:
                    _, data = await self.net.call(
                        node, "get_block", {"hash": h}, timeout=self.rpc_timeout, priority=priority
                    )
                    if data is None or not await self._verify(data, h):
                        raise BlockCorrupted(fastpath.hash_to_hex(h))
                outcomes_send.send_nowait((node, data))
            except (BlocknodeError, OSError) as exc:
                outcomes_send.send_nowait((node, exc))

        data: bytes | None = None
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
                nursery.start_soon(ask, order[started])
                started += 1
                pending += 1
            nursery.cancel_scope.cancel()
        if data is not None:
            return data
        hex_h = fastpath.hash_to_hex(h)
        if not_found == len(order):
            raise BlockNotFound(hex_h, f"no copy on {', '.join(order)}")
        raise QuorumError(f"get {hex_h}", 1, 0, failures)

    async def _hash(self, data: bytes) -> bytes:
        if len(data) > 64 * 1024:
            return await trio.to_thread.run_sync(fastpath.block_hash, data)
        return fastpath.block_hash(data)

    async def _verify(self, data: bytes, h: bytes) -> bool:
        if len(data) > 64 * 1024:
            return await trio.to_thread.run_sync(fastpath.verify, data, h)
        return fastpath.verify(data, h)

    # ------------------------------------------------- client-facing handlers

    async def handle_client_put(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client asks this node to put a block with a reference."""
        if data is None:
            raise ProtocolError("client_put carries no data")
        ref_id = get_str(fields, "ref_id")
        h = await self.put(data, ref_id, fields.get("ts") if isinstance(fields.get("ts"), int) else None)
        return {"hash": h}, None

    async def handle_client_put_many(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client puts a batch of blocks; the reply lists each block's hash or error."""
        items = _parse_items(fields, data, with_hash=False)
        results = await self.put_many([(chunk, ref_id, ts) for _, ref_id, ts, chunk in items])
        return {
            "hashes": [r if isinstance(r, bytes) else None for r in results],
            "errors": fit_texts([None if isinstance(r, bytes) else str(r) for r in results]),
        }, None

    async def handle_client_get(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client asks this node to fetch a block from the cluster."""
        return {}, await self.get(get_hash(fields))

    async def handle_client_ref(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """A client adds (`deleted` false) or deletes a reference."""
        h = get_hash(fields)
        deleted = bool(fields.get("deleted", False))
        ts = fields.get("ts")
        await self.set_ref(h, get_str(fields, "ref_id"), deleted=deleted,
                           ts_ms=ts if isinstance(ts, int) else None)
        return {}, None


def _parse_items(fields: dict[str, Any], data: bytes | None,
                 *, with_hash: bool) -> list[tuple[bytes, str, int, bytes]]:
    """Split a batch message: `items` rows and the blocks' bytes back to back.

    Rows are ``[hash, ref_id, ts, length]`` (`with_hash`) or ``[ref_id, ts, length]``.
    """
    rows = fields.get("items")
    if not isinstance(rows, list) or not rows or len(rows) > MAX_BATCH_ROWS:
        raise ProtocolError(f"field 'items': expected a list of 1 to {MAX_BATCH_ROWS} rows")
    payload = data or b""
    view = memoryview(payload)
    out = []
    offset = 0
    for row in rows:
        if not isinstance(row, list) or len(row) != (4 if with_hash else 3):
            raise ProtocolError("field 'items': malformed row")
        h = get_hash({"hash": row[0]}) if with_hash else b""
        rest = row[1:] if with_hash else row
        ref_id = get_str({"ref_id": rest[0]}, "ref_id")
        ts = get_int({"ts": rest[1]}, "ts")
        length = get_int({"length": rest[2]}, "length")
        if offset + length > len(payload):
            raise ProtocolError("field 'items': lengths exceed the payload")
        out.append((h, ref_id, ts, bytes(view[offset:offset + length])))
        offset += length
    if offset != len(payload):
        raise ProtocolError("field 'items': lengths do not cover the payload")
    return out


__all__ = ["BlockManager", "PRIO_HIGH", "PRIO_NORMAL", "PRIO_BACKGROUND"]
