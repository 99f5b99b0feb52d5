"""A node: everything one `python -m blocknode serve` process runs, built from its config.

```
Node.run
└── nursery
    ├── metadata writer (group commit)
    ├── RPC network: listener, one task per connection, one per request
    └── background workers (`node.workers`, a `WorkerRegistry`): resync, scrub,
        repair, anti-entropy, each step under its worker's supervisor
```

The node builds every part explicitly from its config and one `NodeContext`
(clock, randomness, blocking calls): storage, network, block manager, the
workers (`node.resync`, `node.scrub`, `node.repair`, `node.anti_entropy`,
registered in `node.workers`) and the admin handlers (`blocknode.admin`). A
worker failure never ends the node; only cancellation, or a failure of its
foundations (`foundations_problem`: the data dir gone, the metadata
unreadable), does, with a last log line saying which.

Cancelling `run` (SIGINT/SIGTERM in `serve`) stops everything between steps;
nothing half-written stays visible (block files are renamed into place only when
complete, LMDB commits are atomic, stray `.tmp` files are swept at start).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from blocknode import __version__, auth, fastpath
from blocknode.admin import Admin
from blocknode.bootstrap import Bootstrap
from blocknode.clock import wall_ms
from blocknode.config import NodeConfig, cluster_of, load_or_create_secret
from blocknode.context import NodeContext
from blocknode.direct import DirectHandlers
from blocknode.errors import ConfigError, RemoteProtocolError
from blocknode.group_commit import GroupCommit
from blocknode.keys import KeyService
from blocknode.layout_service import LayoutService, NotJoined
from blocknode.manager import BlockManager, Handler, Reply
from blocknode.metrics import NodeMetrics, serve_admin_http
from blocknode.protocol import ADMIN_REBALANCE, STATUS, max_message_size
from blocknode.rpc.handshake import Peer
from blocknode.rpc.network import ConnectionLimits, RpcNetwork
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore
from blocknode.workers.anti_entropy import AntiEntropy
from blocknode.workers.base import WorkerRegistry
from blocknode.workers.layout_sync import LayoutSync
from blocknode.workers.rebalance import Rebalance
from blocknode.workers.repair import Repair
from blocknode.workers.resync import Resync
from blocknode.workers.scrub import Scrub

log = logging.getLogger(__name__)

BLOCK_REPLY_KINDS = frozenset({"get_block", "client_get", "client_get_direct"})
"""Request kinds whose reply carries a block (the rest answer with a head only)."""

VIEW_KINDS = frozenset({"put_block", "client_put_direct"})
"""Request kinds whose handler takes its data as a `memoryview` of the receive buffer
(the rest get `bytes`): a 1 MiB block is hashed and written from where it was decrypted."""


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
        ctx: NodeContext | None = None,
        listener: trio.abc.Listener[trio.abc.Stream] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.cluster = cluster_of(cfg, member=False)
        self.secret = load_or_create_secret(cfg, create=True)
        # `ctx` (the simulation): every seam from it; `listener`: serve it instead of TCP.
        self.ctx = ctx if ctx is not None else NodeContext(now_ms=now_ms)
        if ctx is not None and connect is None:
            connect = ctx.connect
        self._listener = listener
        self.files = BlockFiles(cfg.data_dirs, fsync=cfg.data_fsync, run_sync=self.ctx.run_sync,
                                block_size=cfg.block_size, fs=self.ctx.fs)
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
        # The layout: stored in the metadata, seeded from the cluster file (version 1).
        # A node with bootstrap_peers that its cluster file does not list (or that has none)
        # seeds nothing: its own version 1 would clash with the cluster's. It fetches the
        # cluster's layout instead (`blocknode.bootstrap`).
        listed = bool(cfg.cluster_file) and any(n.id == cfg.node_id for n in self.cluster.nodes)
        joining = bool(cfg.bootstrap_peers) and not listed
        self.layouts = LayoutService(cfg.node_id, self.meta, None if joining else self.cluster,
                                     now_ms=self.ctx.now_ms, rpc_timeout=cfg.rpc_timeout,
                                     rng=self.ctx.random, addr=cfg.public_addr, zone=cfg.zone)
        self.layout = self.layouts.live
        all_nodes = self.layouts.peers()
        peers = {nid: addr for nid, addr in all_nodes.items() if nid != cfg.node_id}
        members = sorted({cfg.node_id, *all_nodes})
        self.keys = KeyService(cfg.node_id, self.meta.keys, members, now_ms=self.ctx.now_ms,
                               rpc_timeout=cfg.rpc_timeout, rng=self.ctx.random)
        self.net = RpcNetwork(
            cfg.node_id,
            self.secret,
            peers,
            self.dispatch,
            members=members,
            # Any node proving the cluster secret may connect, as in Garage: a new node joins
            # with only bootstrap_peers (it shows as known; it holds nothing until assigned).
            open_membership=True,
            lookup_key=self.keys.verifier,
            connect=connect,
            rng=self.ctx.urandom,
            jitter=self.ctx.random,
            # block_ram_buffer_max bounds block bytes in RAM, a quarter each for: payloads
            # this node sends, client requests it is handling, messages being received
            # (half from nodes, half from clients), replies waiting to be sent.
            ram_buffer_max=max(1, cfg.block_ram_buffer_max // 4),
            client_buffer_max=max(1, cfg.block_ram_buffer_max // 4),
            receive_buffer_max=max(1, cfg.block_ram_buffer_max // 8),
            client_receive_buffer_max=max(1, cfg.block_ram_buffer_max // 8),
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
            node_limits=ConnectionLimits(
                max_connections=cfg.rpc_max_node_connections,
                max_per_addr=cfg.rpc_max_node_connections,
                idle_timeout=cfg.rpc_idle_timeout,
                stall_timeout=cfg.rpc_timeout,
            ),
        )
        self.keys.attach(self.net)
        self.layouts.attach(self.net, self._peers_changed)
        self.bootstrap = Bootstrap(
            self.layouts, cfg.bootstrap_peers, self.secret, connect=connect,
            timeout=cfg.rpc_timeout, connect_timeout=cfg.connect_timeout,
            handshake_timeout=cfg.rpc_handshake_timeout,
            max_message_size=max_message_size(cfg.block_size), rng=self.ctx.random,
            urandom=self.ctx.urandom)
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
            compression_level=cfg.compression_level,
            max_clock_skew_ms=max(1, int(cfg.max_clock_skew * 1000)),
            zone=self.layout.node(cfg.node_id).zone if self.layout.has_node(cfg.node_id)
            else cfg.zone,
        )
        self.group_commit = GroupCommit(self.manager.put_many, rounds=cfg.group_commit_rounds)
        self.manager.put_batch = self.group_commit.put_many
        self.resync = Resync(self.manager, self.ctx, need_block_timeout=cfg.need_block_timeout,
                             workers=cfg.resync_workers, tranquility=cfg.resync_tranquility)
        self.scrub = Scrub(self.manager, self.ctx, tranquility=cfg.scrub_tranquility,
                           interval=cfg.scrub_interval)
        self.repair = Repair(self.meta, self.blocks, self.ctx)
        self.anti_entropy = AntiEntropy(self.manager, self.ctx, interval=cfg.anti_entropy_interval,
                                        rpc_timeout=cfg.rpc_timeout)
        self.rebalance = Rebalance(self.blocks, self.ctx)
        self.layout_sync = LayoutSync(self.layouts, self.manager, self.anti_entropy, self.ctx)
        self.workers = WorkerRegistry([self.resync, self.scrub, self.repair, self.anti_entropy,
                                       self.rebalance, self.layout_sync],
                                      health=self.foundations_problem)
        admin = Admin(node_id=cfg.node_id, layout=self.layout, net=self.net, meta=self.meta,
                      blocks=self.blocks, manager=self.manager, ctx=self.ctx,
                      workers=self.workers, resync=self.resync, scrub=self.scrub,
                      repair=self.repair, anti_entropy=self.anti_entropy)
        self.direct = DirectHandlers(self.manager, self.layouts)
        self._handlers: dict[str, Handler] = {}
        # Refused while the node has no layout (joining): it must store nothing.
        self._data_kinds = frozenset({*self.manager.handlers(), *self.direct.handlers(),
                                      *self.anti_entropy.handlers()})
        for handlers in (self.manager.handlers(), self.direct.handlers(),
                         self.anti_entropy.handlers(), admin.handlers(),
                         self.keys.handlers(), self.layouts.handlers(),
                         {STATUS: self.handle_status,
                          ADMIN_REBALANCE: self.rebalance.handle_admin}):
            for kind, handler in handlers.items():
                if kind in self._handlers:
                    raise ValueError(f"two handlers for {kind!r}")
                self._handlers[kind] = handler
        self.addr: str | None = None
        self.admin_addr: str | None = None  # the admin HTTP listener's address, once it listens
        self.started_monotonic = time.monotonic()
        self.metrics = NodeMetrics(self)
        self.manager.on_quorum_failures = self.metrics.count_quorum_failures

    async def dispatch(self, peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """Route one request to its handler, if `peer` may make it (`blocknode.auth`)."""
        handler = self._handlers.get(kind)
        if data is not None and not isinstance(data, bytes) and kind not in VIEW_KINDS:
            data = bytes(data)
        with self.metrics.request(from_node=peer.is_node, kind=kind, known=handler is not None,
                                  data=data) as replied:
            auth.authorize(peer, kind, self.keys.permissions)
            if handler is None:
                raise RemoteProtocolError(f"unknown request kind {kind!r}")
            if kind in self._data_kinds and not self.layouts.has_layout:
                raise NotJoined(f"node {self.node_id} has no layout yet: it is joining the "
                                "cluster via its bootstrap_peers (see its log)")
            reply = await handler(peer.id, fields, data)
            replied(reply[1])
            return reply

    dispatch.takes_views = True  # type: ignore[attr-defined]  # see RpcConnection._handle

    # ---- life cycle ----

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the node; `task_status.started(addr)` once it really listens."""
        await self.ctx.run_sync(self._startup_sweep)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.meta.run_writer)
                await nursery.start(self.group_commit.run)
                await self.keys.ensure_admin_key(
                    self.cfg.admin_key_path,
                    allow_world_readable=self.cfg.allow_world_readable_secrets)
                try:
                    if self._listener is not None:
                        await nursery.start(self.net.serve_listener, self._listener)
                        self.addr = self.cfg.public_addr
                    else:
                        self.addr = await nursery.start(self.net.serve, self.cfg.rpc_bind_addr)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen on {self.cfg.rpc_bind_addr} (rpc_bind_addr in "
                        f"{self.cfg.source}): {exc.strerror or exc}"
                    ) from None
                self.keys.announce_admin_key()
                await self._start_admin_api(nursery)
                nursery.start_soon(self.keys.run)
                nursery.start_soon(self.layouts.run)
                if not self.layouts.has_layout:
                    nursery.start_soon(self.bootstrap.run)
                nursery.start_soon(self.workers.run)
                task_status.started(self.addr)
        finally:
            with trio.CancelScope(shield=True):
                await self.ctx.run_sync(self.meta.close)

    async def _start_admin_api(self, nursery: trio.Nursery) -> None:
        """The admin HTTP listener (/metrics, /health), when `admin_api_bind_addr` is set.

        The embedded default has one on 127.0.0.1; should its port be taken (another
        node on this machine), the node runs without it and says so. A configured
        address that cannot be listened on stops the node, like `rpc_bind_addr`.
        """
        addr = self.cfg.admin_api_bind_addr
        if addr is None:
            return
        try:
            self.admin_addr = await nursery.start(serve_admin_http, self, addr, self.cfg.metrics_token)
        except OSError as exc:
            message = f"cannot listen on {addr} (admin_api_bind_addr in {self.cfg.source}): " \
                      f"{exc.strerror or exc}"
            if self.cfg.source.startswith("<embedded default"):
                log.warning("%s; running without the admin API (/metrics, /health)", message)
                return
            raise ConfigError(message) from None

    def _peers_changed(self, nodes: dict[str, str]) -> None:
        """A layout change: reach its nodes (a new node's address), let them connect."""
        self.net.set_peers(nodes)
        if self.layout.has_node(self.node_id):  # assigned, or its zone changed
            self.manager.zone = self.layout.node(self.node_id).zone
        self.keys.peers = sorted(set(self.keys.peers) | {n for n in nodes if n != self.node_id})

    def _startup_sweep(self) -> None:
        self.blocks.startup()

    def foundations_problem(self) -> str | None:
        """What is wrong with the node's own foundations, or None (the workers' health check).

        The data and metadata directories must still be directories, and the
        metadata store must still be readable.
        """
        # Through the block files' file system (the simulation's disk is not the OS's), and
        # every configured directory: the node runs on while one of several is left (a
        # tuple `data_dir` used to reach os.path.isdir whole and raise TypeError).
        if not any(self.files.fs.isdir(d.path) for d in self.files.dirs):
            return f"data_dir {', '.join(d.path for d in self.files.dirs)} is gone"
        if not os.path.isdir(self.cfg.metadata_dir):
            return f"metadata_dir {self.cfg.metadata_dir} is gone"
        try:
            self.meta.counts()
        except Exception as exc:  # noqa: BLE001 - any failure to read it is the answer
            return f"the metadata store {self.cfg.metadata_dir} cannot be read: {exc}"
        return None

    # ---- status ----

    def status(self) -> dict[str, Any]:
        """The node's state as the `status` command shows it (JSON keys are a contract)."""
        counts = self.meta.counts()
        return {
            "node_id": self.node_id,
            "version": __version__,
            "fast_path": fastpath.IMPLEMENTATION,
            "addr": self.addr or self.cfg.public_addr,
            "zone": self.manager.zone,
            "layout": {**self.layout.summary(), **self.layouts.status()},
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
            "data_dirs": self.files.dir_status(),
            "capacity": self.layout.node(self.node_id).capacity
            if self.layouts.has_layout and self.layout.has_node(self.node_id) else None,
            "uptime": time.monotonic() - self.started_monotonic,
            "admin_addr": self.admin_addr,
        }

    async def handle_status(self, peer: str, fields: dict[str, Any], data: bytes | None) -> Reply:
        """RPC: this node's status."""
        return self.status(), None
