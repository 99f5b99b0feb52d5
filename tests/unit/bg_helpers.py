"""In-process clusters for the background-worker unit tests: no sockets, a fake clock.

`FakeCluster` builds, per node, the real BlockFiles / MetadataStore / LocalBlocks /
BlockManager, and a `FakeNet` that dispatches calls straight to the other
nodes' handlers (errors cross it the way they cross the real RPC layer:
through `error_reply` / `remote_error`). A node in `cluster.down` is
unreachable. Every node shares one `FakeClock` (persisted-time milliseconds).
"""

from __future__ import annotations

import os
from typing import Any

import trio

from blocknode.block import VerifiedBlock, hashed
from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.context import NodeContext
from blocknode.errors import NodeUnreachable, QuorumError
from blocknode.layout import Layout
from blocknode.manager import BlockManager
from blocknode.rpc.errors import error_reply, remote_error
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore
from tests.fakes import FakeClock


class FakeNet:
    """`call` / `call_many` / `is_up` / `latency` over the cluster's handler tables."""

    def __init__(self, cluster: FakeCluster, node_id: str) -> None:
        self.cluster = cluster
        self.node_id = node_id

    async def call(self, node_id: str, kind: str, fields: dict[str, Any], data: bytes | None = None,
                   *, timeout: float, priority: int = 1) -> tuple[dict[str, Any], bytes | None]:
        if node_id in self.cluster.down and node_id != self.node_id:
            raise NodeUnreachable(f"node {node_id} is down")
        handler = self.cluster.handlers[node_id][kind]
        try:
            with trio.fail_after(timeout):
                return await handler(self.node_id, fields, data)
        except trio.TooSlowError:
            raise
        except Exception as exc:  # noqa: BLE001 - cross the "wire" like the real layer
            raise remote_error(node_id, error_reply(exc, peer=self.node_id, kind=kind)) from exc

    async def call_many(self, node_ids: list[str], kind: str, fields: dict[str, Any],
                        data: bytes | None = None, *, quorum: int, timeout: float,
                        interrupt_after_quorum: bool = True, priority: int = 1,
                        ) -> list[tuple[str, Any]]:
        ok: list[tuple[str, Any]] = []
        failed: dict[str, str] = {}

        async def one(nid: str) -> None:
            try:
                ok.append((nid, await self.call(nid, kind, fields, data, timeout=timeout)))
            except Exception as exc:  # noqa: BLE001
                failed[nid] = f"{type(exc).__name__}: {exc}"

        async with trio.open_nursery() as nursery:
            for nid in dict.fromkeys(node_ids):
                nursery.start_soon(one, nid)
        if len(ok) < quorum:
            raise QuorumError(kind, quorum, len(ok), failed)
        return ok

    def is_up(self, node_id: str) -> bool:
        return node_id not in self.cluster.down

    def latency(self, node_id: str) -> float | None:
        return 0.0


class FakeNode:
    """The components of one node."""

    def __init__(self, cluster: FakeCluster, node_id: str, root: str) -> None:
        self.node_id = node_id
        self.root = root
        self.ctx = NodeContext(now_ms=cluster.clock)
        self.files = BlockFiles(os.path.join(root, "data"), fsync=False)
        self.meta = MetadataStore(os.path.join(root, "meta"), map_size=1 << 26, sync=False,
                                  gc_delay_ms=cluster.gc_delay_ms, incref_resync_delay_ms=60_000,
                                  ctx=self.ctx)
        self.blocks = LocalBlocks(self.files, self.meta, cluster.inline_threshold)
        self.net = FakeNet(cluster, node_id)
        self.manager = BlockManager(node_id=node_id, layout=cluster.layout, net=self.net,
                                    blocks=self.blocks, meta=self.meta, rpc_timeout=5.0,
                                    hedge_delay=0.05)
        self.handlers = cluster.handlers[node_id] = dict(self.manager.handlers())

    def register(self, kind: str, handler: Any) -> None:
        """Serve `kind` on this node (like `Node.register`)."""
        self.handlers[kind] = handler


class FakeCluster:
    """`n` nodes, replication `rf`, sharing a fake clock (see module docstring)."""

    def __init__(self, root: str, n: int = 3, rf: int = 3, *, gc_delay_ms: int = 600_000,
                 inline_threshold: int = 0, clock: FakeClock | None = None,
                 write_quorum: int | None = None) -> None:
        self.clock = clock or FakeClock()
        self.gc_delay_ms = gc_delay_ms
        self.inline_threshold = inline_threshold
        ids = [f"n{i}" for i in range(1, n + 1)]
        self.layout = Layout(ClusterConfig(
            nodes=tuple(ClusterNode(id=i, addr=f"127.0.0.1:{9000 + k}") for k, i in enumerate(ids)),
            replication_factor=rf, write_quorum=write_quorum))
        self.handlers: dict[str, dict[str, Any]] = {}
        self.down: set[str] = set()
        self.nodes = {i: FakeNode(self, i, os.path.join(root, i)) for i in ids}

    def __getitem__(self, node_id: str) -> FakeNode:
        return self.nodes[node_id]

    def close(self) -> None:
        for n in self.nodes.values():
            n.meta.close()


def block(n: int = 1000, seed: bytes | None = None) -> tuple[bytes, VerifiedBlock]:
    """A random block of `n` bytes: its hash and its (verified) bytes."""
    blk = hashed((seed or b"") + os.urandom(max(0, n - len(seed or b""))))
    return blk.hash, blk
