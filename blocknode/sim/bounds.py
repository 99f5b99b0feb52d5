"""The memory budget of a simulated node: its bounded structures, read from outside.

`node_bounds(node)` lists ``(name, value, bound)`` for every structure of a running
`Node` that must stay bounded whatever its peers and clients do: the RPC byte
budgets (send, client, reply; the two receive budgets), the incoming connections
and the handshakes under way (against the connection limits), the resync worker's
in-progress set (against the most workers it can have), the metadata writer's queue and the
per-peer tables (against the cluster size). The simulation samples it
periodically (`blocknode.sim.run.Sim.sample_bounds`): a value above its bound is
a violation. Reads only (attributes and statistics; no lock, no I/O).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocknode.workers.resync import MAX_WORKERS as RESYNC_MAX_WORKERS

if TYPE_CHECKING:
    from blocknode.node import Node

__all__ = ["WRITER_QUEUE_BOUND", "node_bounds"]

WRITER_QUEUE_BOUND = 4096
"""Submissions waiting for the metadata writer (its channel is unbounded by design: every
caller waits for its own commit, so it holds at most one entry per waiting task; in a
simulation with a few dozen client operations more than this is a leak)."""


def node_bounds(node: Node, cluster_size: int) -> list[tuple[str, int, int]]:
    """``(name, value, bound)`` of each bounded structure of `node`."""
    net = node.net
    out: list[tuple[str, int, int]] = []
    for name in ("budget", "client_budget", "reply_budget"):
        b = getattr(net, name)
        out.append((f"rpc.{name}.used", b.used, b.max_bytes))
    for name in ("receive_budget", "client_receive_budget"):
        b = getattr(net, name)
        out.append((f"rpc.{name}.committed", b.committed, b.max_bytes))
    out.append(("rpc.incoming_connections", net.incoming_connections,
                net.max_connections + net.max_node_connections))
    out.append(("rpc.handshaking", len(net._handshaking), net.limits.max_handshakes))
    out.append(("rpc.peers", len(net._peers), cluster_size))
    resync = node.resync
    out.append(("resync.in_progress", len(resync._in_progress), RESYNC_MAX_WORKERS))
    recv = node.meta.env._recv
    out.append(("meta.writer_queue", recv.statistics().current_buffer_used, WRITER_QUEUE_BOUND))
    out.append(("layout.peer_views", len(node.layouts.peer_views), cluster_size))
    return out
