"""One authenticated RPC connection over any `trio.abc.Stream`.

A connection is made by `blocknode.rpc.connect` (connect + handshake);
`RpcConnection` then runs the session. A client connection is the case with
no request handler.

- `run()` owns three kinds of tasks in one nursery: one **reader** (decrypts
  frames, hands responses to waiting callers by request id, starts one task
  per incoming request), one **writer** (the only task that sends; it drains
  the priority scheduler), and the **handler tasks**. `run()` returns when the
  connection ends for any reason (peer closed, broken transport, protocol or
  authentication failure, an error in this connection's own code, `aclose()`);
  it never raises (except for cancellation): it records `close_reason` (and
  `fault` for the last two kinds, logged with the peer), fails every waiting
  call with `NodeUnreachable` and closes the stream. Whoever calls `run()` owns
  the connection; nothing that happens on it reaches the owner's nursery.
- A request id is the peer's to choose, but reusing one while its request is
  still being answered is a protocol error (it closes the connection).
- `call()` may be used from any task while `run()` runs. With `timeout=` it
  raises `RpcTimeout` after that many seconds; without, put a cancel scope
  around it (cancelling drops or aborts the unsent rest of the request; a late
  response is ignored).
- Handlers: ``async def handler(peer, kind, fields, data) -> (fields, data)``;
  `peer` is the `Peer` the handshake proved (its role and id).
  Exceptions become error replies (`errors.error_reply`) and come back to the
  caller as `RemoteCallError` subclasses. ``"_ping"`` is answered here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, overload

import trio

from blocknode.errors import (
    LocalProtocolError,
    NodeUnreachable,
    ProtocolError,
    RemoteProtocolError,
    RpcTimeout,
)
from blocknode.rpc.errors import error_reply, remote_error
from blocknode.rpc.handshake import Peer
from blocknode.rpc.session import Session
from blocknode.rpc.wire import (
    MSG_ERROR,
    MSG_REQUEST,
    MSG_RESPONSE,
    NEED_DATA,
    PRIO_HIGH,
    PRIO_NORMAL,
    Message,
    OutgoingMessage,
    encode_head,
)

__all__ = ["PING_KIND", "TRANSPORT_ERRORS", "Handler", "RpcConnection"]

log = logging.getLogger("blocknode.rpc")

Handler = Callable[[Peer, str, dict[str, Any], bytes | None], Awaitable[tuple[dict[str, Any], bytes | None]]]
"""``async def handler(peer, kind, fields, data) -> (reply fields, reply data)``."""

PING_KIND = "_ping"


class RequestBudget(Protocol):
    """A byte semaphore (e.g. `blocknode.rpc.network.ByteBudget`)."""

    async def acquire(self, n: int) -> int: ...

    def release(self, n: int) -> None: ...


class ReplyBudget(RequestBudget, Protocol):
    """A byte semaphore that can also be overdrawn (`blocknode.rpc.network.ByteBudget`)."""

    def take(self, n: int) -> None: ...


class _Expired(Exception):
    """The read deadline passed (idle or stalled connection)."""


_NO_REQUEST = Message(MSG_REQUEST, "", {})
"""Stands for a request that was dropped before it could be read."""

_RECV_SIZE = 256 * 1024
_FAST_READS = 8
"""While a message of several chunks is arriving, up to this many reads in a row are
tried straight on the socket (no cancel scope, no wait, no checkpoint: ≈ 20 reads per
MiB on loopback, each otherwise paying for all three); then one read goes the normal
way, which checkpoints (other tasks run, cancellation is seen)."""
TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What a broken transport raises (each becomes `NodeUnreachable`)."""


class _Waiter:
    __slots__ = ("event", "message")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.message: Message | None = None


