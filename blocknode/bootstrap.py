"""Joining a running cluster with only this node's config and `bootstrap_peers`.

A node that has no layout yet (no stored state, and no cluster file listing it)
but has `bootstrap_peers` (``["host:port", ...]``) starts with an empty layout
(`LayoutService.has_layout` is False: it answers `status` and `layout show` and
refuses data requests, `NotJoined`) and runs `Bootstrap.run` beside its
listener, which is already up:

1. connect to a bootstrap peer (in a random order) as a node — the handshake
   proves the shared cluster secret (`rpc_secret`); the node's id need not be
   known there — and send it a `layout_sync` with this node's (empty) state,
   address and zone;
2. merge the state it answers with (versions, nodes and their addresses); the
   layout service then reaches every node of the layout and gossips with them
   (`LayoutService.run`), and every node records this one as *known but
   unassigned* (`layout show`, ``known``) from the address and zone its gossip
   carries;
3. while no peer answers, retry with backoff (`FIRST_RETRY_S` doubling up to
   `MAX_RETRY_S`), logging which peers failed and why.

It stores nothing until an operator runs `layout assign NODE --zone Z --capacity C`
(the address is known) and `layout apply`; the layout-sync worker then brings
it its partitions' references and blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from blocknode.errors import BlocknodeError
from blocknode.layout_state import LayoutState
from blocknode.protocol import LAYOUT_SYNC
from blocknode.rpc.connect import open_connection
from blocknode.rpc.handshake import ROLE_NODE
from blocknode.rpc.transport import Connector
from blocknode.rpc.wire import PRIO_HIGH

if TYPE_CHECKING:
    import random

    from blocknode.layout_service import LayoutService

__all__ = ["FIRST_RETRY_S", "MAX_RETRY_S", "Bootstrap"]

log = logging.getLogger(__name__)

FIRST_RETRY_S: Final = 1.0
MAX_RETRY_S: Final = 60.0


class Bootstrap:
    """Fetch the cluster's layout from `peers` until this node has one (module docstring)."""

    def __init__(self, service: LayoutService, peers: tuple[str, ...], secret: bytes, *,
                 connect: Connector | None, timeout: float, connect_timeout: float,
                 handshake_timeout: float, max_message_size: int, rng: random.Random,
                 urandom: Callable[[int], bytes]) -> None:
        self.service = service
        self.peers = peers
        self.secret = secret
        self.connect = connect
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.max_message_size = max_message_size
        self.rng = rng
        self.urandom = urandom
        self.attempts = 0
        self.errors: dict[str, str] = {}
        """Per bootstrap peer: why the last attempt failed."""

    async def fetch(self, addr: str) -> None:
        """One exchange with the node at `addr`: send our state, merge the answer."""
        conn = await open_connection(
            addr, self.secret, local_id=self.service.node_id, role=ROLE_NODE,
            connect=self.connect, connect_timeout=self.connect_timeout,
            handshake_timeout=self.handshake_timeout, max_message_size=self.max_message_size,
            rng=self.urandom)
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            try:
                reply, _ = await conn.call(LAYOUT_SYNC, self.service.sync_fields(),
                                           timeout=self.timeout, priority=PRIO_HIGH)
            finally:
                nursery.cancel_scope.cancel()
        if "state" in reply:
            await self.service.merge(LayoutState.from_wire(reply["state"]))
        if not self.service.has_layout:
            raise BlocknodeError(f"node at {addr} has no layout either (is it joining too?)")

    async def run(self) -> None:
        """Try every bootstrap peer, with backoff, until this node has a layout."""
        delay = FIRST_RETRY_S
        while not self.service.has_layout:
            order = list(self.peers)
            self.rng.shuffle(order)
            for addr in order:
                self.attempts += 1
                try:
                    await self.fetch(addr)
                except BlocknodeError as exc:
                    self.errors[addr] = f"{type(exc).__name__}: {exc}"
                    continue
                if self.service.has_layout:
                    s = self.service.state
                    log.info("joined the cluster: layout version %d (%s, %d nodes) from "
                             "bootstrap peer %s; this node stores nothing until `layout assign "
                             "%s --zone Z --capacity C` and `layout apply`", s.current,
                             s.digest(), len(s.current_cluster.nodes), addr, self.service.node_id)
                    return
            log.warning("no bootstrap peer answered (%s): retrying in %.0f s",
                        "; ".join(f"{a}: {e}" for a, e in sorted(self.errors.items())), delay)
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)
