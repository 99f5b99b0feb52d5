"""The RPC layer a node uses: listen, connect to peers, call, quorum-call.

Ownership (one nursery, the one `serve`/`serve_listener`/`run` opens):

    RpcNetwork.serve / serve_listener / run
    └── nursery (self._nursery)
        ├── listener accept loop(s) ── one task per accepted connection
        │     (a slot under the caps, the handshake under `handshake_timeout`,
        │     then `RpcConnection.run`; whatever happens on it ends that
        │     connection only)
        ├── one task per outgoing peer connection (`RpcConnection.run`)
        ├── maintenance: every `ping_interval`, ping each connected peer
        │     (latency EWMA, down on failure) and reconnect the down ones
        │     whose backoff has expired
        └── background quorum children (`call_many(interrupt_after_quorum=False)`)

Cancelling that task (node shutdown) closes every connection; pending calls
fail with `NodeUnreachable`. `call`/`call_many` to another node need the
network to be running; a call to `node_id` itself goes straight to the local
handler without a socket (its errors are mapped exactly as a remote call's).

Two kinds of peer connect (see `blocknode.rpc.handshake`): nodes, which prove
the cluster secret and must be `members`, and clients, which prove a client key
that `lookup_key` knows. Each kind has its own caps (`limits` for clients,
`node_limits` for nodes) and its own budget for messages being received, and
only clients' requests are bounded by the client request budget and reserve
their replies: a flood of clients cannot take what replication needs.

Failures a caller sees: `RpcTimeout` (deadline passed), `NodeUnreachable`
(cannot connect, handshake refused, connection broke, node down and in
backoff), `RemoteCallError` and subclasses (the node answered with an error),
`QuorumError` (from `call_many`).
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from blocknode.errors import NodeUnreachable, ProtocolError, QuorumError, RpcTimeout
from blocknode.rpc.connect import handshake, open_connection
from blocknode.rpc.connection import Handler, RpcConnection
from blocknode.rpc.errors import error_reply, remote_error
from blocknode.rpc.handshake import ROLE_CLIENT, ROLE_NODE, Peer, ServerHandshake
from blocknode.rpc.session import Session
from blocknode.rpc.transport import Connector, split_addr, tcp_connect
from blocknode.rpc.wire import DEFAULT_MAX_MESSAGE_SIZE, PRIO_NORMAL, ReceiveBudget

__all__ = [
    "ByteBudget",
    "ConnectionLimits",
    "Connector",
    "Outcome",
    "RpcNetwork",
    "fd_connection_cap",
    "raise_nofile_limit",
    "split_addr",
    "tcp_connect",
]

log = logging.getLogger("blocknode.rpc")

Outcome = tuple[str, tuple[dict[str, Any], bytes | None]]
"""One successful `call_many` answer: (node id, (fields, data))."""

_EWMA_ALPHA = 0.3
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_S = 0.1


def _remote_host(stream: trio.abc.Stream) -> str:
    """The remote host of a TCP stream ("" for other streams)."""
    if isinstance(stream, trio.SocketStream):
        try:
            return str(stream.socket.getpeername()[0])
        except OSError:
            return "?"
    return ""
_MAX_FAULT_ROWS = 1024


class ByteBudget:
    """A FIFO byte semaphore: the RAM cap over payloads held by outgoing calls.

    Like Garage's ``block_ram_buffer_max``: a sender awaits budget before it
    queues a payload, so a slow replica slows the writer instead of growing
    memory. A request larger than the whole budget is clamped to it (it then
    runs alone).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("byte budget must be positive")
        self.max_bytes = max_bytes
        self.used = 0
        self._waiters: list[tuple[int, trio.Event]] = []

    @property
    def waiting(self) -> int:
        """Number of tasks waiting for budget."""
        return len(self._waiters)

    async def acquire(self, n: int) -> int:
        """Wait until `n` bytes (clamped to the budget) are free; returns the amount taken."""
        n = min(n, self.max_bytes)
        if not self._waiters and self.used + n <= self.max_bytes:
            self.used += n
            return n
        entry = (n, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self.release(n)
            else:
                self._waiters.remove(entry)
                self._grant()
            raise
        return n

    def take(self, n: int) -> None:
        """Take `n` bytes now, even past the budget (bytes that exist already must be
        counted); later `acquire` calls wait until the budget is back under its cap."""
        self.used += n

    def release(self, n: int) -> None:
        """Return bytes taken by `acquire` or `take`."""
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.max_bytes:
            n, ev = self._waiters.pop(0)
            self.used += n
            ev.set()

    @asynccontextmanager
    async def reserve(self, n: int):  # noqa: ANN201 - async generator context manager
        """``async with budget.reserve(n):`` holds `n` bytes for the block."""
        taken = await self.acquire(n)
        try:
            yield taken
        finally:
            self.release(taken)


@dataclass(frozen=True)
class ConnectionLimits:
    """Caps on the incoming connections of one kind of peer (the config's ``rpc_*`` fields).

    A node has one for clients and one for nodes. `max_connections` incoming
    connections of that kind at once (from its hello on; the two caps together
    are also kept under the process's descriptor limit, see
    `fd_connection_cap`), `max_per_addr` of them from one remote address. A
    newcomer past a cap displaces the oldest connection of its kind still in
    its handshake; when none is left to displace it is refused (``busy``).
    `max_handshakes` (of the client limits: one pool for every connection not
    yet authenticated, whatever it claims to be) works the same way at accept.
    An authenticated incoming connection with nothing in flight for
    `idle_timeout` seconds is closed; any connection that makes no progress for
    `stall_timeout` seconds on a message it is receiving or sending is closed
    (None: never).
    """

    max_connections: int = 1024
    max_per_addr: int = 128
    max_handshakes: int = 64
    idle_timeout: float | None = 300.0
    stall_timeout: float | None = 30.0


NODE_LIMITS = ConnectionLimits(max_connections=256, max_per_addr=256)
"""Default caps on incoming connections from other nodes (each peer keeps one open)."""

FD_RESERVE = 256
"""Descriptors always left to the data path (block files, LMDB, outgoing connections)."""


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fd_connection_cap(nofile: int) -> int:
    """How many incoming connections a descriptor limit of `nofile` leaves room for.

    Half the descriptors, and at least `FD_RESERVE`, stay with the data path.
    """
    return max(8, nofile - max(FD_RESERVE, nofile // 2))


@dataclass(eq=False)
class _Slot:
    """An accepted connection's place under the caps."""

    addr: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    released: bool = False
    role: str | None = None
    """The kind of peer it said it is in its hello (proven once authenticated)."""


@dataclass(eq=False)
class _Peer:
    id: str
    addr: str
    conn: RpcConnection | None = None
    up: bool = False
    latency: float | None = None
    failures: int = 0
    next_attempt: float = -float("inf")
    last_error: str | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)

    def live(self) -> RpcConnection | None:
        return self.conn if self.conn is not None and not self.conn.closed else None


class RpcNetwork:
    """Authenticated RPC between the nodes of a cluster (and from clients).

    `peers` maps node id -> ``"host:port"`` (an entry for `node_id` itself is
    ignored). `handler` serves incoming requests from nodes *and* clients; its
    first argument is the `Peer` the handshake proved. `members`: the node ids
    that may connect as nodes (default: `node_id` and `peers`), each proving
    `secret` (`open_membership`: any node id that proves it, a node joining the
    cluster); `lookup_key(key_id)`: the verifier of a live client key, or None
    (without it, no client can connect).

    Timeouts: `connect_timeout` (transport connect), `handshake_timeout` (each
    handshake, both directions), `ping_interval`/`ping_timeout` (maintenance).
    Incoming connections are capped by `limits` (clients, and the handshake
    pool) and `node_limits` (nodes; see `ConnectionLimits`).
    Reconnect backoff doubles from `backoff_initial` to `backoff_max` (with
    ±20 % jitter); while a node that failed `fail_fast_after` connects in a row is
    in backoff, calls to it fail at once with `NodeUnreachable` (before that, a
    call tries to connect). Memory: `ram_buffer_max` bounds payload bytes held
    by outgoing calls (see `ByteBudget`); `client_buffer_max` payload bytes of
    client requests being handled; `receive_buffer_max` bytes of incoming
    messages still being reassembled, on every connection (see
    `ReceiveBudget`; from clients: `client_receive_buffer_max`, a budget of
    their own); `reply_buffer_max` reply payloads until they are sent
    (a client's request first reserves ``reply_size(kind)`` bytes there, the
    largest reply its kind may carry; a connection holding more than
    `reply_share` stops being read). Each defaults to `ram_buffer_max`.
    """

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        peers: dict[str, str],
        handler: Handler,
        *,
        members: Iterable[str] | None = None,
        open_membership: bool = False,
        lookup_key: Callable[[str], bytes | None] | None = None,
        connect: Connector | None = None,
        ram_buffer_max: int = 256 * 1024 * 1024,
        client_buffer_max: int | None = None,
        receive_buffer_max: int | None = None,
        client_receive_buffer_max: int | None = None,
        reply_buffer_max: int | None = None,
        reply_size: Callable[[str], int] | None = None,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
        ping_interval: float = 10.0,
        ping_timeout: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        fail_fast_after: int = 3,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        limits: ConnectionLimits | None = None,
        node_limits: ConnectionLimits | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        jitter: random.Random | None = None,
    ) -> None:
        if len(secret) != 32:
            raise ValueError("cluster secret must be 32 bytes")
        self.node_id = node_id
        self._secret = bytes(secret)
        self._handler = handler
        self._connect = connect or tcp_connect
        self.budget = ByteBudget(ram_buffer_max)
        self.client_budget = ByteBudget(client_buffer_max or ram_buffer_max)
        self.receive_budget = ReceiveBudget(receive_buffer_max or ram_buffer_max)
        """Messages being received from nodes."""
        self.client_receive_budget = ReceiveBudget(
            client_receive_buffer_max or receive_buffer_max or ram_buffer_max)
        """Messages being received from clients."""
        self._members = frozenset(members) if members is not None else frozenset({node_id, *peers})
        self._open_membership = open_membership
        self._lookup_key = lookup_key
        self.reply_budget = ByteBudget(reply_buffer_max or ram_buffer_max)
        self.reply_share = max(max_message_size, self.reply_budget.max_bytes // 4)
        """Reply bytes one connection may hold before it stops being read."""
        self._reply_size = reply_size
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.fail_fast_after = fail_fast_after
        self.max_message_size = max_message_size
        self.limits = limits or ConnectionLimits()
        self.node_limits = node_limits or NODE_LIMITS
        self.max_connections = self.limits.max_connections
        """The cap on incoming client connections in force (`serve` may lower it to fit
        the descriptor limit)."""
        self.max_node_connections = self.node_limits.max_connections
        """The cap on incoming node connections in force."""
        self._handshaking: dict[_Slot, None] = {}  # oldest first
        self._per_addr: dict[tuple[str, str], int] = {}  # (role, addr) -> connections
        self._per_role: dict[str, int] = {ROLE_NODE: 0, ROLE_CLIENT: 0}
        self._open_count = 0
        self.connections_refused = 0
        """Incoming connections closed at once or displaced by the caps (count)."""
        self._rng = rng
        self._jitter = jitter or random.Random()
        self._peers = {nid: _Peer(nid, addr) for nid, addr in peers.items() if nid != node_id}
        self._self_addr = peers.get(node_id, "")
        self._nursery: trio.Nursery | None = None
        self._incoming: set[RpcConnection] = set()
        self.handshake_failures = 0
        """Incoming connections refused at the handshake (count)."""
        self.connection_faults: dict[str, int] = {}
        """Per peer id: connections closed for a protocol violation or an internal error."""

    # -- serving -----------------------------------------------------------------

    async def serve(
        self, bind_addr: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on TCP `bind_addr` (port 0 allowed) and run the network until cancelled.

        `task_status.started("host:port")` reports the address really bound. The
        process's soft descriptor limit is raised to its hard limit first, and
        the connection cap lowered if that leaves too few descriptors.
        """
        host, port = split_addr(bind_addr)
        cap = fd_connection_cap(raise_nofile_limit())
        if cap < self.max_connections + self.max_node_connections:
            nodes = min(self.max_node_connections, max(1, cap // 4))
            clients = max(1, min(self.max_connections, cap - nodes))
            log.warning("descriptor limit: at most %d incoming client and %d node connections "
                        "(not %d and %d)", clients, nodes, self.max_connections,
                        self.max_node_connections)
            self.max_connections, self.max_node_connections = clients, nodes
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        actual = f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0] else f"{sockname[0]}:{sockname[1]}"
        await self._run(listeners, task_status, actual)

    async def serve_listener(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Like `serve` over an injected listener (e.g. in-memory streams in tests)."""
        await self._run([listener], task_status, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run outgoing connections and maintenance only, without listening."""
        await self._run([], task_status, None)

    async def _run(self, listeners: list[Any], task_status: Any, started: Any) -> None:
        if self._nursery is not None:
            raise RuntimeError("this RpcNetwork is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)
                nursery.start_soon(self._maintenance)
                task_status.started(started)
        finally:
            self._nursery = None
            for peer in self._peers.values():
                peer.up = False
                peer.conn = None

    async def _accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        """Accept connections for as long as the network runs; each gets a slot or is closed."""
        assert self._nursery is not None
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("accept failed: %s; retrying in %ss", os.strerror(exc.errno), _ACCEPT_RETRY_S)
                    await trio.sleep(_ACCEPT_RETRY_S)
                    continue
                slot = self._admit(_remote_host(stream))
                if slot is None:
                    self.connections_refused += 1
                    await trio.aclose_forcefully(stream)
                    continue
                self._nursery.start_soon(self._serve_connection, stream, slot)

    def _admit(self, addr: str) -> _Slot | None:
        """A slot for a new connection from `addr`, displacing the oldest unauthenticated
        connections past a cap; None if every connection in the way is authenticated."""
        if len(self._handshaking) >= self.limits.max_handshakes:
            self._make_room()
        while self._open_count >= self.max_connections + self.max_node_connections:
            if not self._make_room():
                return None
        slot = _Slot(addr)
        self._open_count += 1
        self._handshaking[slot] = None
        return slot

    def _claim(self, slot: _Slot, role: str) -> str | None:
        """At the hello: count `slot` under the caps of `role` (displacing the oldest
        connection of that role still in its handshake past a cap); or the reason to
        refuse it (every connection in the way is authenticated)."""
        if role == ROLE_NODE:
            cap, per_addr = self.max_node_connections, self.node_limits.max_per_addr
        else:
            cap, per_addr = self.max_connections, self.limits.max_per_addr
        while self._per_role[role] >= cap:
            if not self._displace(roles=(role,), keep=slot):
                self.connections_refused += 1
                return f"at its cap of {cap} {role} connections"
        while self._per_addr.get((role, slot.addr), 0) >= per_addr:
            if not self._displace(roles=(role,), addr=slot.addr, keep=slot):
                self.connections_refused += 1
                return f"at its cap of {per_addr} {role} connections from one address"
        slot.role = role
        self._per_role[role] += 1
        self._per_addr[(role, slot.addr)] = self._per_addr.get((role, slot.addr), 0) + 1
        return None

    def _make_room(self) -> bool:
        """At accept: close the oldest connection still in its handshake, sparing those
        that said they are nodes (then those that said they are clients) while any
        other is left: a flood of sockets displaces its own kind first."""
        return (self._displace(roles=(None,)) or self._displace(roles=(ROLE_CLIENT,))
                or self._displace())

    def _displace(self, *, roles: tuple[str | None, ...] | None = None, addr: str | None = None,
                  keep: _Slot | None = None) -> bool:
        """Close the oldest connection still in its handshake (whose role is one of
        `roles`, None for no hello yet; from `addr`; if given; never `keep`)."""
        for slot in self._handshaking:
            if (slot is not keep and (roles is None or slot.role in roles)
                    and (addr is None or slot.addr == addr)):
                del self._handshaking[slot]
                slot.scope.cancel()
                self._release(slot)
                self.connections_refused += 1
                return True
        return False

    def _release(self, slot: _Slot) -> None:
        if not slot.released:
            slot.released = True
            self._open_count -= 1
            if slot.role is not None:
                self._per_role[slot.role] -= 1
                key = (slot.role, slot.addr)
                left = self._per_addr[key] - 1
                if left:
                    self._per_addr[key] = left
                else:
                    del self._per_addr[key]

    async def _serve_connection(self, stream: trio.abc.Stream, slot: _Slot | None = None) -> None:
        """One accepted connection: handshake with a deadline, then serve it.

        Any failure closes this connection only: nothing escapes into the
        network's nursery (an unexpected error is logged and counted).
        """
        slot = slot or _Slot("")
        try:
            await self._serve_accepted(stream, slot)
        except Exception as exc:
            log.error("incoming connection from %s failed", slot.addr or "?", exc_info=exc)
            self._count_fault("?")
        finally:
            self._handshaking.pop(slot, None)
            self._release(slot)
            await trio.aclose_forcefully(stream)

    async def _serve_accepted(self, stream: trio.abc.Stream, slot: _Slot) -> None:
        hs = ServerHandshake(self.node_id, self._secret,
                             members=None if self._open_membership else self._members,
                             lookup_key=self._lookup_key,
                             admit=lambda role, _peer_id: self._claim(slot, role), rng=self._rng)
        try:
            with slot.scope:  # cancelled when a newcomer displaces this connection
                with trio.fail_after(self.handshake_timeout):
                    await handshake(stream, hs)
        except (ProtocolError, NodeUnreachable, trio.TooSlowError) as exc:
            self.handshake_failures += 1
            log.info("refused an incoming connection from %s: %s", slot.addr or "?",
                     exc or "handshake timed out")
            return
        if slot.scope.cancelled_caught:
            return
        self._handshaking.pop(slot, None)
        # The role was proven by the handshake (a client key cannot pass for a node).
        client = hs.keys.role == ROLE_CLIENT
        limits = self.limits if client else self.node_limits
        session = Session(hs.keys, decoder=hs.decoder, max_message_size=self.max_message_size,
                          receive_budget=self.client_receive_budget if client else self.receive_budget)
        peer = None if client else self._peers.get(hs.keys.peer_id)
        # Requests from clients fan out to other nodes, so their payloads are bounded
        # here; requests from nodes are leaves, bounded by the sender's own budget
        # (and bounding them here too could deadlock two nodes waiting on each other).
        # Likewise the largest reply a client's request may need is reserved before it
        # is handled; every reply, to anyone, is counted until sent.
        conn = RpcConnection(stream, session, hs.keys.peer, self._handler,
                             request_budget=self.client_budget if client else None,
                             reply_budget=self.reply_budget, reply_share=self.reply_share,
                             reply_size=self._reply_size if client else None,
                             idle_timeout=limits.idle_timeout,
                             stall_timeout=limits.stall_timeout, addr=slot.addr)
        if peer is not None and peer.live() is None:
            # The peer just proved it is alive: let our next call connect to it at once
            # instead of waiting out a backoff earned while it was down.
            peer.next_attempt = 0.0
            peer.failures = 0
        self._incoming.add(conn)
        try:
            await conn.run()
        finally:
            self._incoming.discard(conn)
            if conn.fault is not None:
                self._count_fault(conn.peer_id)

    def close_client_connections(self, key_id: str, reason: str) -> int:
        """Close every incoming connection authenticated with client key `key_id`
        (it was revoked); returns how many."""
        who = Peer.client(key_id)
        closing = [c for c in self._incoming if c.peer == who]
        for conn in closing:
            conn.close_soon(NodeUnreachable(reason))
        return len(closing)

    def _count_fault(self, peer_id: str) -> None:
        faults = self.connection_faults
        if peer_id not in faults and len(faults) >= _MAX_FAULT_ROWS:
            del faults[next(iter(faults))]  # bounded: client ids are fresh per connection
        faults[peer_id] = faults.get(peer_id, 0) + 1

    # -- outgoing connections ------------------------------------------------------

    async def _open(self, peer: _Peer) -> RpcConnection:
        try:
            return await open_connection(
                peer.addr, self._secret,
                local_id=self.node_id,
                expected_peer_id=peer.id,
                connect=self._connect,
                connect_timeout=self.connect_timeout,
                handshake_timeout=self.handshake_timeout,
                max_message_size=self.max_message_size,
                handler=self._handler,
                rng=self._rng,
                receive_budget=self.receive_budget,
                reply_budget=self.reply_budget,
                reply_share=self.reply_share,
                stall_timeout=self.node_limits.stall_timeout,
            )
        except ProtocolError as exc:  # refused: to the caller, the node is unreachable
            raise NodeUnreachable(str(exc)) from exc

    async def _connection(self, peer: _Peer) -> RpcConnection:
        """The live connection to `peer`, connecting if needed (fails fast in backoff)."""
        conn = peer.live()
        if conn is not None:
            return conn
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("RpcNetwork is not running: start serve()/serve_listener()/run() first")
        async with peer.lock:
            conn = peer.live()
            if conn is not None:
                return conn
            wait = peer.next_attempt - trio.current_time()
            # Fail fast only for a peer that keeps failing: one that was merely not up
            # yet (a cluster starting, a node restarting) is tried again at once.
            if wait > 0 and peer.failures >= self.fail_fast_after:
                raise NodeUnreachable(
                    f"node {peer.id} is down ({peer.last_error}); next connect attempt in {wait:.1f}s"
                )
            try:
                conn = await self._open(peer)
            except NodeUnreachable as exc:
                self._mark_failed(peer, str(exc))
                raise
            peer.conn, peer.up, peer.failures, peer.last_error = conn, True, 0, None
            nursery.start_soon(self._run_outgoing, peer, conn)
            return conn

    def _mark_failed(self, peer: _Peer, error: str) -> None:
        peer.up = False
        peer.last_error = error
        peer.failures += 1
        backoff = min(self.backoff_max, self.backoff_initial * 2 ** (peer.failures - 1))
        peer.next_attempt = trio.current_time() + backoff * self._jitter.uniform(0.8, 1.2)

    async def _run_outgoing(self, peer: _Peer, conn: RpcConnection) -> None:
        try:
            await conn.run()  # never raises but for cancellation
        finally:
            if peer.conn is conn:
                peer.conn = None
                peer.up = False
                peer.last_error = str(conn.close_reason)
            if conn.fault is not None:
                self._count_fault(conn.peer_id)

    # -- maintenance ---------------------------------------------------------------

    async def _maintenance(self) -> None:
        while True:
            await self.check_peers()
            await trio.sleep(self.ping_interval)

    def set_peers(self, peers: dict[str, str], members: Iterable[str] | None = None) -> None:
        """Change the cluster's nodes (a new layout version): peers added or re-addressed
        (a changed address closes the old connection; a peer not connected is retried at
        once, without its backoff); `peers` and `members` may connect from now on. Nothing is taken away while the node runs: a node that left the
        layout can still reach this one (and learn that it left)."""
        for nid, addr in peers.items():
            if nid == self.node_id:
                self._self_addr = addr
                continue
            p = self._peers.get(nid)
            if p is None:
                self._peers[nid] = _Peer(nid, addr)
                continue
            if p.live() is None:
                # The layout changed: a node that refused or was absent may take us now.
                p.failures, p.next_attempt = 0, -float("inf")
            if p.addr != addr:
                p.addr = addr
                conn = p.live()
                if conn is not None and self._nursery is not None:
                    self._nursery.start_soon(conn.aclose)
        self._members = self._members | {self.node_id, *peers} | set(members or ())

    async def check_peers(self) -> None:
        """One maintenance round: ping connected peers, reconnect due ones."""
        async with trio.open_nursery() as nursery:
            for peer in self._peers.values():
                nursery.start_soon(self._check_peer, peer)

    async def _check_peer(self, peer: _Peer) -> None:
        try:
            conn = peer.live()
            if conn is None:
                if trio.current_time() < peer.next_attempt:
                    return
                conn = await self._connection(peer)
            with trio.move_on_after(self.ping_timeout):
                rtt = await conn.ping()
                peer.latency = rtt if peer.latency is None else (
                    _EWMA_ALPHA * rtt + (1 - _EWMA_ALPHA) * peer.latency
                )
                peer.up = True
                return
            self._mark_failed(peer, f"no answer to ping within {self.ping_timeout}s")
            await conn.aclose()
        except NodeUnreachable as exc:
            peer.up = False
            peer.last_error = str(exc)
        except Exception as exc:  # maintenance must never take the node down
            log.exception("peer check of %s failed", peer.id)
            peer.up = False
            peer.last_error = repr(exc)

    # -- calls -----------------------------------------------------------------------

    async def call(
        self,
        node_id: str,
        kind: str,
        fields: dict[str, Any],
        data: bytes | None = None,
        *,
        timeout: float,
        priority: int = PRIO_NORMAL,
        _budgeted: bool = False,
    ) -> tuple[dict[str, Any], bytes | None]:
        """Call `kind` on `node_id` and return its (fields, data).

        The whole call (connecting, waiting for RAM budget, sending, the
        remote handler, the answer) must finish within `timeout` seconds, or
        `RpcTimeout` naming the node is raised.
        """
        with trio.move_on_after(timeout):
            if node_id == self.node_id:
                return await self._call_local(kind, fields, data)
            peer = self._peers.get(node_id)
            if peer is None:
                raise NodeUnreachable(f"unknown node {node_id!r}")
            conn = await self._connection(peer)
            if data is None or _budgeted:
                return await conn.call(kind, fields, data, priority=priority)
            async with self.budget.reserve(len(data)):
                return await conn.call(kind, fields, data, priority=priority)
        raise RpcTimeout(f"node {node_id} did not answer {kind!r} within {timeout}s")

    async def _call_local(
        self, kind: str, fields: dict[str, Any], data: bytes | None
    ) -> tuple[dict[str, Any], bytes | None]:
        try:
            out_fields, out_data = await self._handler(Peer.node(self.node_id), kind, fields, data)
        except Exception as exc:
            raise remote_error(self.node_id, error_reply(exc, peer=self.node_id, kind=kind)) from exc
        return out_fields, bytes(out_data) if out_data is not None else None

    async def _call_local_only(
        self, kind: str, fields: dict[str, Any], data: bytes | None, timeout: float
    ) -> tuple[dict[str, Any], bytes | None]:
        # A quorum call whose one target is this node (a single-node cluster): the
        # same outcome as the general path, without its tasks and channel (the
        # per-request cost that bounds small-block throughput).
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout):
                return await self._call_local(kind, fields, data)
            err: str = f"RpcTimeout: node {self.node_id} did not answer {kind} within {timeout}s"
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
        raise QuorumError(f"{kind} on 1 nodes", 1, 0, {self.node_id: err})

    async def call_many(
        self,
        node_ids: Iterable[str],
        kind: str,
        fields: dict[str, Any],
        data: bytes | None = None,
        *,
        quorum: int,
        timeout: float,
        interrupt_after_quorum: bool = True,
        priority: int = PRIO_NORMAL,
        quorum_sets: Sequence[tuple[Iterable[str], int]] | None = None,
    ) -> list[Outcome]:
        """Call `kind` on several nodes at once; return once `quorum` succeeded.

        One task per target (duplicates removed). Each task catches its own
        error, so one failing node never escapes as an ExceptionGroup. Returns
        the successes in arrival order (at least `quorum` of them). With
        `interrupt_after_quorum` the other calls are cancelled then; without,
        they run on to completion (bounded by `timeout`) in the network's
        nursery. The payload's RAM budget is taken once and held until every
        call is done. If the quorum becomes impossible, raises `QuorumError`
        listing every failed node and its error; without `interrupt_after_quorum`
        (a write) it first waits for every call to end (within `timeout`), so that the
        error names each node where the write was applied nonetheless.
        """
        targets = list(dict.fromkeys(node_ids))
        if not 0 <= quorum <= len(targets):
            raise ValueError(f"quorum {quorum} impossible with {len(targets)} nodes")
        if not interrupt_after_quorum and self._nursery is None:
            raise RuntimeError("RpcNetwork is not running: start serve()/run() first")
        if targets == [self.node_id] and quorum == 1:
            return [(self.node_id, await self._call_local_only(kind, fields, data, timeout))]
        sets = [(frozenset(ns), q) for ns, q in quorum_sets] if quorum_sets else None
        if sets is not None:
            # Several node sets (layout versions during a migration), each with its own
            # quorum: done once every set has its quorum, impossible once one cannot.
            quorum = len(targets)
        deadline = trio.current_time() + timeout
        remote = sum(1 for t in targets if t != self.node_id)
        taken = 0
        if data is not None and remote:
            with trio.move_on_at(deadline):
                taken = await self.budget.acquire(len(data))
            if taken == 0 and len(data) > 0:
                raise RpcTimeout(f"{kind}: no send buffer budget free within {timeout}s")
        send, recv = trio.open_memory_channel[tuple[str, Any, BaseException | None]](len(targets))
        left = [len(targets)]

        async def child(nid: str) -> None:
            outcome: tuple[str, Any, BaseException | None]
            try:
                remaining = max(0.0, deadline - trio.current_time())
                res = await self.call(
                    nid, kind, fields, data, timeout=remaining, priority=priority, _budgeted=True
                )
                outcome = (nid, res, None)
            except Exception as exc:
                outcome = (nid, None, exc)
            finally:
                left[0] -= 1
                if left[0] == 0 and taken:
                    self.budget.release(taken)
            send.send_nowait(outcome)

        async def collect() -> list[Outcome] | QuorumError:
            ok: list[Outcome] = []
            failed: dict[str, str] = {}
            def reached() -> bool:
                if sets is None:
                    return len(ok) >= quorum
                done = {nid for nid, _ in ok}
                return all(len(ns & done) >= q for ns, q in sets)

            def hopeless() -> bool:
                if sets is None:
                    return len(failed) > len(targets) - quorum
                return any(len(ns - failed.keys()) < q for ns, q in sets)

            while not reached():
                if hopeless():
                    if not interrupt_after_quorum:
                        # A write: the calls still running may apply it; wait for them
                        # (each ends by the deadline) to say where it was applied.
                        while len(ok) + len(failed) < len(targets):
                            nid, res, exc = await recv.receive()
                            if exc is None:
                                ok.append((nid, res))
                            else:
                                failed[nid] = f"{type(exc).__name__}: {exc}"
                    return QuorumError(f"{kind} on {len(targets)} nodes", quorum, len(ok), failed,
                                       applied=[nid for nid, _ in ok])
                nid, res, exc = await recv.receive()
                if exc is None:
                    ok.append((nid, res))
                else:
                    failed[nid] = f"{type(exc).__name__}: {exc}"
            return ok

        if interrupt_after_quorum:
            async with trio.open_nursery() as nursery:
                for nid in targets:
                    nursery.start_soon(child, nid)
                result = await collect()
                nursery.cancel_scope.cancel()
        else:
            assert self._nursery is not None
            for nid in targets:
                self._nursery.start_soon(child, nid)
            result = await collect()
        if isinstance(result, QuorumError):
            raise result
        return result

    # -- status -----------------------------------------------------------------------

    def peer_status(self) -> list[dict[str, Any]]:
        """One dict per node (self included): id, addr, up, latency (s or None), last_error."""
        rows = [
            {"id": self.node_id, "addr": self._self_addr, "up": True, "latency": 0.0, "last_error": None}
        ]
        for p in self._peers.values():
            rows.append(
                {
                    "id": p.id,
                    "addr": p.addr,
                    "up": p.up and p.live() is not None,
                    "latency": p.latency,
                    "last_error": p.last_error,
                }
            )
        return sorted(rows, key=lambda r: r["id"])

    def is_up(self, node_id: str) -> bool:
        """True for self and for peers with a live, recently answering connection."""
        if node_id == self.node_id:
            return True
        p = self._peers.get(node_id)
        return p is not None and p.up and p.live() is not None

    def latency(self, node_id: str) -> float | None:
        """Ping round-trip EWMA in seconds (0.0 for self, None if never measured)."""
        if node_id == self.node_id:
            return 0.0
        p = self._peers.get(node_id)
        return p.latency if p is not None else None

    def connection_status(self) -> dict[str, Any]:
        """Incoming connections now (by kind of peer), what the caps refused, and faults per peer."""
        clients = sum(1 for c in self._incoming if not c.peer.is_node)
        return {
            "incoming": len(self._incoming),
            "clients": clients,
            "nodes": len(self._incoming) - clients,
            "handshaking": len(self._handshaking),
            "max_connections": self.max_connections,
            "max_node_connections": self.max_node_connections,
            "refused": self.connections_refused,
            "handshake_failures": self.handshake_failures,
            "faults": dict(self.connection_faults),
        }

    @property
    def incoming_connections(self) -> int:
        """Number of authenticated incoming connections currently open."""
        return len(self._incoming)
