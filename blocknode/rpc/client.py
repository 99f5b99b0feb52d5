"""A standalone client connection (the CLI, applications): no nursery needed.

`open_client(addr, secret, timeout=...)` connects, authenticates as
``client-<random>`` and returns an `RpcClientConnection`. It has no background
task: the calling tasks take turns reading (whoever waits reads, and hands
other callers their answers), so it can be kept in a plain object and closed
with `aclose()` (or used as ``async with``). Concurrent calls are fine; the
connection only issues requests, it never serves any.

Errors: `AuthenticationError` (wrong cluster secret, with a clear message),
`ProtocolError` (version mismatch), `NodeUnreachable` (cannot connect, or the
connection broke), `RpcTimeout`, `RemoteCallError` and subclasses.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

import trio

from blocknode.errors import AuthenticationError, NodeUnreachable, ProtocolError, RpcTimeout
from blocknode.rpc.connection import handshake
from blocknode.rpc.errors import remote_error
from blocknode.rpc.handshake import ClientHandshake
from blocknode.rpc.session import Session
from blocknode.rpc.transport import Connector, tcp_connect
from blocknode.rpc.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MSG_ERROR,
    MSG_REQUEST,
    NEED_DATA,
    PRIO_NORMAL,
    Message,
    OutgoingMessage,
    encode_head,
)

__all__ = ["RpcClientConnection", "open_client"]

log = logging.getLogger("blocknode.rpc")
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class RpcClientConnection:
    """An authenticated connection to one node, for issuing calls."""

    def __init__(self, stream: trio.abc.Stream, session: Session, peer_id: str, addr: str) -> None:
        self.stream = stream
        self.session = session
        self.peer_id = peer_id
        """The node's authenticated id."""
        self.addr = addr
        self._send_lock = trio.Lock()
        self._reading = False
        self._progress = trio.Event()
        self._replies: dict[int, Message | None] = {}
        self._next_id = 1
        self._closed_reason: str | None = None

    @property
    def closed(self) -> bool:
        """True once closed or broken."""
        return self._closed_reason is not None

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _break(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._notify()

    async def call(
        self,
        kind: str,
        fields: dict[str, Any],
        data: bytes | None = None,
        *,
        timeout: float,
        priority: int = PRIO_NORMAL,
    ) -> tuple[dict[str, Any], bytes | None]:
        """Call `kind` on the node; return its (fields, data) within `timeout` s."""
        with trio.move_on_after(timeout):
            return await self._call(kind, fields, data, priority)
        raise RpcTimeout(f"node {self.peer_id} at {self.addr} did not answer {kind!r} within {timeout}s")

    async def _call(
        self, kind: str, fields: dict[str, Any], data: bytes | None, priority: int
    ) -> tuple[dict[str, Any], bytes | None]:
        if self._closed_reason is not None:
            raise NodeUnreachable(f"connection to {self.peer_id} is closed: {self._closed_reason}")
        head = encode_head(MSG_REQUEST, kind, fields, data is not None, priority)
        sid = self._next_id
        self._next_id = sid + 1 if sid < 0xFFFFFFFF else 1
        self._replies[sid] = None
        try:
            await self._send(OutgoingMessage(sid, False, head, memoryview(data) if data is not None else None, priority))
            reply = await self._wait(sid)
        finally:
            self._replies.pop(sid, None)
        if reply.type == MSG_ERROR:
            raise remote_error(self.peer_id, reply.fields)
        return reply.fields, bytes(reply.data) if reply.data is not None else None

    async def _send(self, msg: OutgoingMessage) -> None:
        async with self._send_lock:
            if self._closed_reason is not None:
                raise NodeUnreachable(f"connection to {self.peer_id} is closed: {self._closed_reason}")
            self.session.queue(msg)
            done = False
            try:
                while self.session.pending:
                    view, _ = self.session.data_to_send()
                    await self.stream.send_all(view)
                done = True
            except _TRANSPORT_ERRORS as exc:
                self._break(f"send failed: {exc!r}")
                raise NodeUnreachable(f"connection to {self.peer_id} broke: {exc!r}") from exc
            finally:
                if not done:  # cancelled mid-send: the stream is in an unknown state
                    self._break("a send was interrupted")

    async def _wait(self, sid: int) -> Message:
        while True:
            reply = self._replies.get(sid)
            if reply is not None:
                return reply
            if self._closed_reason is not None:
                raise NodeUnreachable(f"connection to {self.peer_id} closed: {self._closed_reason}")
            if self._reading:
                await self._progress.wait()
                continue
            self._reading = True
            try:
                await self._read_until(sid)
            finally:
                self._reading = False
                self._notify()

    async def _read_until(self, sid: int) -> None:
        session = self.session
        try:
            while self._replies.get(sid) is None:
                while (item := session.next_message()) is not NEED_DATA:
                    is_response, rid, msg = item  # type: ignore[misc]
                    if not is_response:
                        log.warning("node %s sent a request to a client; ignored", self.peer_id)
                    elif rid in self._replies:
                        self._replies[rid] = msg
                        self._notify()
                if self._replies.get(sid) is not None:
                    return
                if session.decoder.at_eof:
                    self._break(f"{self.peer_id} closed the connection")
                    return
                session.receive_data(await self.stream.receive_some(256 * 1024))
        except ProtocolError as exc:
            self._break(str(exc))
            raise
        except _TRANSPORT_ERRORS as exc:
            self._break(f"receive failed: {exc!r}")

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        self._break("closed locally")
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> RpcClientConnection:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def open_client(
    addr: str,
    secret: bytes,
    *,
    timeout: float,
    client_id: str | None = None,
    expected_node_id: str | None = None,
    connect: Connector | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> RpcClientConnection:
    """Connect to the node at `addr` and authenticate with the cluster `secret`.

    `timeout` bounds the connect and the handshake together. Raises
    `NodeUnreachable` (cannot connect / timed out), `AuthenticationError`
    (wrong secret) or `ProtocolError` (version mismatch, wrong node).
    """
    cid = client_id or f"client-{os.urandom(8).hex()}"
    connector = connect or tcp_connect
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await connector(addr)
            hs = ClientHandshake(cid, secret, expected_peer_id=expected_node_id)
            await handshake(stream, hs)
    except trio.TooSlowError:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise NodeUnreachable(f"node at {addr}: no connection within {timeout}s") from None
    except AuthenticationError as exc:
        await trio.aclose_forcefully(stream)  # type: ignore[arg-type]
        raise AuthenticationError(
            f"authentication with the node at {addr} failed: {exc}"
        ) from None
    except (OSError, ValueError) as exc:
        raise NodeUnreachable(f"node at {addr}: cannot connect: {exc}") from exc
    except BaseException:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    session = Session(hs.keys, decoder=hs.decoder, max_message_size=max_message_size)
    return RpcClientConnection(stream, session, hs.keys.peer_id, addr)
