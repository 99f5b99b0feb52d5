"""A replica's side of the direct path: clients that write to and read from it themselves.

A client that knows the layout (`client_layout`) sends a large block straight
to the block's write nodes (`client_put_direct`) and reads it straight from a
replica (`client_get_direct`), instead of through the node it talks to
(`blocknode.client.direct` is the client's side). Every guarantee of the
coordinated path holds, checked here, on each replica:

- the client's key must allow the request (`blocknode.auth`: ``write`` for a
  put, ``read`` for a get; the handshake proved the client role);
- this node must be a write node of the block in a live layout version, else
  `WrongNode` (code ``wrong_node``); the client must know every layout version
  live here, else `StaleLayout` (code ``stale_layout``): its quorum would miss a
  version. Either way the client fetches the layout again;
- the bytes are verified on receipt (`block.accept`: ``hash_mismatch``), stored
  durably (`LocalBlocks.write`: file fsynced and renamed, or inline in the same
  LMDB commit as the reference);
- the reference's time comes from this node's hybrid logical clock; a client
  sending ``ts`` is refused (a client's clock decides nothing). Each replica
  stamps its own version: they are all live versions of the same reference,
  and last writer wins keeps them equal after anti-entropy.

The client counts the write quorum of every live version itself and reports a
put done only then; a client that cannot reach a quorum falls back to the
coordinated path (`client_put`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocknode import block, fastpath
from blocknode.errors import BlocknodeError, RemoteProtocolError
from blocknode.layout_state import cluster_to_wire
from blocknode.protocol import (
    CLIENT_GET_DIRECT,
    CLIENT_LAYOUT,
    CLIENT_PUT_DIRECT,
    get_data,
    get_flag,
    get_hash,
    get_str,
    refuse_client_ts,
)
from blocknode.storage import RefEntry

if TYPE_CHECKING:
    from blocknode.layout_service import LayoutService
    from blocknode.manager import BlockManager, Handler, Reply

__all__ = ["DirectHandlers", "StaleLayout", "WrongNode", "layout_reply"]


class WrongNode(BlocknodeError):
    """A direct request reached a node that holds no copy of the block's partition in
    any live layout version (the client's layout is out of date): it refreshes it."""

    rpc_code = "wrong_node"


class StaleLayout(BlocknodeError):
    """A direct put from a client that does not know every live layout version: its
    quorum would miss a version's nodes. The client refreshes its layout."""

    rpc_code = "stale_layout"


def layout_reply(layouts: LayoutService, node_id: str, level: int | None) -> dict[str, Any]:
    """What `client_layout` answers: the live versions (oldest first) as
    ``[version, [rf, write_quorum, [[id, addr, zone, capacity]...]]]``, each
    node's synced version (a reader asks synced nodes first), this node's id,
    and its zstd `compression_level` (the client compresses a direct put once,
    at that level, so that no replica compresses it again)."""
    state = layouts.state
    nodes = {n.id for v in state.live for n in state.versions[v].nodes}
    return {
        "versions": [[v, cluster_to_wire(state.versions[v])] for v in state.live],
        "synced": {nid: state.node_synced(nid) for nid in sorted(nodes)},
        "node": node_id,
        "compression_level": level,
    }


def _client_versions(fields: dict[str, Any]) -> list[int]:
    raw = fields.get("versions")
    if not isinstance(raw, list) or not raw or len(raw) > 64 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in raw):
        raise RemoteProtocolError(
            f"{CLIENT_PUT_DIRECT}: 'versions' must be the list of layout versions the client "
            "knows as live (1 to 64 integers)")
    return raw


class DirectHandlers:
    """The handlers of `client_layout`, `client_put_direct` and `client_get_direct`."""

    def __init__(self, manager: BlockManager, layouts: LayoutService) -> None:
        self.manager = manager
        self.layouts = layouts
        self.puts = 0  # direct puts stored here (tests, metrics)

    def handlers(self) -> dict[str, Handler]:
        """The RPC handlers, by message kind."""
        return {
            CLIENT_LAYOUT: self.handle_layout,
            CLIENT_PUT_DIRECT: self.handle_put,
            CLIENT_GET_DIRECT: self.handle_get,
        }

    async def handle_layout(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """The live layout versions, for a client that writes to the replicas itself."""
        return layout_reply(self.layouts, self.manager.node_id,
                            self.manager.compression_level), None

    def _check_holder(self, h: bytes, versions: list[int] | None) -> None:
        live = self.manager.layout
        if versions is not None:
            missing = sorted(set(live.versions) - set(versions))
            if missing:
                raise StaleLayout(
                    f"node {self.manager.node_id}: layout version(s) {missing} are live here "
                    f"but the client knows only {sorted(versions)}: fetch the layout again")
        if self.manager.node_id not in live.write_nodes(h):
            raise WrongNode(
                f"node {self.manager.node_id} holds no copy of block {fastpath.hash_to_hex(h)} "
                f"in the live layout versions {live.versions}: fetch the layout again")

    async def handle_put(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Store a block a client sends this replica directly, with its reference.

        Checks the layout (`WrongNode`, `StaleLayout`), verifies the bytes (``z``: a
        zstd frame, decompressed within `block_size`), compresses plain bytes at this
        node's level, stamps the reference with this node's clock and
        stores both durably. Replies ``stored`` (newly) and ``ts`` (the version's time).
        """
        refuse_client_ts(fields, CLIENT_PUT_DIRECT)
        h = get_hash(fields)
        ref_id = get_str(fields, "ref_id")
        m = self.manager
        data = get_data(data, CLIENT_PUT_DIRECT, block_size=m.block_size)
        self._check_holder(h, _client_versions(fields))
        compressed = get_flag(fields, "z")
        # ``form_final``: the client tried this node's level already (not worth it).
        final = compressed or get_flag(fields, "form_final") or m.compression_level is None
        if (not compressed and final and len(data) > block.HASH_IN_THREAD_MIN
                and not m.blocks.is_inline_size(len(data))):
            # Plain bytes of a file block (a view of the receive buffer, `Node.VIEW_KINDS`):
            # verified and written where they are, in one worker-thread hop.
            ts = await m.clock.next()
            stored = await m.blocks.write_from_wire(data, h, ref=RefEntry(h, ref_id, False, ts))
            self.puts += 1
            return {"stored": stored, "ts": ts}, None
        if not isinstance(data, bytes):
            data = bytes(data)
        blk = await block.accept(data, h, block_size=m.block_size, run_sync=m.run_sync,
                                 compressed=compressed)
        if not final:
            blk = await block.acompress(blk, m.compression_level, run_sync=m.run_sync)
        ts = await m.clock.next()
        stored = await m.blocks.write(blk, ref=RefEntry(h, ref_id, False, ts))
        self.puts += 1
        return {"stored": stored, "ts": ts}, None

    async def handle_get(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """This replica's verified copy of a block (plain bytes); ``not_found`` when it
        has none (the client asks another replica, or the node it talks to)."""
        h = get_hash(fields)
        return {}, await self.manager.read_local(h)
