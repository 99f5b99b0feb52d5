"""The replicated layout state: versions, staged changes, sync acknowledgements, history.

Pure data (no I/O): `blocknode.layout_service` stores it (`storage.layout`) and
gossips it; this module says what it is and how two copies merge.

State
    ``versions``  the live versions: version number → `ClusterConfig` (nodes with
                  zone, capacity, address; replication factor; write quorum). The
                  partition assignment is a pure function of it (`Layout`).
    ``history``   every version ever applied: its digest, when it was applied,
                  when it retired (0: still live).
    ``staged``    the changes waiting for `apply`: ``base`` (the version they were
                  made against), ``stamp`` (ms), node id → new `ClusterNode` or
                  None (removal).
    ``synced``    node id → the newest version that node has finished syncing
                  (it holds every ref and block of its partitions in that version).
    ``floor``     the oldest live version.

Merge (a join: commutative, associative, idempotent, so gossip converges)
    history and versions: union (two different versions with one number — two
    nodes applied at once — keep the one with the larger digest; the other node
    says so in its log); ``synced``: the maximum per node; ``floor``: the
    maximum; ``staged``: the one with the larger ``(base, stamp, encoding)``.

Retirement (`settle`)
    Once every node of the newest version has synced it, the floor moves up to it
    and the older versions retire (their retirement time recorded in history).

Digests
    `version_digest` identifies one version (what `status` shows and peers
    compare); `state_digest` the whole state (what gossip compares).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.errors import BlocknodeError, ConfigError, RemoteProtocolError
from blocknode.layout import Layout, layout_of

__all__ = ["HistoryEntry", "LayoutState", "Staged", "StaleVersion", "cluster_from_wire",
           "cluster_to_wire", "version_digest"]


class StaleVersion(BlocknodeError):
    """`layout apply --version N` with an N that is not the next version."""

    rpc_code = "stale_version"


def cluster_to_wire(c: ClusterConfig) -> list[Any]:
    """A canonical plain form: ``[rf, write_quorum|None, [[id, addr, zone, capacity]...]]``."""
    return [c.replication_factor, c.write_quorum,
            [[n.id, n.addr, n.zone, n.capacity] for n in sorted(c.nodes, key=lambda n: n.id)]]


def cluster_from_wire(w: Any) -> ClusterConfig:
    """The inverse of `cluster_to_wire`; `RemoteProtocolError` if malformed."""
    try:
        rf, wq, rows = w
        nodes = tuple(ClusterNode(id=str(i), addr=str(a), zone=str(z), capacity=int(c))
                      for i, a, z, c in rows)
        return ClusterConfig(nodes=nodes, replication_factor=int(rf),
                             write_quorum=None if wq is None else int(wq))
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"layout: malformed cluster description ({exc})") from None


def version_digest(version: int, c: ClusterConfig) -> str:
    """The hex digest (16 bytes) of one layout version."""
    raw = msgpack.packb([version, cluster_to_wire(c)], use_bin_type=True)
    return hashlib.blake2b(b"blocknode-layout-version\x00" + raw, digest_size=16).hexdigest()


@dataclass(frozen=True)
class HistoryEntry:
    digest: str
    applied_ms: int
    retired_ms: int = 0  # 0: live


@dataclass(frozen=True)
class Staged:
    base: int = 0
    stamp: int = 0
    changes: dict[str, ClusterNode | None] = field(default_factory=dict)

    def wire(self) -> list[Any]:
        return [self.base, self.stamp,
                [[k, None if v is None else [v.addr, v.zone, v.capacity]]
                 for k, v in sorted(self.changes.items())]]

    def key(self) -> tuple[int, int, bytes]:
        return self.base, self.stamp, msgpack.packb(self.wire(), use_bin_type=True)


def _min_nonzero(a: int, b: int) -> int:
    return min(x for x in (a, b) if x) if a or b else 0


@dataclass(frozen=True)
class LayoutState:
    """One node's copy of the replicated layout state (see module docstring)."""

    versions: dict[int, ClusterConfig] = field(default_factory=dict)
    history: dict[int, HistoryEntry] = field(default_factory=dict)
    staged: Staged = field(default_factory=Staged)
    synced: dict[str, int] = field(default_factory=dict)
    floor: int = 0

    # ------------------------------------------------------------ construction

    @classmethod
    def seed(cls, cluster: ClusterConfig) -> LayoutState:
        """Version 1 of a new cluster, from its cluster file: the same on every node that
        has the same file (no clock in it); its nodes have nothing to sync."""
        layout_of(cluster)  # validates (and builds the layout every node will use)
        return cls(versions={1: cluster},
                   history={1: HistoryEntry(version_digest(1, cluster), 0)},
                   staged=Staged(base=1), synced={n.id: 1 for n in cluster.nodes}, floor=1)

    # ------------------------------------------------------------ queries

    @property
    def current(self) -> int:
        """The newest version (0: none yet)."""
        return max(self.versions, default=0)

    @property
    def current_cluster(self) -> ClusterConfig:
        return self.versions[self.current]

    @property
    def live(self) -> list[int]:
        """The live versions, oldest first."""
        return sorted(self.versions)

    def digest(self, version: int | None = None) -> str:
        """The digest of `version` (default: the current one; "" when there is none)."""
        v = self.current if version is None else version
        h = self.history.get(v)
        return h.digest if h is not None else ""

    def node_synced(self, node_id: str) -> int:
        return self.synced.get(node_id, 0)

    def pending_sync(self) -> list[str]:
        """Nodes of the current version that have not synced it yet."""
        if not self.versions:
            return []
        return sorted(n.id for n in self.current_cluster.nodes
                      if self.node_synced(n.id) < self.current)

    # ------------------------------------------------------------ wire / storage

    def to_wire(self) -> dict[str, Any]:
        return {
            "versions": [[v, cluster_to_wire(c)] for v, c in sorted(self.versions.items())],
            "history": [[v, h.digest, h.applied_ms, h.retired_ms]
                        for v, h in sorted(self.history.items())],
            "staged": self.staged.wire(),
            "synced": [[n, v] for n, v in sorted(self.synced.items())],
            "floor": self.floor,
        }

    @classmethod
    def from_wire(cls, w: Any) -> LayoutState:
        if not isinstance(w, dict):
            raise RemoteProtocolError("layout: expected a state map")
        try:
            versions = {int(v): cluster_from_wire(c) for v, c in w["versions"]}
            history = {int(v): HistoryEntry(str(d), int(a), int(r)) for v, d, a, r in w["history"]}
            base, stamp, rows = w["staged"]
            changes = {str(k): None if v is None else ClusterNode(str(k), str(v[0]), str(v[1]),
                                                                   int(v[2]))
                       for k, v in rows}
            synced = {str(n): int(v) for n, v in w["synced"]}
            floor = int(w["floor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"layout: malformed state ({exc!r})") from None
        for v, c in versions.items():
            h = history.get(v)
            if h is None or h.digest != version_digest(v, c):
                raise RemoteProtocolError(f"layout: version {v} does not match its digest")
        return cls(versions, history, Staged(int(base), int(stamp), changes), synced, floor)

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> LayoutState:
        return cls.from_wire(msgpack.unpackb(raw, raw=False, strict_map_key=False))

    def state_digest(self) -> bytes:
        """A digest of the whole state (equal on two nodes when they hold the same)."""
        return hashlib.blake2b(self.encode(), digest_size=16).digest()

    # ------------------------------------------------------------ merge

    def merge(self, other: LayoutState) -> LayoutState:
        """The join of two copies (see module docstring)."""
        history: dict[int, HistoryEntry] = dict(self.history)
        versions: dict[int, ClusterConfig] = {}
        for v, h in other.history.items():
            mine = history.get(v)
            if mine is None:
                history[v] = h
            elif mine.digest != h.digest:
                history[v] = max(mine, h, key=lambda e: e.digest)
            else:
                history[v] = HistoryEntry(h.digest, _min_nonzero(mine.applied_ms, h.applied_ms),
                                          _min_nonzero(mine.retired_ms, h.retired_ms))
        for src in (self.versions, other.versions):
            for v, c in src.items():
                if version_digest(v, c) == history[v].digest:
                    versions[v] = c
        floor = max(self.floor, other.floor)
        synced = dict(self.synced)
        for n, v in other.synced.items():
            synced[n] = max(synced.get(n, 0), v)
        staged = max(self.staged, other.staged, key=Staged.key)
        top = max(versions, default=0)
        floor = min(floor, top) if top else floor
        versions = {v: c for v, c in versions.items() if v >= floor}
        return LayoutState(versions, history, staged, synced, floor)

    def settle(self, now_ms: int) -> LayoutState:
        """Retire the older versions once every node of the newest has synced it."""
        cur = self.current
        floor = self.floor
        if cur and floor < cur and not self.pending_sync():
            floor = cur
        history = dict(self.history)
        for v, h in history.items():
            if v < floor and not h.retired_ms:
                history[v] = replace(h, retired_ms=now_ms)
        versions = {v: c for v, c in self.versions.items() if v >= floor}
        if floor == self.floor and history == self.history:
            return self
        return LayoutState(versions, history, self.staged, self.synced, floor)

    # ------------------------------------------------------------ changes

    def _staged_now(self, now_ms: int) -> Staged:
        # Changes staged against an older version were applied (or superseded): start anew.
        if self.staged.base < self.current:
            return Staged(self.current, max(now_ms, self.staged.stamp + 1), {})
        return self.staged

    def assign(self, node_id: str, *, zone: str, capacity: int, addr: str | None,
               now_ms: int) -> LayoutState:
        """Stage `node_id` with this zone and capacity (and address: required for a new node)."""
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ConfigError(f"capacity must be an integer > 0, got {capacity!r}")
        if not zone:
            raise ConfigError("zone must be a non-empty string")
        known = self.staged_cluster()
        old = next((n for n in known.nodes if n.id == node_id), None)
        if old is None:
            old = next((n for n in self.current_cluster.nodes if n.id == node_id), None)
        if addr is None:
            if old is None:
                raise ConfigError(f"node {node_id!r} is new to the layout: give its --addr HOST:PORT")
            addr = old.addr
        base = self._staged_now(now_ms)
        changes = {**base.changes, node_id: ClusterNode(node_id, addr, zone, capacity)}
        return replace(self, staged=Staged(self.current, max(now_ms, base.stamp + 1), changes))

    def remove(self, node_id: str, *, now_ms: int) -> LayoutState:
        """Stage the removal of `node_id`."""
        if not any(n.id == node_id for n in self.staged_cluster().nodes):
            raise ConfigError(f"node {node_id!r} is not in the layout (staged changes included)")
        base = self._staged_now(now_ms)
        changes = {**base.changes, node_id: None}
        return replace(self, staged=Staged(self.current, max(now_ms, base.stamp + 1), changes))

    def revert(self, *, now_ms: int) -> LayoutState:
        """Forget every staged change."""
        return replace(self, staged=Staged(self.current, max(now_ms, self.staged.stamp + 1), {}))

    def staged_changes(self) -> dict[str, ClusterNode | None]:
        """The staged changes in force (none when they were made against an older version)."""
        return dict(self.staged.changes) if self.staged.base >= self.current else {}

    def staged_cluster(self) -> ClusterConfig:
        """The cluster the staged changes would make."""
        cur = self.current_cluster
        nodes = {n.id: n for n in cur.nodes}
        for nid, change in self.staged_changes().items():
            if change is None:
                nodes.pop(nid, None)
            else:
                nodes[nid] = change
        return replace(cur, nodes=tuple(sorted(nodes.values(), key=lambda n: n.id)))

    def apply(self, version: int, *, now_ms: int) -> LayoutState:
        """Make the staged changes version `version` (which must be the next one)."""
        cur = self.current
        if version != cur + 1:
            raise StaleVersion(f"layout apply --version {version}: the current version is {cur}; "
                               f"the next one is {cur + 1} (`layout show`)")
        changes = self.staged_changes()
        if not changes:
            raise ConfigError("no staged changes to apply (`layout assign` / `layout remove`)")
        cluster = self.staged_cluster()
        Layout(cluster)  # raises ConfigError when it cannot be built (e.g. fewer nodes than rf)
        return replace(
            self,
            versions={**self.versions, version: cluster},
            history={**self.history, version: HistoryEntry(version_digest(version, cluster), now_ms)},
            staged=Staged(version, max(now_ms, self.staged.stamp + 1), {}),
        )

    def ack_synced(self, node_id: str, version: int) -> LayoutState:
        """Record that `node_id` finished syncing `version`."""
        if self.synced.get(node_id, 0) >= version:
            return self
        return replace(self, synced={**self.synced, node_id: version})
