"""The cluster file: which nodes exist, where, in which zone, with what capacity.

One TOML file shared by every node of a cluster::

    replication_factor = 3
    # write_quorum = 2          # optional, default rf // 2 + 1

    [[nodes]]
    id = "node1"
    addr = "127.0.0.1:3901"
    zone = "dc1"                # optional, default "default"
    capacity = 100              # optional, relative weight, default 1

Loading and validation live in `blocknode.config` (`load_cluster_file`); this
module only holds the parsed shape, so `layout` can depend on it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from blocknode.errors import UnknownNode

__all__ = ["DEFAULT_REPLICATION_FACTOR", "ClusterConfig", "ClusterNode"]

DEFAULT_REPLICATION_FACTOR: Final = 1
"""Copies of each block when neither the cluster file nor the node config says."""


@dataclass(frozen=True)
class ClusterNode:
    """One node of the cluster as the cluster file lists it."""

    id: str
    addr: str  # "host:port" other nodes connect to
    zone: str = "default"
    capacity: int = 1


@dataclass(frozen=True)
class ClusterConfig:
    """The parsed cluster file."""

    nodes: tuple[ClusterNode, ...]
    replication_factor: int = DEFAULT_REPLICATION_FACTOR
    write_quorum: int | None = None

    def node(self, node_id: str) -> ClusterNode:
        """The node with this id; `UnknownNode` (a `ConfigError` and a `KeyError`) if none."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise UnknownNode(node_id)
