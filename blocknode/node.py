"""A node: everything one `python -m blocknode serve` process runs, built from its config.

```
Node.run
└── nursery
    ├── metadata writer (group commit)
    ├── RPC network: listener, one task per connection, one per request
    └── background workers (resync, scrub, anti-entropy), each supervised here
```

Cancelling `run` (SIGINT/SIGTERM in `serve`) stops everything between steps;
nothing half-written stays visible (block files are renamed into place only when
complete, LMDB commits are atomic, stray `.tmp` files are swept at start).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from blocknode import __version__, fastpath
from blocknode.clock import wall_ms
from blocknode.config import NodeConfig, cluster_of, load_or_create_secret
from blocknode.context import NodeContext
from blocknode.errors import ConfigError, RemoteProtocolError
from blocknode.layout import Layout
from blocknode.manager import BlockManager, Handler, Reply
from blocknode.protocol import STATUS, max_message_size
from blocknode.rpc.network import ConnectionLimits, RpcNetwork
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore
from blocknode.workers import install_workers

Worker = Callable[..., Awaitable[None]]

BLOCK_REPLY_KINDS = frozenset({"get_block", "client_get"})
"""Request kinds whose reply carries a block (the rest answer with a head only)."""


class Node:
    """One blocknode node (see module docstring).

    `now_ms` (persisted-time clock) and `connect` (how to open a stream to a
    peer address) are injectable for tests and simulation.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        now_ms: Callable[[], int] = wall_ms,
        connect: Callable[[str], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.cluster = cluster_of(cfg)
        self.layout = Layout(self.cluster)
        self.secret = load_or_create_secret(cfg, create=True)
        self.ctx = NodeContext(now_ms=now_ms)
        self.files = BlockFiles(cfg.data_dir, fsync=cfg.data_fsync, run_sync=self.ctx.run_sync)
        self.meta = MetadataStore(
            cfg.metadata_dir,
            map_size=cfg.lmdb_map_size,
            max_readers=cfg.lmdb_max_readers,
            sync=cfg.metadata_fsync,
            gc_delay_ms=int(cfg.gc_delay * 1000),
            incref_resync_delay_ms=int(2 * cfg.rpc_timeout * 1000),
            ctx=self.ctx,
        )
        self.blocks = LocalBlocks(self.files, self.meta, cfg.inline_threshold)
        peers = {n.id: n.addr for n in self.cluster.nodes if n.id != cfg.node_id}
        self.net = RpcNetwork(
            cfg.node_id,
            self.secret,
            peers,
            self.dispatch,
            connect=connect,
            # block_ram_buffer_max bounds block bytes in RAM, a quarter each for: payloads
            # this node sends, client requests it is handling, messages being received,
            # replies waiting to be sent.
            ram_buffer_max=max(1, cfg.block_ram_buffer_max // 4),
            client_buffer_max=max(1, cfg.block_ram_buffer_max // 4),
            receive_buffer_max=max(1, cfg.block_ram_buffer_max // 4),
            reply_buffer_max=max(1, cfg.block_ram_buffer_max // 4),
            reply_size=lambda kind: cfg.block_size if kind in BLOCK_REPLY_KINDS else 0,
            connect_timeout=cfg.connect_timeout,
            handshake_timeout=cfg.rpc_handshake_timeout,
            max_message_size=max_message_size(cfg.block_size),
            limits=ConnectionLimits(
                max_connections=cfg.rpc_max_connections,
                max_per_addr=cfg.rpc_max_connections_per_addr,
                max_handshakes=cfg.rpc_max_handshakes,
                idle_timeout=cfg.rpc_idle_timeout,
                stall_timeout=cfg.rpc_timeout,
            ),
        )
        self.manager = BlockManager(
            node_id=cfg.node_id,
            layout=self.layout,
            net=self.net,
            blocks=self.blocks,
            meta=self.meta,
            rpc_timeout=cfg.rpc_timeout,
            hedge_delay=cfg.hedge_delay,
            block_size=cfg.block_size,
            run_sync=self.ctx.run_sync,
            max_clock_skew_ms=max(1, int(cfg.max_clock_skew * 1000)),
        )
        self._handlers: dict[str, Handler] = dict(self.manager.handlers())
        self._handlers[STATUS] = self.handle_status
        self._workers: list[tuple[str, Worker]] = []
        self.addr: str | None = None
        install_workers(self)

    # ---- extension points for the background workers and admin calls ----

    def register(self, kind: str, handler: Handler) -> None:
        """Serve RPC messages of `kind` with `handler`."""
        if kind in self._handlers:
            raise ValueError(f"handler for {kind!r} already registered")
        self._handlers[kind] = handler

    def add_worker(self, name: str, worker: Worker) -> None:
        """Run `worker()` under the node's nursery for the node's whole life."""
        self._workers.append((name, worker))

    async def dispatch(self, peer: str, kind: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Route one request to its handler."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise RemoteProtocolError(f"unknown request kind {kind!r}")
        return await handler(peer, fields, data)

    # ---- life cycle ----

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the node; `task_status.started(addr)` once it really listens."""
        await trio.to_thread.run_sync(self._startup_sweep)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.meta.run_writer)
                try:
                    self.addr = await nursery.start(self.net.serve, self.cfg.rpc_bind_addr)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen on {self.cfg.rpc_bind_addr} (rpc_bind_addr in "
                        f"{self.cfg.source}): {exc.strerror or exc}"
                    ) from None
                for _name, worker in self._workers:
                    nursery.start_soon(worker)
                task_status.started(self.addr)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.meta.close)

    def _startup_sweep(self) -> None:
        self.blocks.startup()

    # ---- status ----

    def status(self) -> dict[str, Any]:
        """The node's state as the `status` command shows it (JSON keys are a contract)."""
        counts = self.meta.counts()
        return {
            "node_id": self.node_id,
            "version": __version__,
            "fast_path": fastpath.IMPLEMENTATION,
            "addr": self.addr or self.cfg.public_addr,
            "zone": self.layout.node(self.node_id).zone,
            "layout": self.layout.summary(),
            "peers": [
                {**p, "addr": p["addr"] or (self.addr or self.cfg.public_addr)}
                for p in self.net.peer_status()
            ],
            "blocks": self.blocks.count(),
            "inline_blocks": counts["inline_blocks"],
            "rc_entries": counts["rc_entries"],
            "refs": counts["refs"],
            "resync_queue": counts["resync_queue"],
            "errors": counts["errors"],
            "connections": self.net.connection_status(),
        }

    async def handle_status(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """RPC: this node's status."""
        return self.status(), None
