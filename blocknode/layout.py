"""The cluster layout: which nodes hold which partition of the hash space.

Pure and synchronous (no I/O, no clock, no randomness): every node builds the same
`Layout` from the same `ClusterConfig`, whatever the order of the nodes in the file,
the Python hash seed or the process.

Partitions
    The hash space is cut into 256 partitions by the first byte of a block hash
    (`partition_of`). Each partition is stored on `replication_factor` distinct nodes.

Algorithm: two-level weighted rendezvous hashing
    Rendezvous (highest-random-weight) hashing needs no stored state and moves few
    partitions when the cluster changes: adding a node only takes slots *to* the new
    node, plus a ripple from the re-tuned weights below when capacities differ
    (measured: at most ~3% of all slots in one zone) or from zones re-dealing their
    slots when a zone appears or grows (up to ~10%). `Layout.moved_slots` counts it. Garage instead solves a max-flow problem against the
    previous layout; we have no stored previous layout (the layout is a function of
    the cluster file alone), so rendezvous hashing is the natural fit.

    Each (partition, name) pair gets a key ``E / w`` where ``E = -ln(u)``, ``u`` in
    (0, 1] is taken from BLAKE2b of the partition number and the name, and ``w`` is a
    weight; the smallest keys win. ``E`` is exponentially distributed, so the chance
    of winning the first place is exactly ``w / sum(w)`` ("exponential race").

    1. Zones. Zones are ranked per partition by their own key (hashed from the
       zone name). Slots are dealt round-robin over that ranking, skipping zones
       that have no node left: with at least ``rf`` zones every partition spans
       ``rf`` zones; with fewer, each zone gets ``rf // zones`` or one more slot
       (as even as possible), and zones too small to take their share overflow to
       the others.
    2. Nodes. Within a zone that gets ``k`` slots of a partition, the ``k`` nodes
       with the smallest keys are taken.

    Capacity weighting. Taking the top ``k > 1`` of an exponential race is not
    proportional to the weights: a heavy node saturates (it can hold a partition
    at most once). So weights are tuned from capacities: the target chance of
    node ``i`` being among the ``k`` picked is ``p_i = k * c_i / C`` (water-filled
    so that no ``p_i`` exceeds 1), and its weight is ``w_i = -ln(1 - p_i)``. This is
    the exact inverse of the Poisson approximation ``P(i in top k) = 1 - exp(-w_i t)``
    of the race (``t`` cancels out). For ``k = 1`` the raw capacity is exact and is
    used as is. The same tuning is applied to zones, whose capacity is the sum of
    their nodes' capacities. With equal capacities all weights are equal, so the
    tuning changes nothing and adding a node moves exactly the slots it receives.

Determinism. ``u`` comes from BLAKE2b (not Python's salted `hash`), and ``ln`` is
computed by `_ln` from IEEE-754 basic operations only (`frexp`, ``+ - * /``), which
are correctly rounded everywhere, rather than the platform `math.log`. Keys that tie
are broken by the hash and then the name. Nodes are sorted by id before anything
else, so file order never matters.

Errors: the constructor raises `ConfigError` for a layout that cannot be built
(rf < 1, fewer nodes than rf, duplicate ids, capacity <= 0, write quorum out of
range); `partition_of` and the per-hash methods raise `InvalidHash` for a hash that
is not 32 bytes; per-node lookups raise `ConfigError` for an unknown node id.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence

from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.errors import ConfigError, InvalidHash, UnknownNode

__all__ = ["HASH_LEN", "PARTITION_COUNT", "Layout", "LiveLayout", "layout_of", "partition_of"]

PARTITION_COUNT = 256
HASH_LEN = 32  # a block hash: the first 32 bytes of BLAKE2b-512 (see blocknode.fastpath)

_HASH_DOMAIN = b"blocknode-layout-v1\x00"
_LN2 = 0.6931471805599453094  # ln(2), rounded to the nearest double


@functools.lru_cache(maxsize=32)
def layout_of(config: ClusterConfig) -> Layout:
    """The `Layout` of `config`, shared: a `Layout` is immutable and costs 256 races to
    build (~50 ms), and every node start and every gossiped version builds the same few
    (the simulation starts thousands of nodes from one cluster file). Raises like `Layout`
    (errors are not cached)."""
    return Layout(config)


def partition_of(hash: bytes) -> int:
    """The partition (0..255) of a 32-byte block hash: its first byte."""
    if len(hash) != HASH_LEN:
        raise InvalidHash(f"a block hash is {HASH_LEN} bytes, got {len(hash)}")
    return hash[0]


def _ln(x: float) -> float:
    """Natural log of ``x > 0`` from correctly-rounded IEEE operations only.

    ``x = m * 2**e`` with ``m`` in [0.5, 1); ``ln(m) = 2 atanh(s)``, ``s = (m-1)/(m+1)``
    in [-1/3, 0), whose series converges to double precision in 20 terms. Same bits
    on every IEEE-754 platform, unlike `math.log`, which is left to the C library.
    """
    if x == 1.0:
        return 0.0
    m, e = math.frexp(x)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    term = s
    total = 0.0
    for n in range(1, 42, 2):
        total += term / n
        term *= s2
    return e * _LN2 + 2.0 * total


def _race_key(partition: int, kind: bytes, name: str) -> tuple[float, int]:
    """``(-ln(u), raw)`` for this partition and name: ``u`` uniform in (0, 1] from BLAKE2b.

    ``raw`` (the 64-bit hash value) breaks exact ties deterministically.
    """
    h = hashlib.blake2b(
        _HASH_DOMAIN + kind + bytes([partition]) + name.encode("utf-8"), digest_size=8
    )
    raw = int.from_bytes(h.digest(), "big")
    u = (raw + 1) / 2.0**64  # in (0, 1]
    return max(0.0, -_ln(u)), raw


def _tuned_weights(capacities: Sequence[int], k: int) -> list[float]:
    """Race weights so that each entry is among the top `k` in proportion to its capacity.

    Water-fills target probabilities ``p_i = k' * c_i / C'`` (entries that would pass
    1 are fixed at 1 and the rest share what remains), then maps them through
    ``-ln(1 - p)``; ``p = 1`` gives an infinite weight (always picked). For ``k = 1``
    the capacities themselves are exact. Requires ``0 < k <= len(capacities)``.
    """
    if k == 1:
        return [float(c) for c in capacities]
    n = len(capacities)
    full: set[int] = set()
    while True:
        rest = [i for i in range(n) if i not in full]
        left = k - len(full)
        total = sum(capacities[i] for i in rest)
        p = {i: left * capacities[i] / total for i in rest}
        over = {i for i in rest if p[i] >= 1.0}
        if not over:
            break
        full |= over
        if len(full) >= k:
            break
    weights = []
    for i in range(n):
        if i in full:
            weights.append(math.inf)
        else:
            weights.append(-_ln(1.0 - p[i]))
    return weights


def _race(partition: int, kind: bytes, names: Sequence[str], weights: Sequence[float]) -> list[int]:
    """Indexes of `names` ordered by their race key for `partition`, winner first."""
    keyed = []
    for i, (name, w) in enumerate(zip(names, weights, strict=True)):
        e, raw = _race_key(partition, kind, name)
        keyed.append((0.0 if w == math.inf else e / w, raw, name, i))
    keyed.sort()
    return [i for *_, i in keyed]


class Layout:
    """The partition → nodes map of a cluster, computed from its `ClusterConfig`.

    Build it once per cluster file (the work is 256 small races; it is cheap but not
    free) and share it; it is immutable.
    """

    def __init__(self, config: ClusterConfig) -> None:
        """Validate `config` and compute every partition's nodes.

        Raises `ConfigError` naming the problem when the layout cannot be built.
        """
        rf = config.replication_factor
        if not isinstance(rf, int) or isinstance(rf, bool) or rf < 1:
            raise ConfigError(f"replication_factor must be an integer >= 1, got {rf!r}")
        seen: set[str] = set()
        dups: set[str] = set()
        for n in config.nodes:
            if n.id in seen:
                dups.add(n.id)
            seen.add(n.id)
        if dups:
            raise ConfigError(f"duplicate node ids in cluster file: {', '.join(sorted(dups))}")
        for n in config.nodes:
            if not isinstance(n.capacity, int) or isinstance(n.capacity, bool) or n.capacity <= 0:
                raise ConfigError(
                    f"node {n.id!r}: capacity must be an integer > 0, got {n.capacity!r}"
                )
        if len(config.nodes) < rf:
            raise ConfigError(
                f"cluster has {len(config.nodes)} node(s) but replication_factor is {rf}: "
                f"need at least {rf} nodes"
            )
        wq = config.write_quorum if config.write_quorum is not None else rf // 2 + 1
        if not isinstance(wq, int) or isinstance(wq, bool) or not 1 <= wq <= rf:
            raise ConfigError(
                f"write_quorum must be between 1 and replication_factor ({rf}), got {wq!r}"
            )

        self._rf = rf
        self._write_quorum = wq
        self._nodes: dict[str, ClusterNode] = {
            n.id: n for n in sorted(config.nodes, key=lambda n: n.id)
        }
        zones: dict[str, list[ClusterNode]] = {}
        for n in self._nodes.values():
            zones.setdefault(n.zone, []).append(n)
        self._zones = dict(sorted(zones.items()))
        self._zone_w = self._zone_weights()
        self._node_w: dict[tuple[str, int], list[float]] = {}  # (zone, slots) -> weights
        self._partitions: tuple[tuple[str, ...], ...] = tuple(
            self._assign(p) for p in range(PARTITION_COUNT)
        )
        by_node: dict[str, list[int]] = {nid: [] for nid in self._nodes}
        for p, ids in enumerate(self._partitions):
            for nid in ids:
                by_node[nid].append(p)
        self._by_node = by_node

    # -- construction --------------------------------------------------------------

    def _zone_weights(self) -> list[float]:
        """Zone race weights, tuned for the slots the zone race decides."""
        caps = [sum(n.capacity for n in ns) for ns in self._zones.values()]
        z = len(caps)
        contested = self._rf if z >= self._rf else self._rf % z
        # With fewer zones than rf every zone gets rf // z slots; the race only decides
        # who gets the rf % z extra ones (none when it divides evenly).
        return _tuned_weights(caps, contested) if contested else [1.0] * z

    def _assign(self, p: int) -> tuple[str, ...]:
        """The nodes of partition `p`, in the order they were picked."""
        zone_names = list(self._zones)
        order = [zone_names[i] for i in _race(p, b"z", zone_names, self._zone_w)]
        # Deal slots round-robin over the zone ranking, skipping exhausted zones.
        slots = dict.fromkeys(order, 0)
        left = self._rf
        while left:
            for zone in order:
                if left and slots[zone] < len(self._zones[zone]):
                    slots[zone] += 1
                    left -= 1
        picked: list[str] = []
        for zone in order:
            k = slots[zone]
            if not k:
                continue
            members = self._zones[zone]
            key = (zone, k)
            if key not in self._node_w:
                self._node_w[key] = _tuned_weights([n.capacity for n in members], k)
            ids = [n.id for n in members]
            ranked = _race(p, b"n", ids, self._node_w[key])
            picked.extend(ids[i] for i in ranked[:k])
        return tuple(picked)

    # -- queries -------------------------------------------------------------------

    @property
    def replication_factor(self) -> int:
        """How many nodes hold each partition."""
        return self._rf

    @property
    def write_quorum(self) -> int:
        """How many of a partition's nodes must acknowledge a write: configured or rf // 2 + 1."""
        return self._write_quorum

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Every node id of the cluster, sorted."""
        return tuple(self._nodes)

    @property
    def zones(self) -> tuple[str, ...]:
        """Every zone of the cluster, sorted."""
        return tuple(self._zones)

    def node(self, node_id: str) -> ClusterNode:
        """The cluster node with this id; `UnknownNode` (a `ConfigError`) if there is none."""
        try:
            return self._nodes[node_id]
        except KeyError:
            raise UnknownNode(node_id) from None

    def partition_nodes(self, partition: int) -> tuple[str, ...]:
        """The `replication_factor` distinct nodes of a partition (0..255)."""
        if not 0 <= partition < PARTITION_COUNT:
            raise ValueError(f"partition must be in 0..{PARTITION_COUNT - 1}, got {partition}")
        return self._partitions[partition]

    def nodes_of(self, hash: bytes) -> tuple[str, ...]:
        """The nodes that hold the block `hash` (its partition's nodes)."""
        return self._partitions[partition_of(hash)]

    def write_nodes(self, hash: bytes) -> tuple[str, ...]:
        """The nodes a write of block `hash` goes to; `write_quorum` of them must succeed."""
        return self.nodes_of(hash)

    def read_nodes(
        self,
        hash: bytes,
        local_id: str | None,
        *,
        is_up: Callable[[str], bool] | None = None,
        latency: Callable[[str], float | None] | None = None,
        local_zone: str | None = None,
    ) -> list[str]:
        """The nodes of block `hash` in the order a reader should try them.

        The local node first (if it holds the partition), then live nodes in the
        local zone, then the other live nodes by measured latency (unknown latency
        last), then nodes `is_up` says are down (still listed, so a caller may try
        them when nothing else answers). Ties keep the partition order.
        `local_zone` defaults to the zone of `local_id` when it is a cluster node.
        """
        nodes = self.nodes_of(hash)
        if local_zone is None and local_id is not None and local_id in self._nodes:
            local_zone = self._nodes[local_id].zone

        def rank(item: tuple[int, str]) -> tuple[int, int, float, int]:
            pos, nid = item
            if nid == local_id:
                return (0, 0, 0.0, pos)
            if is_up is not None and not is_up(nid):
                return (3, 0, 0.0, pos)
            lat = latency(nid) if latency is not None else None
            lat_key = (0, lat) if lat is not None else (1, 0.0)
            group = 1 if local_zone is not None and self._nodes[nid].zone == local_zone else 2
            return (group, *lat_key, pos)

        return [nid for _, nid in sorted(enumerate(nodes), key=rank)]

    def partitions_of_node(self, node_id: str) -> list[int]:
        """The partitions `node_id` holds, ascending; `ConfigError` for an unknown node."""
        self.node(node_id)
        return list(self._by_node[node_id])

    def summary(self) -> dict:
        """A plain-data overview for the status command.

        Keys: ``nodes`` (count), ``replication_factor``, ``write_quorum``,
        ``partitions`` (256), ``zones`` (zone → node ids), ``partitions_per_node``
        (node id → count), ``partitions_per_zone`` (zone → partition slots).
        """
        per_zone: dict[str, int] = dict.fromkeys(self._zones, 0)
        for nid, parts in self._by_node.items():
            per_zone[self._nodes[nid].zone] += len(parts)
        return {
            "nodes": len(self._nodes),
            "replication_factor": self._rf,
            "write_quorum": self._write_quorum,
            "partitions": PARTITION_COUNT,
            "zones": {z: [n.id for n in ns] for z, ns in self._zones.items()},
            "partitions_per_node": {nid: len(ps) for nid, ps in self._by_node.items()},
            "partitions_per_zone": per_zone,
        }

    def moved_slots(self, other: Layout) -> int:
        """How many (partition, node) slots of `other` this layout does not have.

        The data that must move when the cluster goes from `other` to this layout.
        """
        return sum(
            len(set(mine) - set(theirs))
            for mine, theirs in zip(self._partitions, other._partitions, strict=True)
        )

    def __repr__(self) -> str:
        return (
            f"Layout(nodes={len(self._nodes)}, zones={len(self._zones)}, "
            f"rf={self._rf}, write_quorum={self._write_quorum})"
        )


class LiveLayout:
    """The layout versions live on this node: one normally, several during a migration.

    Mutable in place (`update`), so the manager, the workers and the admin handlers
    share one object and see a new version at once. While an old and a new version
    are live (`blocknode.layout_state`), a write must reach the write quorum of
    *every* live version (`write_sets`), its targets are the union of their nodes
    (`write_nodes`), a reader asks the new version's synced nodes first, then the
    old version's nodes, then the rest (`read_nodes`), and a node deciding whether a
    block is garbage asks every node of every live version (`write_nodes`).

    Queries about a node that no live version lists (a node waiting to be
    assigned, or one that left) answer "nothing" rather than raising, except `node`.
    """

    def __init__(self, layouts: Sequence[tuple[int, Layout]],
                 synced: Callable[[str], int] | None = None) -> None:
        self._layouts: list[tuple[int, Layout]] = []
        self._synced: Callable[[str], int] = synced or (lambda nid: 0)
        self.update(layouts)

    @classmethod
    def single(cls, layout: Layout, version: int = 1) -> LiveLayout:
        """One live version (tests, single-layout callers)."""
        return cls([(version, layout)])

    def update(self, layouts: Sequence[tuple[int, Layout]],
               synced: Callable[[str], int] | None = None) -> None:
        """Replace the live versions (oldest first); `synced(node)`: the version it synced."""
        if not layouts:
            raise ValueError("a live layout needs at least one version")
        self._layouts = sorted(layouts, key=lambda vl: vl[0])
        if synced is not None:
            self._synced = synced

    # -- versions ------------------------------------------------------------------

    @property
    def current(self) -> Layout:
        """The newest live version's layout."""
        return self._layouts[-1][1]

    @property
    def version(self) -> int:
        """The newest live version number."""
        return self._layouts[-1][0]

    @property
    def versions(self) -> list[int]:
        """The live version numbers, oldest first."""
        return [v for v, _ in self._layouts]

    @property
    def layouts(self) -> list[tuple[int, Layout]]:
        """(version, layout) of every live version, oldest first."""
        return list(self._layouts)

    @property
    def migrating(self) -> bool:
        """More than one version is live."""
        return len(self._layouts) > 1

    # -- the `Layout` queries, over every live version --------------------------------

    @property
    def replication_factor(self) -> int:
        return self.current.replication_factor

    @property
    def write_quorum(self) -> int:
        """The newest version's write quorum (each version's own in `write_sets`)."""
        return self.current.write_quorum

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Every node of any live version, sorted."""
        return tuple(sorted({n for _, lay in self._layouts for n in lay.node_ids}))

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(sorted({z for _, lay in self._layouts for z in lay.zones}))

    def has_node(self, node_id: str) -> bool:
        return any(node_id in lay.node_ids for _, lay in self._layouts)

    def node(self, node_id: str) -> ClusterNode:
        """The node as the newest version listing it has it; `UnknownNode` if none does."""
        for _, lay in reversed(self._layouts):
            if node_id in lay.node_ids:
                return lay.node(node_id)
        raise UnknownNode(node_id)

    def write_sets(self, hash: bytes) -> list[tuple[tuple[str, ...], int]]:
        """Per live version (newest first, duplicates merged): its nodes and write quorum."""
        out: list[tuple[tuple[str, ...], int]] = []
        for _, lay in reversed(self._layouts):
            entry = (lay.nodes_of(hash), lay.write_quorum)
            if entry not in out:
                out.append(entry)
        return out

    def nodes_of(self, hash: bytes) -> tuple[str, ...]:
        """Every node of any live version that holds `hash`'s partition (newest first)."""
        return tuple(dict.fromkeys(n for _, lay in reversed(self._layouts)
                                   for n in lay.nodes_of(hash)))

    def write_nodes(self, hash: bytes) -> tuple[str, ...]:
        """The union of every live version's nodes of `hash` (a write goes to all of them)."""
        return self.nodes_of(hash)

    def partition_nodes(self, partition: int) -> tuple[str, ...]:
        """The union of every live version's nodes of `partition` (newest first)."""
        return tuple(dict.fromkeys(n for _, lay in reversed(self._layouts)
                                   for n in lay.partition_nodes(partition)))

    def partitions_of_node(self, node_id: str) -> list[int]:
        """The partitions `node_id` holds in any live version (empty when it holds none)."""
        parts: set[int] = set()
        for _, lay in self._layouts:
            if node_id in lay.node_ids:
                parts.update(lay.partitions_of_node(node_id))
        return sorted(parts)

    def read_nodes(self, hash: bytes, local_id: str | None, *,
                   is_up: Callable[[str], bool] | None = None,
                   latency: Callable[[str], float | None] | None = None,
                   local_zone: str | None = None) -> list[str]:
        """The order a reader asks the nodes of `hash` in.

        One live version: `Layout.read_nodes`. During a migration: the newest
        version's nodes that finished syncing to it, then the older versions' nodes
        (which hold everything written before the change), then the newest
        version's nodes still syncing; each group in `Layout.read_nodes` order.
        """
        kw = {"is_up": is_up, "latency": latency, "local_zone": local_zone}
        if len(self._layouts) == 1:
            return self.current.read_nodes(hash, local_id, **kw)
        newest_v, newest = self._layouts[-1]
        first = newest.read_nodes(hash, local_id, **kw)
        synced = [n for n in first if self._synced(n) >= newest_v]
        order = list(synced)
        for _, lay in reversed(self._layouts[:-1]):
            order += [n for n in lay.read_nodes(hash, local_id, **kw) if n not in order]
        order += [n for n in first if n not in order]
        return order

    def summary(self) -> dict:
        """The newest version's `Layout.summary`, plus ``version`` and ``live_versions``."""
        return {**self.current.summary(), "version": self.version, "live_versions": self.versions}

    def __repr__(self) -> str:
        return f"LiveLayout(versions={self.versions}, current={self.current!r})"
