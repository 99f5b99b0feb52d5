"""The layout of a running cluster: stored, gossiped, changed by the `layout` commands.

Every node keeps a copy of the `LayoutState` (`blocknode.layout_state`) in its
metadata (`storage.layout`). The cluster file only seeds it: a node that has no
stored state starts from version 1 made from its cluster file (the same on every
node with the same file); afterwards the stored state wins and the file is not
read for the layout again.

- **Gossip**: every `SYNC_INTERVAL` seconds (and shortly after start) a node
  sends its state to every node of every live version (`layout_sync`); the
  receiver merges it (a join: last change wins, versions union, sync acks max)
  and answers with its own state when the two differed, which the sender merges
  in turn. A change made on one node (`apply`, a staged change, a node reporting
  it synced) is sent to every node at once. All nodes agree within a round.
- **Disagreement**: a peer whose current version or digest differs from ours
  after an exchange, or which has another version under the same number (two
  different cluster files), is listed under ``disagree`` in `status` and logged.
- **Applying a state** (`_adopt`) updates the `LiveLayout` in place (the manager
  and workers see it at once), the network's peers (a new node's address) and
  wakes the layout-sync worker (`blocknode.workers.layout_sync`).

| kind                   | fields                                  | reply                                     |
|------------------------|-----------------------------------------|-------------------------------------------|
| `layout_sync`          | state, digest                           | changed, version, digest, state?          |
| `admin_layout_show`    | —                                       | version, digest, nodes, staged, moves, ... |
| `admin_layout_assign`  | node, zone, capacity, addr?             | the `show` reply                          |
| `admin_layout_remove`  | node                                    | the `show` reply                          |
| `admin_layout_apply`   | version                                 | the `show` reply                          |
| `admin_layout_revert`  | —                                       | the `show` reply                          |
| `admin_layout_history` | —                                       | versions: [{version, digest, applied, retired, live}] |
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.errors import BlocknodeError, RemoteProtocolError
from blocknode.layout import PARTITION_COUNT, Layout, LiveLayout, layout_of
from blocknode.layout_state import LayoutState, version_digest
from blocknode.notify import Notify
from blocknode.protocol import (
    ADMIN_LAYOUT_APPLY,
    ADMIN_LAYOUT_ASSIGN,
    ADMIN_LAYOUT_HISTORY,
    ADMIN_LAYOUT_REMOVE,
    ADMIN_LAYOUT_REVERT,
    ADMIN_LAYOUT_SHOW,
    LAYOUT_SYNC,
    get_int,
    get_str,
)
from blocknode.rpc.transport import split_addr
from blocknode.rpc.wire import PRIO_HIGH

if TYPE_CHECKING:
    from blocknode.manager import Reply
    from blocknode.rpc.network import RpcNetwork
    from blocknode.storage import MetadataStore

__all__ = ["MAX_KNOWN", "LayoutService", "NotJoined", "layout_of", "layouts_of"]

log = logging.getLogger(__name__)

SYNC_INTERVAL: Final = 2.0
"""Seconds between two gossip rounds (±25 % jitter)."""
FIRST_SYNC_DELAY: Final = 0.5
MAX_KNOWN: Final = 256
"""Known-but-unassigned nodes remembered (the least recently heard from is forgotten)."""


class NotJoined(BlocknodeError):
    """A data request to a node that has no layout yet (it is joining via `bootstrap_peers`)."""

    rpc_code = "not_joined"


def layouts_of(state: LayoutState) -> list[tuple[int, Layout]]:
    """The `Layout` of every live version of `state`, oldest first."""
    return [(v, layout_of(state.versions[v])) for v in state.live]


class LayoutService:
    """This node's copy of the layout state and its replication (see module docstring)."""

    def __init__(self, node_id: str, meta: MetadataStore, seed: ClusterConfig | None, *,
                 now_ms: Callable[[], int], rpc_timeout: float,
                 sync_interval: float = SYNC_INTERVAL, rng: random.Random | None = None,
                 addr: str = "", zone: str = "") -> None:
        """`seed`: the cluster file's cluster, or None for a node joining with
        `bootstrap_peers` (no layout until a peer gives one; `blocknode.bootstrap`).
        `addr`, `zone`: this node's, sent with its gossip (a node not in the layout
        shows as known, with them, in `layout show` everywhere)."""
        self.node_id = node_id
        self.addr = addr
        self.zone = zone
        self.meta = meta
        self.now_ms = now_ms
        self.rpc_timeout = rpc_timeout
        self.sync_interval = sync_interval
        self._rng = rng or random.Random()
        raw = meta.layout_raw()
        if raw is None and seed is None:
            self.state = LayoutState()  # stored once a bootstrap peer gives the real one
        elif raw is None:
            assert seed is not None
            self.state = LayoutState.seed(seed)
            meta.layout.put_now(self.state.encode())
        else:
            self.state = LayoutState.decode(raw)
            if seed is not None and self.state.digest(1) and \
                    self.state.digest(1) != version_digest(1, seed):
                log.info("the cluster file differs from the layout this node stores (version "
                         "%d): the stored layout is used; the file only seeds a new cluster",
                         self.state.current)
        # No layout yet: a placeholder of this node alone keeps the manager and workers
        # working on nothing (`Node.dispatch` refuses data requests until it is replaced).
        self.live = LiveLayout(layouts_of(self.state) or [(0, Layout(ClusterConfig(
            (ClusterNode(node_id, addr or "-", zone or "default"),))))], synced=self._synced)
        self.known: dict[str, dict[str, Any]] = {}
        """Nodes heard from (their gossip) that no live version nor staged change lists:
        id → addr, zone, seen (ms). At most `MAX_KNOWN`."""
        self.net: RpcNetwork | None = None
        self.on_peers: Callable[[dict[str, str]], None] | None = None
        self.changed = Notify()
        """Notified after every change of the state (the layout-sync worker waits on it)."""
        self._lock = trio.Lock()
        self.peer_views: dict[str, dict[str, Any]] = {}
        """Per peer: its version and digest as of the last exchange, or the error."""
        self.sync_rounds = 0
        self.conflicts: dict[int, list[str]] = {}
        """Versions seen with two different digests (nodes started with different cluster
        files, or two versions applied at once): version → both digests."""
        if not self.has_layout:
            log.info("node %s has no layout yet: it fetches one from its bootstrap_peers",
                     node_id)
        elif not self.live.has_node(node_id):
            log.warning("node %s is not in the cluster layout (version %d): it holds no data "
                        "until `layout assign %s --zone Z --capacity C --addr HOST:PORT` and "
                        "`layout apply` on a node of the cluster", node_id, self.state.current,
                        node_id)

    @property
    def has_layout(self) -> bool:
        """False on a node joining with `bootstrap_peers` until a peer gave it the layout."""
        return bool(self.state.versions)

    def _synced(self, node_id: str) -> int:
        return self.state.node_synced(node_id)

    def attach(self, net: RpcNetwork, on_peers: Callable[[dict[str, str]], None] | None = None) -> None:
        """The network to gossip on; `on_peers(peers)` when the set of nodes changes."""
        self.net = net
        self.on_peers = on_peers

    def handlers(self) -> dict[str, Any]:
        return {
            LAYOUT_SYNC: self.handle_sync,
            ADMIN_LAYOUT_SHOW: self.handle_show,
            ADMIN_LAYOUT_ASSIGN: self.handle_assign,
            ADMIN_LAYOUT_REMOVE: self.handle_remove,
            ADMIN_LAYOUT_APPLY: self.handle_apply,
            ADMIN_LAYOUT_REVERT: self.handle_revert,
            ADMIN_LAYOUT_HISTORY: self.handle_history,
        }

    # ------------------------------------------------------------ the state

    def peers(self) -> dict[str, str]:
        """Every node of every live version and of the staged changes: id → address."""
        out: dict[str, str] = {}
        for v in self.state.live:
            for n in self.state.versions[v].nodes:
                out[n.id] = n.addr
        for nid, n in self.state.staged_changes().items():
            if n is not None:
                out.setdefault(nid, n.addr)
        return out

    async def _adopt(self, new: LayoutState) -> bool:
        """Make `new` (settled) this node's state; True when it changed anything."""
        new = new.settle(self.now_ms())
        old = self.state
        if new.state_digest() == old.state_digest():
            return False
        await self.meta.layout_store(new.encode())
        self.state = new
        if new.live != old.live or new.current != old.current:
            self.live.update(layouts_of(new))
            if new.current != old.current:
                log.info("layout version %d (%s) is now current; live versions %s",
                         new.current, new.digest(), new.live)
            for v in old.live:
                if v not in new.versions:
                    log.info("layout version %d retired: every node synced version %d",
                             v, new.current)
        if self.on_peers is not None:
            self.on_peers(self.peers())
        self.changed.notify()
        return True

    async def merge(self, other: LayoutState) -> bool:
        """Merge another node's state into ours; True when ours changed."""
        async with self._lock:
            for v, h in other.history.items():
                mine = self.state.history.get(v)
                if mine is not None and mine.digest != h.digest:
                    self.conflicts[v] = sorted({mine.digest, h.digest})
                    log.error("two different layouts carry version %d (%s here, %s elsewhere): "
                              "were the nodes started with different cluster files? The one "
                              "with the larger digest is kept everywhere", v, mine.digest,
                              h.digest)
            return await self._adopt(self.state.merge(other))

    async def change(self, fn: Callable[[LayoutState], LayoutState]) -> LayoutState:
        """Apply a local change (`fn` may raise to refuse it), then tell every node."""
        async with self._lock:
            await self._adopt(fn(self.state))
            state = self.state
        await self.broadcast()
        return state

    async def ack_synced(self, version: int) -> None:
        """This node finished syncing `version`: record it and tell every node."""
        await self.change(lambda s: s.ack_synced(self.node_id, version))

    # ------------------------------------------------------------ gossip

    def sync_fields(self) -> dict[str, Any]:
        """A `layout_sync` request: our state, its digest, our address and zone."""
        return {"state": self.state.to_wire(), "digest": self.state.state_digest(),
                "addr": self.addr, "zone": self.zone}

    def _note_known(self, peer: str, fields: dict[str, Any]) -> None:
        """Remember a node outside the layout that gossips with us (`layout show`)."""
        addr, zone = fields.get("addr"), fields.get("zone")
        if peer in self.peers() or not isinstance(addr, str) or not isinstance(zone, str):
            self.known.pop(peer, None)
            return
        try:
            split_addr(addr)
        except ValueError:
            return
        self.known.pop(peer, None)
        self.known[peer] = {"addr": addr, "zone": zone or "default", "seen": self.now_ms()}
        while len(self.known) > MAX_KNOWN:
            self.known.pop(next(iter(self.known)))

    async def handle_sync(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Merge the sender's state; answer with ours when they differed."""
        digest = fields.get("digest")
        if not isinstance(digest, bytes):
            raise RemoteProtocolError("layout_sync: expected digest (bytes)")
        theirs = LayoutState.from_wire(fields.get("state"))
        changed = await self.merge(theirs)
        self._note_known(peer, fields)
        reply: dict[str, Any] = {"changed": changed, "version": self.state.current,
                                 "digest": self.state.digest()}
        if self.state.state_digest() != digest:
            reply["state"] = self.state.to_wire()
        return reply, None

    async def sync_with(self, nid: str) -> None:
        assert self.net is not None
        try:
            reply, _ = await self.net.call(nid, LAYOUT_SYNC, self.sync_fields(),
                                           timeout=self.rpc_timeout, priority=PRIO_HIGH)
            if "state" in reply:
                await self.merge(LayoutState.from_wire(reply["state"]))
            version = get_int(reply, "version")
            digest = reply.get("digest")
            view: dict[str, Any] = {"version": version, "digest": digest}
            if (version, digest) != (self.state.current, self.state.digest()):
                # It had not merged ours when it answered, or it holds another version.
                view["differs"] = True
            self.peer_views[nid] = view
        except BlocknodeError as exc:
            self.peer_views[nid] = {"error": f"{type(exc).__name__}: {exc}"}
            log.debug("layout sync with %s failed: %s", nid, exc)

    async def broadcast(self) -> None:
        """One exchange with every other node of the layout, at once."""
        if self.net is None:
            return
        async with trio.open_nursery() as nursery:
            for nid in self.peers():
                if nid != self.node_id:
                    nursery.start_soon(self.sync_with, nid)

    async def sync_round(self) -> None:
        """One gossip round (every node); logs the peers that disagree."""
        before = {n: dict(v) for n, v in self.peer_views.items()}
        await self.broadcast()
        self.sync_rounds += 1
        for nid, view in self.disagreements().items():
            if before.get(nid, {}).get("differs") and "error" not in view:
                log.warning("node %s has layout version %s (%s), this node %d (%s): they "
                            "disagree for two rounds in a row", nid, view.get("version"),
                            view.get("digest"), self.state.current, self.state.digest())

    def disagreements(self) -> dict[str, dict[str, Any]]:
        """Peers whose layout differed from ours at the last exchange."""
        return {n: v for n, v in self.peer_views.items() if v.get("differs")}

    async def run(self) -> None:
        """The gossip loop (for the node's whole life)."""
        await trio.sleep(FIRST_SYNC_DELAY)
        while True:
            await self.sync_round()
            await trio.sleep(self.sync_interval * self._rng.uniform(0.75, 1.25))

    # ------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        """For `status`: version, digest, live versions, each node's sync state, disagreements."""
        s = self.state
        nodes = sorted({n.id for v in s.live for n in s.versions[v].nodes})
        return {
            "version": s.current,
            "digest": s.digest(),
            "live_versions": s.live,
            "in_layout": self.has_layout and self.live.has_node(self.node_id),
            "joining": not self.has_layout,
            "sync": {n: {"synced": s.node_synced(n), "done": s.node_synced(n) >= s.current}
                     for n in nodes},
            "pending_sync": s.pending_sync(),
            "disagree": self.disagreements(),
            "conflicts": {str(v): d for v, d in sorted(self.conflicts.items())},
        }

    def _is_up(self, nid: str) -> bool:
        if nid == self.node_id or self.net is None:
            return True
        return self.net.is_up(nid)

    def show(self) -> dict[str, Any]:
        """The `layout show` reply (JSON keys are a contract: version, nodes, staged)."""
        s = self.state
        if not s.versions:
            return {"version": 0, "digest": "", "nodes": [], "staged": [], "known": [],
                    "live_versions": [], "pending_sync": [], "joining": True}
        cur = layout_of(s.current_cluster)
        per_node = cur.summary()["partitions_per_node"]
        staged = s.staged_changes()
        out: dict[str, Any] = {
            "version": s.current,
            "digest": s.digest(),
            "replication_factor": cur.replication_factor,
            "write_quorum": cur.write_quorum,
            "live_versions": s.live,
            "nodes": [{"id": n.id, "zone": n.zone, "capacity": n.capacity, "addr": n.addr,
                       "partitions": per_node.get(n.id, 0),
                       "synced": s.node_synced(n.id)}
                      for n in sorted(s.current_cluster.nodes, key=lambda n: n.id)],
            "staged": [{"id": nid, "remove": True, "up": self._is_up(nid)} if n is None else
                       {"id": nid, "zone": n.zone, "capacity": n.capacity, "addr": n.addr}
                       for nid, n in sorted(staged.items())],
            "pending_sync": s.pending_sync(),
            "known": [{"id": nid, "addr": k["addr"], "zone": k["zone"], "up": self._is_up(nid),
                       "seen_ago_s": max(0, self.now_ms() - k["seen"]) // 1000}
                      for nid, k in sorted(self.known.items()) if nid not in staged
                      and nid not in {n.id for n in s.current_cluster.nodes}],
        }
        if staged:
            try:
                new = layout_of(s.staged_cluster())
            except BlocknodeError as exc:
                out["staged_error"] = str(exc)
            else:
                moves = new.moved_slots(cur)
                out["moves"] = moves
                out["partitions_moving"] = sum(
                    1 for p in range(PARTITION_COUNT)
                    if set(new.partition_nodes(p)) != set(cur.partition_nodes(p)))
                out["staged_nodes"] = [
                    {"id": n.id, "zone": n.zone, "capacity": n.capacity,
                     "partitions": new.summary()["partitions_per_node"].get(n.id, 0)}
                    for n in sorted(s.staged_cluster().nodes, key=lambda n: n.id)]
                out["next_version"] = s.current + 1
        return out

    # ------------------------------------------------------------ admin handlers

    async def handle_show(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        return self.show(), None

    async def handle_assign(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        node = get_str(fields, "node", max_bytes=255)
        zone = get_str(fields, "zone", max_bytes=255)
        capacity = get_int(fields, "capacity")
        addr = fields.get("addr")
        if addr is None and node in self.known:
            addr = self.known[node]["addr"]  # it joined with bootstrap_peers: its address is known
        if addr is not None:
            try:
                if not isinstance(addr, str):
                    raise ValueError(addr)
                split_addr(addr)
            except ValueError:
                raise RemoteProtocolError(f"field 'addr': expected HOST:PORT, got {addr!r}") from None
        now = self.now_ms()
        await self.change(lambda s: s.assign(node, zone=zone, capacity=capacity, addr=addr,
                                             now_ms=now))
        return self.show(), None

    async def handle_remove(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        node = get_str(fields, "node", max_bytes=255)
        now = self.now_ms()
        await self.change(lambda s: s.remove(node, now_ms=now))
        return self.show(), None

    async def handle_apply(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        version = get_int(fields, "version")
        now = self.now_ms()
        await self.change(lambda s: s.apply(version, now_ms=now))
        return self.show(), None

    async def handle_revert(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        now = self.now_ms()
        await self.change(lambda s: s.revert(now_ms=now))
        return self.show(), None

    async def handle_history(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        s = self.state
        return {"versions": [
            {"version": v, "digest": h.digest, "applied": h.applied_ms or None,
             "retired": h.retired_ms or None, "live": v in s.versions}
            for v, h in sorted(s.history.items())]}, None