class RpcConnection:
    """An established connection: concurrent calls both ways over one stream.

    `session` is the sans-io state after the handshake (it carries the peer's
    authenticated id and any bytes read past the handshake); `peer` is who the
    handshake proved the other end is (a bare id: a node). `handler` serves
    the peer's requests (None: every request gets a ``bad_request`` error).
    `max_inflight` bounds concurrently running handler tasks; beyond it a
    request is answered at once with code ``busy``. With `request_budget`, the
    payload bytes of requests being handled count against it: the reader stops
    reading (TCP pushes back on the peer) until the budget has room, so a flood
    of large requests cannot grow memory without bound.

    Replies: with `reply_budget`, the payload of every reply takes from it from
    when it is queued until it is sent; with `reply_size` too, a request is not
    handed to its handler before ``reply_size(kind)`` bytes (the largest reply
    its kind may carry) are reserved there. And while more than `reply_share`
    reply bytes of this connection are reserved or unsent, the reader stops
    reading: a peer that does not read its answers stops being served instead
    of growing the send queue.

    Timeouts (None: none): with nothing in flight either way for
    `idle_timeout` seconds, the connection closes; when a message being
    received gets no data, or a send cannot proceed, for `stall_timeout`
    seconds, it closes too (the peer is gone, or holds our buffers hostage).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        session: Session,
        peer: Peer | str,
        handler: Handler | None = None,
        *,
        max_inflight: int = 256,
        request_budget: RequestBudget | None = None,
        reply_budget: ReplyBudget | None = None,
        reply_share: int | None = None,
        reply_size: Callable[[str], int] | None = None,
        idle_timeout: float | None = None,
        stall_timeout: float | None = None,
        addr: str = "",
    ) -> None:
        self.stream = stream
        self.addr = addr
        """The remote address, when known (for messages and logs)."""
        self._request_budget = request_budget
        self._reply_budget = reply_budget
        self._reply_share = reply_share
        self._reply_size = reply_size
        self._reply_taken: dict[int, int] = {}  # request id -> reply bytes held for it
        self.reply_bytes = 0
        """Reply bytes this connection holds: reserved for running handlers, or queued."""
        self._reply_room = trio.Event()
        self._idle_timeout = idle_timeout
        self._stall_timeout = stall_timeout
        self._last_active = trio.current_time()
        self._read_since = self._last_active
        self._recv_scope: trio.CancelScope | None = None
        self.session = session
        self.peer = peer if isinstance(peer, Peer) else Peer.node(peer)
        self.peer_id = self.peer.id
        self._handler = handler
        self._max_inflight = max_inflight
        self._inflight = 0
        self._waiters: dict[int, _Waiter] = {}
        self._serving: set[int] = set()  # ids of the peer's requests not yet fully answered
        self._next_id = 1
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._done = trio.Event()
        self.close_reason: BaseException | None = None
        self.fault: Exception | None = None
        # The socket under a `trio.SocketStream` (non-blocking), for the reads tried
        # without waiting while a message is arriving (`_receive_in_time`).
        self._raw_sock = (getattr(stream.socket, "_sock", None)
                          if isinstance(stream, trio.SocketStream) else None)
        self._fast_reads = 0
        """What closed the connection if the peer broke the protocol or our code failed."""

    @property
    def closed(self) -> bool:
        """True once the connection has ended (or `run` was never started and it was closed)."""
        return self._closed

    # -- running -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; see the module docstring.

        Never raises except for cancellation: a protocol violation by the peer
        or an error in this connection's own code is logged with the peer,
        recorded in `fault`, and closes this connection only.
        """
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._scope = nursery.cancel_scope
                    if self._closed:
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(self._guard, self._writer)
                    task_status.started()
                    await self._guard(self._reader)
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # the guards catch everything; this is a last line
                self._on_fault(exc)
        finally:
            self._shutdown(self.close_reason or NodeUnreachable("connection closed"))
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
            self._done.set()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one of this connection's tasks; whatever it raises ends this connection only."""
        try:
            await fn(*args)
        except TRANSPORT_ERRORS as exc:
            self._fail(NodeUnreachable(f"connection to {self._who} broke: {exc!r}"))
        except Exception as exc:
            self._on_fault(exc)

    def _on_fault(self, exc: Exception) -> None:
        """The peer broke the protocol (`ProtocolError`) or our own code failed: close."""
        if self.fault is None and not self._closed:
            self.fault = exc
            if isinstance(exc, ProtocolError):  # includes AuthenticationError
                log.warning("connection with %s closed: %s", self._who, exc)
            else:
                log.error("connection with %s failed; closing it", self._who, exc_info=exc)
        self._fail(exc)

    @property
    def _who(self) -> str:
        return f"{self.peer} ({self.addr})" if self.addr else str(self.peer)

    def close_soon(self, reason: BaseException) -> None:
        """Close the connection without waiting (`run` cleans up); `reason` is what
        pending calls and `close_reason` report."""
        if self._scope is None:
            self.close_reason = self.close_reason or reason
            self._closed = True
            return
        self._fail(reason)

    def _fail(self, exc: BaseException) -> None:
        if self.close_reason is None:
            self.close_reason = exc
        if self._scope is not None:
            self._scope.cancel()

    def _shutdown(self, reason: BaseException) -> None:
        self._closed = True
        for waiter in self._waiters.values():
            waiter.event.set()  # message None -> NodeUnreachable
        self._waiters.clear()
        self.session.scheduler.drain()
        self.session.assembler.close()
        for sid in list(self._reply_taken):
            self._release_reply(sid)
        if self.close_reason is None:
            self.close_reason = reason

    async def aclose(self) -> None:
        """Close the connection and wait until `run` has cleaned up."""
        if self.close_reason is None:
            self.close_reason = NodeUnreachable("connection closed locally")
        if self._scope is None:
            self._closed = True
            self._shutdown(self.close_reason)
            await trio.aclose_forcefully(self.stream)
            return
        self._scope.cancel()
        await self._done.wait()

    def _idle(self) -> bool:
        return not (self._waiters or self._inflight or self._serving or self.session.pending
                    or self.session.assembler.partial_count)

    def _read_deadline(self) -> float:
        """When the read under way gives up: a stalled message, or an idle connection."""
        if self._stall_timeout is not None and self.session.assembler.partial_count:
            return self._read_since + self._stall_timeout
        if self._idle_timeout is not None and self._idle():
            return self._last_active + self._idle_timeout
        return math.inf

    def _touch(self) -> None:
        """Something happened on the connection: move the read deadline."""
        self._last_active = trio.current_time()
        if self._recv_scope is not None:
            self._recv_scope.deadline = self._read_deadline()

    async def _receive_in_time(self) -> None:
        if (self._raw_sock is not None and self._fast_reads < _FAST_READS
                and self.session.assembler.partial_count):
            try:
                n = self._raw_sock.recv_into(self.session.get_buffer())
            except (BlockingIOError, InterruptedError):
                pass  # nothing there yet: wait for it below
            else:
                self._fast_reads += 1
                if n:
                    self.session.buffer_updated(n)
                else:
                    self.session.eof_received()
                return
        self._fast_reads = 0
        self._read_since = trio.current_time()  # time spent paused by budgets is not a stall
        while True:
            with trio.CancelScope(deadline=self._read_deadline()) as scope:
                self._recv_scope = scope
                try:
                    await self._receive()
                    return
                finally:
                    self._recv_scope = None
            if trio.current_time() >= self._read_deadline():
                if self.session.assembler.partial_count:
                    raise _Expired(f"no data for a message in progress for {self._stall_timeout}s")
                raise _Expired(f"idle for {self._idle_timeout}s")

    async def _receive(self) -> None:
        """Receive once into the session (the reader drained it first)."""
        stream = self.stream
        session = self.session
        if isinstance(stream, trio.SocketStream):
            # Straight into the decoder's buffer: a large frame's own buffer, or the
            # shared one for prefixes and small frames (no copy in user space).
            n = await stream.socket.recv_into(session.get_buffer())
            if n:
                session.buffer_updated(n)
            else:
                session.eof_received()
            return
        session.receive_data(await stream.receive_some(_RECV_SIZE))

    async def _reader(self) -> None:
        session = self.session
        while True:
            while (item := session.next_message()) is not NEED_DATA:
                is_response, sid, msg = item  # type: ignore[misc]
                if is_response:
                    self._on_response(sid, msg)
                    continue
                self._check_request(sid, msg)
                if msg is None:  # dropped for want of the receive budget
                    self._reply(sid, _NO_REQUEST, MSG_ERROR, {
                        "code": "busy", "message": "request dropped: the receive buffer budget is full"},
                        None)
                    continue
                taken = await self._admit(sid, msg)
                self._dispatch(sid, msg, taken)
            if session.decoder.at_eof:
                self.close_reason = self.close_reason or NodeUnreachable(
                    f"{self._who} closed the connection"
                )
                return
            try:
                await self._receive_in_time()
            except _Expired as exc:
                self.close_reason = NodeUnreachable(f"closed the connection with {self._who}: {exc}")
                log.info("%s", self.close_reason)
                return
            self._touch()

    async def _writer(self) -> None:
        session = self.session
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while session.pending:
                view, finished = session.data_to_send()
                if self._stall_timeout is None:
                    await self.stream.send_all(view)
                else:
                    with trio.move_on_after(self._stall_timeout) as scope:
                        await self.stream.send_all(view)
                    if scope.cancelled_caught:
                        self._fail(NodeUnreachable(
                            f"{self._who} read nothing for {self._stall_timeout}s; connection closed"))
                        return
                for msg in finished:
                    if msg.is_response:
                        self._serving.discard(msg.stream_id)
                        self._release_reply(msg.stream_id)
            self._touch()

    def _queue(self, msg: OutgoingMessage) -> None:
        self.session.queue(msg)
        self._wake.set()

    # -- incoming ---------------------------------------------------------------

    def _on_response(self, sid: int, msg: Message | None) -> None:
        if msg is None:  # dropped for want of the receive budget
            msg = Message(MSG_ERROR, "", {
                "code": "busy", "message": "reply dropped: the receive buffer budget was full"})
        elif msg.type == MSG_REQUEST:
            raise RemoteProtocolError("request sent with the response flag")
        waiter = self._waiters.pop(sid, None)
        if waiter is not None:  # else: the caller gave up; drop it
            waiter.message = msg
            waiter.event.set()

    def _check_request(self, sid: int, msg: Message | None) -> None:
        if msg is not None and msg.type != MSG_REQUEST:
            raise RemoteProtocolError("response sent without the response flag")
        if sid in self._serving:
            raise RemoteProtocolError(f"request id {sid} reused while that request is in flight")
        self._serving.add(sid)  # until its answer has been sent

    def _handled(self, msg: Message) -> bool:
        return (msg.kind != PING_KIND and self._handler is not None
                and self._inflight < self._max_inflight)

    async def _admit(self, sid: int, msg: Message) -> int:
        """Wait (not reading meanwhile) until the request may be handled; its payload's share."""
        if self._reply_share is not None:
            while self.reply_bytes > self._reply_share:
                await self._reply_room.wait()
        if not self._handled(msg):
            return 0
        if self._reply_size is not None and self._reply_budget is not None:
            size = self._reply_size(msg.kind)
            if size:
                self._hold_reply(sid, await self._reply_budget.acquire(size))
        if self._request_budget is not None and msg.data is not None:
            return await self._request_budget.acquire(len(msg.data))
        return 0

    def _dispatch(self, sid: int, msg: Message, taken: int = 0) -> None:
        if self._handled(msg):
            assert self._nursery is not None
            self._inflight += 1
            self._nursery.start_soon(self._guard, self._handle, sid, msg, taken)
            return
        if taken:  # not handled after all: nothing holds the bytes
            assert self._request_budget is not None
            self._request_budget.release(taken)
        if msg.kind == PING_KIND:
            self._reply(sid, msg, MSG_RESPONSE, {}, None)
        elif self._handler is None:
            self._reply(sid, msg, MSG_ERROR, {"code": "bad_request", "message": "no handler"}, None)
        else:
            self._reply(sid, msg, MSG_ERROR, {"code": "busy", "message": "too many requests"}, None)

    def _hold_reply(self, sid: int, n: int) -> None:
        """Count `n` more reply bytes for request `sid` (already taken from the budget)."""
        if n:
            self._reply_taken[sid] = self._reply_taken.get(sid, 0) + n
            self.reply_bytes += n

    def _release_reply(self, sid: int) -> None:
        """Request `sid`'s reply is sent (or will never be): free what it held."""
        n = self._reply_taken.pop(sid, 0)
        if n:
            self._unhold_reply(n)

    def _unhold_reply(self, n: int) -> None:
        self.reply_bytes -= n
        if self._reply_budget is not None:
            self._reply_budget.release(n)
        if self._reply_share is None or self.reply_bytes <= self._reply_share:
            self._reply_room.set()
            self._reply_room = trio.Event()

    def _reply(
        self, sid: int, req: Message, msg_type: int, fields: dict[str, Any], data: bytes | None
    ) -> None:
        if self._closed:
            self._release_reply(sid)
            return
        try:
            head = encode_head(msg_type, req.kind, fields, data is not None, req.priority)
        except LocalProtocolError as exc:
            log.error("reply to %r from %s is not encodable: %s", req.kind, self._who, exc)
            fields = {"code": "internal", "message": "reply not encodable"}
            head = encode_head(MSG_ERROR, req.kind, fields, False, req.priority)
            data = None
        view = memoryview(data) if data is not None else None
        if self._reply_budget is not None:  # the reply holds exactly its own size until sent
            held = self._reply_taken.get(sid, 0)
            size = len(view) if view is not None else 0
            if size > held:
                self._reply_budget.take(size - held)
                self._hold_reply(sid, size - held)
            elif size < held:
                self._reply_taken[sid] = size
                self._unhold_reply(held - size)
        self._queue(OutgoingMessage(sid, True, head, view, req.priority))

    async def _handle(self, sid: int, req: Message, taken: int = 0) -> None:
        assert self._handler is not None
        try:
            if req.data is None or getattr(self._handler, "takes_views", False):
                # A handler that takes views gets the reassembly buffer's view: no copy of
                # the block between the wire and the layer that hashes and writes it.
                data = req.data
            else:
                data = bytes(req.data)
            req.data = None  # the reassembly buffer goes once the handler lets go of it
            try:
                result = await self._handler(self.peer, req.kind, req.fields, data)
                fields, out = result
                if not isinstance(fields, dict) or not (out is None or isinstance(out, bytes | bytearray | memoryview)):
                    raise TypeError(f"handler for {req.kind!r} returned {type(result).__name__}, not (dict, bytes | None)")
            except Exception as exc:
                self._reply(sid, req, MSG_ERROR, error_reply(exc, peer=self._who, kind=req.kind), None)
            else:
                self._reply(sid, req, MSG_RESPONSE, fields, out)
        finally:
            self._inflight -= 1
            self._touch()
            if taken:
                assert self._request_budget is not None
                self._request_budget.release(taken)

    # -- outgoing ---------------------------------------------------------------

    def _new_id(self) -> int:
        while True:
            sid = self._next_id
            self._next_id = sid + 1 if sid < 0xFFFFFFFF else 1
            if sid not in self._waiters:
                return sid

    @overload
    async def call(
        self,
        kind: str,
        fields: dict[str, Any],
        data: bytes | bytearray | memoryview | None = None,
        *,
        priority: int = PRIO_NORMAL,
        timeout: float | None = None,
        view: Literal[False] = False,
    ) -> tuple[dict[str, Any], bytes | None]: ...

    @overload
    async def call(
        self,
        kind: str,
        fields: dict[str, Any],
        data: bytes | bytearray | memoryview | None = None,
        *,
        priority: int = PRIO_NORMAL,
        timeout: float | None = None,
        view: Literal[True],
    ) -> tuple[dict[str, Any], memoryview | None]: ...

    async def call(
        self,
        kind: str,
        fields: dict[str, Any],
        data: bytes | bytearray | memoryview | None = None,
        *,
        priority: int = PRIO_NORMAL,
        timeout: float | None = None,
        view: bool = False,
    ) -> tuple[dict[str, Any], bytes | memoryview | None]:
        """Send a request and wait for its answer.

        The reply's data comes back as `bytes` (a copy); with ``view=True`` as
        a writable `memoryview` of the buffer the reply was reassembled in
        (decrypted straight into it, no copy): that buffer belongs to the
        caller alone from then on.

        With `timeout`, raises `RpcTimeout` after that many seconds; without,
        there is no deadline (wrap it). Raises `NodeUnreachable` if the
        connection is or becomes closed, `RemoteCallError` (a `RemoteError`) if
        the peer answered with an error, `ProtocolError` if `fields` are not
        msgpack-able.
        """
        if timeout is None:
            return await self._call(kind, fields, data, priority, view)
        with trio.move_on_after(timeout):
            return await self._call(kind, fields, data, priority, view)
        where = f" at {self.addr}" if self.addr else ""
        raise RpcTimeout(f"node {self.peer_id}{where} did not answer {kind!r} within {timeout}s")

    async def _call(
        self,
        kind: str,
        fields: dict[str, Any],
        data: bytes | bytearray | memoryview | None,
        priority: int,
        view: bool = False,
    ) -> tuple[dict[str, Any], bytes | memoryview | None]:
        if self._closed:
            raise NodeUnreachable(f"connection to {self.peer_id} is closed: {self.close_reason}")
        head = encode_head(MSG_REQUEST, kind, fields, data is not None, priority)
        sid = self._new_id()
        waiter = _Waiter()
        self._waiters[sid] = waiter
        msg = OutgoingMessage(sid, False, head, memoryview(data) if data is not None else None, priority)
        self._queue(msg)
        try:
            await waiter.event.wait()
        finally:
            if not waiter.event.is_set():  # cancelled: forget it, stop sending it
                self._waiters.pop(sid, None)
                self.session.cancel(msg.key)
                self._wake.set()
            self._touch()
        reply = waiter.message
        if reply is None:
            raise NodeUnreachable(
                f"connection to {self.peer_id} closed during {kind!r}: {self.close_reason}"
            )
        if reply.type == MSG_ERROR:
            raise remote_error(self.peer_id, reply.fields)
        out = reply.data
        if out is None:
            return reply.fields, None
        if view:  # the reassembly buffer's view: nothing else refers to it
            return reply.fields, out if isinstance(out, memoryview) else memoryview(out)
        return reply.fields, bytes(out)

    async def ping(self) -> float:
        """Round-trip time of a high-priority ping, in seconds (no deadline: wrap it)."""
        start = trio.current_time()
        await self.call(PING_KIND, {}, priority=PRIO_HIGH)
        return trio.current_time() - start
