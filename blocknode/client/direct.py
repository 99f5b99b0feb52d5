"""The client's side of the direct path: large blocks go to their replicas, not through a node.

The client learns the live layout versions from the node it talks to (its
"home", `client_layout`), keeps them fresh (fetched again every
`REFRESH_INTERVAL` seconds, and at once when a replica answers ``wrong_node``
or ``stale_layout``), and for a large block:

- **put**: hashes it (and compresses it at the home node's level) once here,
  sends it to every write node of every live
  layout version (`client_put_direct`, one connection per node with the same
  client key) and reports it stored only when the write quorum of *every* live
  version has acknowledged. Each replica checks the key, its layout and the
  hash, and stamps the reference with its own clock (`blocknode.direct`).
  Replicas that answer after the quorum finish in the background.
- **get**: asks the block's replicas in read order (the home node first when it
  holds the block, then by measured latency), a next one when the first fails
  or has not answered within `hedge_delay` (or twice its usual latency, when
  that is longer: a loaded cluster is not asked twice for every block); the
  first copy that verifies here
  wins (the one end-to-end check, no copy: the caller gets the bytes received).
  The first replica is asked in the calling task (no nursery, channel or task
  for the common get); one that is slow is asked again last, after the others.
- **put**, likewise: the hash and the form to send are computed from the
  caller's bytes (no `VerifiedBlock` copy of them).

When that does not work (replicas unreachable, the quorum not met, the layout
still refused after one refresh, a block found nowhere), the caller falls back
to the home node's coordinated path: `put` and `get` return None. A refusal of
the key (`forbidden`) or of the bytes (`hash_mismatch`) is raised: the home
node would refuse them too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from blocknode import block, threads
from blocknode.auth import ClientKey
from blocknode.errors import (
    BlocknodeError,
    BlockNotFound,
    Forbidden,
    HashMismatch,
    NodeUnreachable,
    ProtocolError,
    RemoteError,
)
from blocknode.layout import Layout, LiveLayout
from blocknode.layout_state import cluster_from_wire
from blocknode.protocol import CLIENT_GET_DIRECT, CLIENT_LAYOUT, CLIENT_PUT_DIRECT, THREAD_HASH_MIN
from blocknode.rpc.connect import open_connection
from blocknode.rpc.connection import RpcConnection
from blocknode.rpc.handshake import ROLE_CLIENT
from blocknode.rpc.transport import Connector

__all__ = ["DIRECT_MIN_BLOCK", "REFRESH_INTERVAL", "DirectPath"]

log = logging.getLogger("blocknode.client")

DIRECT_MIN_BLOCK = 64 * 1024
"""Blocks larger than this go direct (smaller ones are batched through the home node)."""
REFRESH_INTERVAL = 30.0
"""Seconds after which the layout is fetched again before the next direct call."""
DOWN_RETRY = 5.0
"""Seconds a replica that could not be reached is left alone (its blocks fall back)."""
_REFRESH_CODES = frozenset({"wrong_node", "stale_layout"})


def _code(exc: BaseException) -> str | None:
    return getattr(exc, "code", None) if isinstance(exc, RemoteError) else None


class DirectPath:
    """Direct puts and gets of one client (see module docstring).

    `home()` is the client's connection to the node it talks to now (a client
    that reconnects swaps it); connections to
    the other replicas are opened on first use with `key` and run in `nursery`
    (the client's), which also holds the replies that come after a quorum.
    """

    def __init__(self, home: Callable[[], RpcConnection], key: ClientKey, nursery: trio.Nursery, *,
                 block_size: int, timeout: float, connect_timeout: float, max_message_size: int,
                 hedge_delay: float = 0.05, refresh_interval: float = REFRESH_INTERVAL,
                 connect: Connector | None = None) -> None:
        self._home = home
        self._key = key
        self._nursery = nursery
        self.block_size = block_size
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.hedge_delay = hedge_delay
        self.refresh_interval = refresh_interval
        self._connect = connect
        self.layout: LiveLayout | None = None
        self.level: int | None = None
        """The home node's zstd level: a direct put is compressed here, once."""
        self.home_id: str | None = None
        self._versions: list[int] = []
        self._built: dict[int, tuple[Any, Layout]] = {}
        self._addrs: dict[str, str] = {}
        self._fetched_at = -math.inf
        self._refresh_lock = trio.Lock()
        self._unsupported_until = -math.inf
        self._conns: dict[str, RpcConnection] = {}
        self._connecting: dict[str, trio.Event] = {}
        self._down_until: dict[str, float] = {}
        self._latency: dict[str, float] = {}
        self.stats = {"puts": 0, "put_fallbacks": 0, "gets": 0, "get_fallbacks": 0,
                      "refreshes": 0}
        """Counts of direct puts/gets done, of those that fell back, of layout fetches."""

    # ---------------------------------------------------------------- layout

    async def refresh(self) -> None:
        """Fetch the live layout versions from the home node (one fetch at a time)."""
        seen = self._fetched_at
        async with self._refresh_lock:
            if self._fetched_at != seen:  # another task fetched it meanwhile
                return
            reply, _ = await self._home().call(CLIENT_LAYOUT, {}, timeout=self.timeout)
            try:
                rows = [(int(v), w) for v, w in reply["versions"]]
                synced = {str(k): int(x) for k, x in dict(reply.get("synced") or {}).items()}
                home = str(reply["node"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ProtocolError(f"malformed {CLIENT_LAYOUT} reply: {exc!r}") from None
            layouts: list[tuple[int, Layout]] = []
            built: dict[int, tuple[Any, Layout]] = {}
            for v, w in rows:
                old = self._built.get(v)
                lay = old[1] if old is not None and old[0] == w else Layout(cluster_from_wire(w))
                built[v] = (w, lay)
                layouts.append((v, lay))
            self._built = built
            self.layout = LiveLayout(layouts, synced=lambda nid: synced.get(nid, 0))
            self._versions = [v for v, _ in layouts]
            self._addrs = {nid: lay.node(nid).addr for _, lay in layouts for nid in lay.node_ids}
            self.home_id = home
            level = reply.get("compression_level")
            self.level = level if isinstance(level, int) and not isinstance(level, bool) else None
            self._fetched_at = trio.current_time()
            self.stats["refreshes"] += 1

    async def _ready(self) -> bool:
        now = trio.current_time()
        if now < self._unsupported_until:
            return False
        if self.layout is None or now - self._fetched_at > self.refresh_interval:
            try:
                await self.refresh()
            except (BlocknodeError, OSError) as exc:
                log.info("direct path off for %gs: cannot fetch the layout: %s",
                         self.refresh_interval, exc)
                self._unsupported_until = now + self.refresh_interval
                return self.layout is not None
        return True

    # ------------------------------------------------------------ connections

    async def _conn(self, nid: str) -> RpcConnection:
        if nid == self.home_id:
            return self._home()
        while True:
            conn = self._conns.get(nid)
            if conn is not None and not conn.closed:
                return conn
            if self._down_until.get(nid, -math.inf) > trio.current_time():
                raise NodeUnreachable(f"node {nid}: unreachable a moment ago")
            pending = self._connecting.get(nid)
            if pending is None:
                break
            await pending.wait()
        addr = self._addrs.get(nid)
        if addr is None:
            raise NodeUnreachable(f"node {nid}: no address in the layout")
        done = self._connecting[nid] = trio.Event()
        try:
            conn = await open_connection(
                addr, self._key.secret, local_id=self._key.id, role=ROLE_CLIENT,
                expected_peer_id=nid, connect=self._connect,
                connect_timeout=self.connect_timeout, handshake_timeout=self.connect_timeout,
                max_message_size=self.max_message_size)
            await self._nursery.start(conn.run)
            self._conns[nid] = conn
            return conn
        except (BlocknodeError, OSError):
            self._down_until[nid] = trio.current_time() + DOWN_RETRY
            raise
        finally:
            del self._connecting[nid]
            done.set()

    async def _call(self, nid: str, kind: str, fields: dict[str, Any],
                    data: bytes | None = None) -> tuple[dict[str, Any], bytes | None]:
        conn = await self._conn(nid)
        start = trio.current_time()
        try:
            reply = await conn.call(kind, fields, data, timeout=self.timeout)
        except (NodeUnreachable, OSError):
            self._down_until[nid] = trio.current_time() + DOWN_RETRY
            raise
        took = trio.current_time() - start
        old = self._latency.get(nid)
        self._latency[nid] = took if old is None else 0.8 * old + 0.2 * took
        return reply

    def _is_up(self, nid: str) -> bool:
        return self._down_until.get(nid, -math.inf) <= trio.current_time()

    # ------------------------------------------------------------------ puts

    async def put(self, data: bytes, ref_id: str) -> bytes | None:
        """Put one block to its write nodes directly; its hash, or None when the caller
        must fall back to the home node. Raises the replicas' `Forbidden`/`HashMismatch`."""
        if not await self._ready():
            return None
        level = self.level

        def prepare() -> tuple[bytes, bytes | None]:
            # The hash and the form to send; no copy of the block (the bytes go as they are).
            return block.hash_of(data, block_size=self.block_size), block.zstd_form(data, level)

        h, z = await threads.run_sync(prepare) if len(data) > THREAD_HASH_MIN else prepare()
        form = z if z is not None else data
        extra = {"z": True} if z is not None else {"form_final": True} if level is not None else {}
        for attempt in range(2):
            outcome = await self._write(h, ref_id, form, extra)
            if outcome == "ok":
                self.stats["puts"] += 1
                return h
            if outcome != "refresh" or attempt:
                break
            await self._refresh_now()
        self.stats["put_fallbacks"] += 1
        return None

    async def _refresh_now(self) -> None:
        try:
            await self.refresh()
        except (BlocknodeError, OSError) as exc:
            log.info("cannot fetch the layout again: %s", exc)

    async def _write(self, h: bytes, ref_id: str, data: bytes, extra: dict[str, Any]) -> str:
        """One round to the write nodes: "ok" (every version's quorum), "refresh" (a
        replica says the layout changed) or "fallback"."""
        assert self.layout is not None
        write_sets = self.layout.write_sets(h)
        sets = [(frozenset(nodes), q) for nodes, q in write_sets]
        nodes = list(dict.fromkeys(n for ns, _ in write_sets for n in ns))
        fields = {"hash": h, "ref_id": ref_id, "versions": list(self._versions), **extra}
        send, receive = trio.open_memory_channel[tuple[str, BaseException | None]](len(nodes))
        for nid in nodes:
            self._nursery.start_soon(self._put_one, nid, fields, data, send)
        acked: set[str] = set()
        failed: dict[str, BaseException] = {}
        while len(acked) + len(failed) < len(nodes):
            nid, err = await receive.receive()
            if err is None:
                acked.add(nid)
                if all(len(acked & ns) >= q for ns, q in sets):
                    return "ok"
            else:
                failed[nid] = err
                if any(len(ns - failed.keys()) < q for ns, q in sets):
                    break  # a version's quorum is out of reach
        log.debug("direct put of %s: no quorum: %s", h.hex(), failed)
        for err in failed.values():
            if isinstance(err, Forbidden | HashMismatch):
                raise err
        if any(_code(err) in _REFRESH_CODES for err in failed.values()):
            return "refresh"
        return "fallback"

    async def _put_one(self, nid: str, fields: dict[str, Any], data: bytes,
                       send: trio.MemorySendChannel[tuple[str, BaseException | None]]) -> None:
        try:
            await self._call(nid, CLIENT_PUT_DIRECT, fields, data)
            outcome: BaseException | None = None
        except Exception as exc:  # noqa: BLE001 - a failed replica; the quorum decides
            if not isinstance(exc, BlocknodeError | OSError):
                log.warning("direct put to %s failed unexpectedly: %r", nid, exc)
            outcome = exc
        send.send_nowait((nid, outcome))  # room for every node: never blocks

    # ------------------------------------------------------------------ gets

    async def get(self, h: bytes) -> bytes | None:
        """A block's bytes from a replica, verified here; None when the caller must fall
        back to the home node (no replica answered with a valid copy).

        The first replica is asked in the calling task, under a deadline of the hedge
        delay (no nursery, channel or task: the common case, a replica that answers in
        time, costs one RPC and one hash). Only when it fails or is slow does the get
        go to the hedged machinery (`_hedged`) for the others, a slow first replica
        asked again last. A first replica with no connection open yet is asked by the
        hedged machinery from the start (its handshake is not cut at the deadline).
        """
        if not await self._ready():
            return None
        assert self.layout is not None
        order = self.layout.read_nodes(h, self.home_id, is_up=self._is_up,
                                       latency=self._latency.get)
        if not order:
            found = None
        elif not self._connected(order[0]):
            # A connection to open first: not under the hedge deadline (a handshake cut
            # short at every get would never finish); the hedged path opens it in a task.
            found = await self._hedged(h, order)
        else:
            first = order[0]
            with trio.move_on_after(self._hedge_after(first)):
                try:
                    found = await self._ask(h, first)
                except Forbidden:
                    raise
                except Exception as exc:  # noqa: BLE001 - this replica failed; the next is asked
                    self._failed_ask(h, first, exc)
                    found, order = None, order[1:]
                if found is not None:
                    self.stats["gets"] += 1
                    return found
            if order and order[0] == first:  # slow: the others first, then it again
                order = [*order[1:], first]
            found = await self._hedged(h, order) if order else None
        if found is None:
            self.stats["get_fallbacks"] += 1
            return None
        self.stats["gets"] += 1
        return found

    def _connected(self, nid: str) -> bool:
        """Whether a call to `nid` goes on a connection already open (the home one, or
        one opened before)."""
        if nid == self.home_id:
            return True
        conn = self._conns.get(nid)
        return conn is not None and not conn.closed

    def _hedge_after(self, nid: str) -> float:
        """Seconds to wait for `nid` before asking the next replica as well: `hedge_delay`,
        or twice the latency this node usually has (a loaded cluster is not asked twice)."""
        usual = self._latency.get(nid)
        return max(self.hedge_delay, 2 * usual) if usual is not None else self.hedge_delay

    async def _ask(self, h: bytes, nid: str) -> bytes:
        """Block `h` from replica `nid`, checked here against its hash: the very bytes the
        RPC gave (no `VerifiedBlock` copy). Raises what the replica or the check raised."""
        _, data = await self._call(nid, CLIENT_GET_DIRECT, {"hash": h})
        raw = data or b""
        if len(raw) > THREAD_HASH_MIN:
            await threads.run_sync(
                lambda: block.check_block(raw, h, block_size=self.block_size))
        else:
            block.check_block(raw, h, block_size=self.block_size)
        return raw

    @staticmethod
    def _failed_ask(h: bytes, nid: str, exc: BaseException) -> None:
        if not isinstance(exc, BlocknodeError | OSError):
            log.warning("direct get from %s failed unexpectedly: %r", nid, exc)
        elif not isinstance(exc, BlockNotFound):
            log.debug("direct get of %s from %s: %s", h.hex(), nid, exc)

    async def _hedged(self, h: bytes, order: list[str]) -> bytes | None:
        """Ask the replicas of `order` hedged: the next one as soon as one fails or after
        `_hedge_after` it; the first copy that verifies here wins, the others are
        cancelled. None when none did; `Forbidden` raised."""
        send, receive = trio.open_memory_channel[tuple[str, bytes | BaseException]](len(order))

        async def ask(nid: str) -> None:
            try:
                outcome: bytes | BaseException = await self._ask(h, nid)
            except Exception as exc:  # noqa: BLE001 - this replica failed; the next is asked
                outcome = exc
            send.send_nowait((nid, outcome))

        found: bytes | None = None
        refused: Forbidden | None = None
        async with trio.open_nursery() as nursery:
            started = pending = 0
            while started < len(order) or pending:
                if pending == 0:
                    nursery.start_soon(ask, order[started])
                    started, pending = started + 1, pending + 1
                hedge = self._hedge_after(order[started - 1]) if started < len(order) else math.inf
                with trio.move_on_after(hedge):
                    nid, outcome = await receive.receive()
                    pending -= 1
                    if isinstance(outcome, Forbidden):
                        refused = outcome
                        break
                    if not isinstance(outcome, BaseException):
                        found = outcome
                        break
                    self._failed_ask(h, nid, outcome)
                    continue
                nursery.start_soon(ask, order[started])  # slow: ask the next one as well
                started, pending = started + 1, pending + 1
            nursery.cancel_scope.cancel()
        if refused is not None:
            raise refused
        return found
