"""Opening an authenticated connection: the one connect + handshake routine.

`open_connection` is used by `RpcNetwork` (to reach its peers) and by clients
(`open_client`): transport connect (any `Connector`), the sans-io handshake
driven by `handshake`, then an `RpcConnection` that is not running yet (its
owner starts `run()`).

A node connects with the cluster secret (role ``node``); a client with a
client key (role ``client``, see `blocknode.rpc.handshake`). `open_client` is
the client's case as an async context manager: the connection (no request
handler) runs in a nursery the context manager holds, and is closed on exit.
Errors: `NodeUnreachable` (cannot connect, timed out, the connection broke, the
node is at its cap), `AuthenticationError` (wrong cluster secret, unknown or
revoked client key), `ProtocolError` (version mismatch, wrong node id).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from blocknode.errors import AuthenticationError, NodeUnreachable, ProtocolError
from blocknode.rpc.connection import TRANSPORT_ERRORS, Handler, RpcConnection
from blocknode.rpc.handshake import (
    ROLE_CLIENT,
    ROLE_NODE,
    ClientHandshake,
    ClientKey,
    HandshakeBusy,
    ServerHandshake,
)
from blocknode.rpc.session import Session
from blocknode.rpc.transport import Connector, tcp_connect
from blocknode.rpc.wire import DEFAULT_MAX_MESSAGE_SIZE, ReceiveBudget

__all__ = ["handshake", "open_client", "open_connection"]


async def handshake(stream: trio.abc.Stream, hs: ClientHandshake | ServerHandshake) -> None:
    """Run `hs` over `stream` until done. No deadline here: the caller sets one.

    Raises `AuthenticationError` / `ProtocolError` from the handshake, or
    `NodeUnreachable` if the transport breaks. On a handshake error a reject
    frame, if any, is sent best effort before raising.
    """
    try:
        out = hs.data_to_send()
        if out:
            await stream.send_all(out)
        while not hs.done:
            data = await stream.receive_some(4096)
            if not data:  # closed without a word: at a cap, shutting down, or not a node
                raise NodeUnreachable("the peer closed the connection during the handshake")
            hs.receive_data(data)
            try:
                hs.process()
            except ProtocolError:
                out = hs.data_to_send()
                if out:
                    with trio.move_on_after(1):
                        try:
                            await stream.send_all(out)
                        except TRANSPORT_ERRORS:
                            pass
                raise
            out = hs.data_to_send()
            if out:
                await stream.send_all(out)
    except TRANSPORT_ERRORS as exc:
        raise NodeUnreachable(f"connection broke during the handshake: {exc!r}") from exc


async def open_connection(
    addr: str,
    secret: bytes,
    *,
    local_id: str,
    role: str = ROLE_NODE,
    expected_peer_id: str | None = None,
    connect: Connector | None = None,
    connect_timeout: float,
    handshake_timeout: float,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    handler: Handler | None = None,
    rng: Callable[[int], bytes] = os.urandom,
    receive_budget: ReceiveBudget | None = None,
    **conn_kw: Any,
) -> RpcConnection:
    """Connect to `addr`, authenticate as `local_id`, return the connection (not running).

    `role` ``node``: `local_id` is this node's id, `secret` the cluster secret;
    ``client``: `local_id` is a client key's id, `secret` its secret.

    `connect_timeout` bounds the transport connect, `handshake_timeout` the
    handshake. `receive_budget` is the node's budget for incoming messages in
    progress; `conn_kw` go to `RpcConnection` (limits, budgets, timeouts).
    """
    who = f"node {expected_peer_id} at {addr}" if expected_peer_id else f"node at {addr}"
    try:
        with trio.fail_after(connect_timeout):
            stream = await (connect or tcp_connect)(addr)
    except trio.TooSlowError:
        raise NodeUnreachable(f"{who}: connect timed out after {connect_timeout}s") from None
    except (OSError, ValueError) as exc:
        raise NodeUnreachable(f"{who}: cannot connect: {exc}") from exc
    hs = ClientHandshake(local_id, secret, role=role, expected_peer_id=expected_peer_id, rng=rng)
    try:
        with trio.fail_after(handshake_timeout):
            await handshake(stream, hs)
    except BaseException as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise NodeUnreachable(f"{who}: handshake timed out after {handshake_timeout}s") from None
        if isinstance(exc, HandshakeBusy):
            raise NodeUnreachable(f"{who}: {exc}") from None
        if isinstance(exc, AuthenticationError):
            raise AuthenticationError(f"authentication with the {who} failed: {exc}") from None
        if isinstance(exc, NodeUnreachable | ProtocolError):
            raise type(exc)(f"{who}: {exc}") from None
        raise
    session = Session(hs.keys, decoder=hs.decoder, max_message_size=max_message_size,
                      receive_budget=receive_budget)
    return RpcConnection(stream, session, hs.keys.peer, handler, addr=addr, **conn_kw)


@asynccontextmanager
async def open_client(
    addr: str,
    key: ClientKey,
    *,
    timeout: float,
    expected_node_id: str | None = None,
    connect: Connector | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[RpcConnection]:
    """``async with open_client(addr, key, timeout=...) as conn:`` a running client connection.

    Authenticates with the client key `key`; `timeout` bounds the connect and
    the handshake each. The connection serves no requests; its engine runs in
    a nursery held here, so concurrent `conn.call(..., timeout=...)` from any
    task are fine. An error raised by the body comes out as itself (never
    wrapped in an exception group).
    """
    conn = await open_connection(
        addr, key.secret,
        local_id=key.id,
        role=ROLE_CLIENT,
        expected_peer_id=expected_node_id,
        connect=connect,
        connect_timeout=timeout,
        handshake_timeout=timeout,
        max_message_size=max_message_size,
    )
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            yield conn
        except BaseException as exc:  # re-raised below, outside the nursery
            failure = exc
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
