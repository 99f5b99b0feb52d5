"""Sans-io framing for blocknode RPC: frames, messages, chunking and send priority.

Nothing here awaits or touches a socket (the h11 style): bytes go in with
`receive_data`, frames/messages come out of `next_frame`/`end_chunk`, or
`NEED_DATA`. Every malformed input raises `RemoteProtocolError` (a truncated
stream: `StreamTruncated`) — never a raw `KeyError`, `TypeError`,
`struct.error` or msgpack exception. Misuse by the caller (an unencodable
head, bytes after the end of stream) raises `LocalProtocolError`.

Layers, outermost first:

1. **Frame**: ``u32 BE length`` + ``length`` bytes. `FrameDecoder` refuses a
   length above its cap *before* buffering any of the body.
2. **Chunk** (the frame body after the handshake): a fixed 9-byte header
   ``u8 flags, u32 BE stream id, u32 BE total message length`` followed by the
   chunk body (at most `CHUNK_SIZE` plaintext bytes, AEAD-sealed with the
   header as associated data; see `handshake.SessionCipher`). The header is in
   clear (authenticated, not secret) so the receiver can decrypt each chunk
   straight into the message's preallocated buffer.
3. **Message**: ``u32 BE head length`` + msgpack ``[type, kind, fields, has_data, priority]``
   + the raw data payload (block bytes, never msgpack-encoded, never copied
   into the head).

Many messages share a connection: a request and its response carry the same
request id; the `FLAG_RESPONSE` bit keeps a node's own requests apart from its
responses to the peer's requests. `SendScheduler` interleaves the chunks of
concurrent messages by priority, so a 1 MiB background transfer never holds up
a small control call queued behind it.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from blocknode.errors import LocalProtocolError, RemoteProtocolError, StreamTruncated
from blocknode.fastpath import new_buffer
from blocknode.protocol import DEFAULT_BLOCK_SIZE, HEAD_MAX, MAX_BATCH_ROWS, max_message_size

__all__ = [
    "CHUNK_HEADER",
    "CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FLAG_ABORT",
    "FLAG_FIRST",
    "FLAG_LAST",
    "FLAG_RESPONSE",
    "HEAD_MAX",
    "MAX_BATCH_ROWS",
    "MSG_ERROR",
    "MSG_REQUEST",
    "MSG_RESPONSE",
    "NEED_DATA",
    "PRIO_BACKGROUND",
    "PRIO_HIGH",
    "PRIO_NORMAL",
    "FrameDecoder",
    "Message",
    "MessageAssembler",
    "OutgoingMessage",
    "ReceiveBudget",
    "SendScheduler",
    "decode_message",
    "encode_head",
    "fit_texts",
    "max_message_size",
    "pack_frame_prefix",
]


class _NeedData:
    """Sentinel: the decoder needs more bytes before it can produce anything."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

PRIO_HIGH: Final = 0
"""Small control and admin calls (pings, status)."""
PRIO_NORMAL: Final = 1
"""Client traffic."""
PRIO_BACKGROUND: Final = 2
"""Resync, offload and other bulk transfers."""
_PRIORITIES = (PRIO_HIGH, PRIO_NORMAL, PRIO_BACKGROUND)

CHUNK_SIZE: Final = 256 * 1024
"""Maximum plaintext bytes of one chunk. 256 KiB: a 1 MiB block is 4 chunks, so the
per-chunk work (one AEAD call each way, a frame, a scheduler turn, an event-loop
wakeup) is amortised over 4× more bytes than at 64 KiB (0.64× the CPU per MiB of the
sans-io session, bench/RESULTS.md), while a small message queued behind a block still
waits for at most one chunk (~0.2 ms on loopback). Both ends must agree: a node
refuses chunks larger than its own `CHUNK_SIZE`."""
DEFAULT_MAX_MESSAGE_SIZE: Final = max_message_size(DEFAULT_BLOCK_SIZE)
"""The cap for the default `block_size` (1 MiB)."""
PARTIAL_MESSAGES: Final = 64
"""Default cap on bytes received into one connection's incomplete messages, in maximum-size messages."""


def fit_texts(texts: list[str | None], room: int = HEAD_MAX - 1024) -> list[str | None]:
    """Cut each text so that the list takes at most `room` bytes in a msgpack head.

    Every text gets an equal share of `room` (long ones end with "..."), so a
    reply of at most `MAX_BATCH_ROWS` rows always encodes.
    """
    share = max(16, room // max(1, len(texts)) - 40)
    out: list[str | None] = []
    for t in texts:
        if t is not None and len(t.encode()) > share:
            t = t.encode()[: share - 3].decode(errors="ignore") + "..."
        out.append(t)
    return out

MSG_REQUEST: Final = 0
MSG_RESPONSE: Final = 1
MSG_ERROR: Final = 2
_MSG_TYPES = (MSG_REQUEST, MSG_RESPONSE, MSG_ERROR)

FLAG_FIRST: Final = 0x01
FLAG_LAST: Final = 0x02
FLAG_RESPONSE: Final = 0x04
FLAG_ABORT: Final = 0x08
_KNOWN_FLAGS = FLAG_FIRST | FLAG_LAST | FLAG_RESPONSE | FLAG_ABORT

_U32 = struct.Struct(">I")
CHUNK_HEADER: Final = struct.Struct(">BII")
"""flags, stream (request) id, total message length."""

_MAX_KIND = 128


def pack_frame_prefix(length: int) -> bytes:
    """The 4-byte big-endian length prefix of a frame."""
    return _U32.pack(length)


SHARED_BUFFER: Final = 64 * 1024
"""Bytes of a `FrameDecoder`'s reusable buffer for prefixes and small frames."""
SMALL_FRAME: Final = 16 * 1024
"""Frames of at most this many body bytes are read in the shared buffer; a larger
frame that is not complete when its prefix is parsed gets the frame buffer."""
_AFTER_LARGE_READ: Final = SMALL_FRAME + 4
"""After a large frame, the next read into the shared buffer takes at most this
much: the next frame is likely large too, and what of it lands in the shared
buffer is copied once into the frame buffer."""


class FrameDecoder:
    """Splits a byte stream into length-prefixed frames, receiving in place.

    Two ways in: `receive_data(bytes)` copies bytes in (any stream, tests), or,
    like asyncio's ``BufferedProtocol``, `get_buffer()` gives the writable view
    the next bytes belong in (``sock.recv_into(view)``) and `buffer_updated(n)`
    says how many arrived. Call `next_frame()` until `NEED_DATA` before each
    `get_buffer()`: then a large frame (body above `SMALL_FRAME`) is read
    straight into a frame buffer of its exact size, and prefixes and small
    frames land in one reusable buffer of `SHARED_BUFFER` bytes read with an
    offset (no per-frame allocation or memmove; the incomplete tail, at most one
    small frame, moves to the front when the end is near).

    `next_frame()` returns a **view valid until the next `get_buffer`,
    `receive_data` or `next_frame` call** (its bytes may be overwritten after
    that): decrypt or copy it at once.

    `max_frame_size` is checked against the prefix before anything of that
    size is allocated, so a hostile ``0xFFFFFFFF`` prefix costs nothing. It may
    be changed between frames (the handshake uses a small cap, the session a
    larger one). Memory: the shared buffer plus one frame buffer of at most
    `max_frame_size` bytes (allocated at the first large frame, reused for the
    following ones, grown only for a larger frame). Only bytes given to
    `receive_data` while complete frames are left unread can grow the shared
    buffer beyond `SHARED_BUFFER` (the caller holds those bytes either way).
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._sbuf = new_buffer(SHARED_BUFFER)  # not zero-filled: read only where received
        self._rpos = 0  # first byte in the shared buffer not yet returned in a frame
        self._wpos = 0  # end of the received bytes in the shared buffer
        self._need: int | None = None  # body length of the frame at _rpos (prefix consumed)
        self._fbuf: bytearray | None = None  # the frame buffer (large frames)
        self._ffill = -1  # bytes of the current large frame received; -1: none in progress
        self._after_large = False
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (prefixes not yet parsed included)."""
        return (self._wpos - self._rpos) + max(self._ffill, 0)

    # -- bytes in ------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """The writable view the next received bytes go into (never empty).

        During a large frame: the rest of that frame's own buffer, exactly (so
        the following prefix lands in the shared buffer). Otherwise free room
        in the shared buffer.
        """
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if self._ffill >= 0 and self._need is not None and self._ffill < self._need:
            assert self._fbuf is not None
            return memoryview(self._fbuf)[self._ffill : self._need]
        buf = self._sbuf
        r, w = self._rpos, self._wpos
        if r == w:
            self._rpos = self._wpos = r = w = 0
        elif len(buf) - w < _AFTER_LARGE_READ:
            # The tail (normally at most one incomplete small frame) moves to the front.
            tail = w - r
            if tail <= r:
                buf[:tail] = memoryview(buf)[r:w]  # no overlap
            else:
                buf[:tail] = buf[r:w]  # overlapping: through a copy
            self._rpos, self._wpos, r, w = 0, tail, 0, tail
            if len(buf) - w < _AFTER_LARGE_READ:  # complete frames left unread: grow
                grown = new_buffer(max(2 * len(buf), tail + SHARED_BUFFER))
                grown[:tail] = memoryview(buf)[:tail]
                self._sbuf = buf = grown
        end = len(buf)
        if self._after_large and self._need is None and r == w:
            end = min(end, w + _AFTER_LARGE_READ)
        return memoryview(buf)[w:end]

    def buffer_updated(self, n: int) -> None:
        """`n` bytes were written at the start of the last `get_buffer()` view."""
        if n <= 0:
            raise LocalProtocolError(f"buffer_updated({n}): use eof_received() for end of stream")
        if self._ffill >= 0 and self._need is not None and self._ffill < self._need:
            if self._ffill + n > self._need:
                raise LocalProtocolError("buffer_updated beyond the view given")
            self._ffill += n
            return
        if self._wpos + n > len(self._sbuf):
            raise LocalProtocolError("buffer_updated beyond the view given")
        self._wpos += n

    def eof_received(self) -> None:
        """The peer closed its side."""
        self._eof = True

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer (copied in); ``b""`` means end of stream."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        src = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        pos, size = 0, len(src)
        while pos < size:
            target = self.get_buffer()
            k = min(len(target), size - pos)
            target[:k] = src[pos : pos + k]
            self.buffer_updated(k)
            pos += k
            self._prepare(strict=False)

    # -- frames out ----------------------------------------------------------------

    def _prepare(self, *, strict: bool) -> bool:
        """Parse the next prefix if it is due; move a large incomplete frame to the frame buffer.

        True when a frame is complete. With ``strict=False`` an oversized prefix
        is left for `next_frame` to refuse.
        """
        if self._ffill >= 0:
            assert self._need is not None
            return self._ffill >= self._need
        r, w = self._rpos, self._wpos
        if self._need is None:
            if w - r < 4:
                return False
            (n,) = _U32.unpack_from(self._sbuf, r)
            if n > self.max_frame_size:
                if strict:
                    raise RemoteProtocolError(
                        f"frame of {n} bytes exceeds the limit of {self.max_frame_size} bytes"
                    )
                return False
            r = self._rpos = r + 4
            self._need = n
        n = self._need
        have = w - r
        if have >= n:
            return True
        if n > SMALL_FRAME:  # its own buffer: the rest is received straight into it
            fbuf = self._fbuf
            if fbuf is None or len(fbuf) < n:
                self._fbuf = fbuf = new_buffer(n)
            fbuf[:have] = memoryview(self._sbuf)[r:w]
            self._ffill = have
            self._rpos = self._wpos = 0
        return False

    def next_frame(self) -> memoryview | _NeedData:
        """The next complete frame body (a view, see the class docstring), or `NEED_DATA`.

        Raises `RemoteProtocolError` for an oversized length prefix, and
        `StreamTruncated` for a stream that ended in the middle of a frame.
        """
        if not self._prepare(strict=True):
            return self._need_more()
        n = self._need
        assert n is not None
        self._need = None
        if self._ffill >= 0:
            assert self._fbuf is not None
            self._ffill = -1
            self._after_large = True
            return memoryview(self._fbuf)[:n]
        r = self._rpos
        self._rpos = r + n
        self._after_large = n > SMALL_FRAME
        return memoryview(self._sbuf)[r : r + n]

    def _need_more(self) -> _NeedData:
        if self._eof and not self.at_eof:
            raise StreamTruncated("stream ended in the middle of a frame")
        return NEED_DATA

    @property
    def at_eof(self) -> bool:
        """True once the stream has ended and every complete frame was returned."""
        return self._eof and self._rpos == self._wpos and self._need is None and self._ffill < 0


@dataclass(slots=True)
class Message:
    """A decoded RPC message: a request, a response or an error reply."""

    type: int
    kind: str
    fields: dict[str, Any]
    data: bytes | bytearray | memoryview | None = None
    priority: int = PRIO_NORMAL


def encode_head(
    msg_type: int, kind: str, fields: dict[str, Any], has_data: bool, priority: int = PRIO_NORMAL
) -> bytes:
    """Encode the prefix of a message body: ``u32 head length`` + msgpack head.

    Raises `LocalProtocolError` (a local misuse) if `fields` is not msgpack-able.
    """
    if msg_type not in _MSG_TYPES:
        raise LocalProtocolError(f"unknown message type {msg_type!r}")
    if not isinstance(kind, str) or not isinstance(fields, dict):
        raise LocalProtocolError("message kind must be a str and fields a dict")
    if priority not in _PRIORITIES:
        raise LocalProtocolError(f"unknown priority {priority!r}")
    try:
        head = msgpack.packb([msg_type, kind, fields, has_data, priority], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"message fields are not msgpack-encodable: {exc}") from None
    if len(head) > HEAD_MAX:
        raise LocalProtocolError(f"message head of {len(head)} bytes exceeds {HEAD_MAX}")
    return _U32.pack(len(head)) + head


def decode_message(body: bytes | bytearray | memoryview) -> Message:
    """Decode a reassembled message body; the data payload is a view into `body`."""
    view = memoryview(body)
    if len(view) < 4:
        raise RemoteProtocolError("message shorter than its head length")
    (head_len,) = _U32.unpack_from(view)
    if head_len > HEAD_MAX or 4 + head_len > len(view):
        raise RemoteProtocolError(f"bad message head length {head_len}")
    try:
        head = msgpack.unpackb(
            view[4 : 4 + head_len],
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=head_len,
            max_bin_len=head_len,
            max_array_len=head_len,
            max_map_len=head_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types; all mean "garbage"
        raise RemoteProtocolError(f"undecodable message head: {type(exc).__name__}") from None
    if not (isinstance(head, list) and len(head) == 5):
        raise RemoteProtocolError("message head is not a 5-element array")
    msg_type, kind, fields, has_data, priority = head
    if type(msg_type) is not int or msg_type not in _MSG_TYPES:
        raise RemoteProtocolError(f"unknown message type {msg_type!r}")
    if not isinstance(kind, str) or len(kind) > _MAX_KIND:
        raise RemoteProtocolError("message kind is not a short string")
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise RemoteProtocolError("message fields are not a map with string keys")
    if not isinstance(has_data, bool):
        raise RemoteProtocolError("message has_data flag is not a bool")
    if type(priority) is not int or priority not in _PRIORITIES:
        raise RemoteProtocolError(f"unknown priority {priority!r}")
    rest = view[4 + head_len :]
    if has_data:
        data: memoryview | None = rest
    elif len(rest):
        raise RemoteProtocolError("message has trailing bytes but no data flag")
    else:
        data = None
    return Message(msg_type, kind, fields, data, priority)


@dataclass(eq=False)
class OutgoingMessage:
    """A message queued for sending, cut into chunks on demand.

    The data payload is kept as a view (never concatenated with the head).
    `on_done(sent: bool)` is called once by the scheduler's user when the last
    chunk was handed out (`sent=True`) or the message was dropped.
    """

    stream_id: int
    is_response: bool
    head: bytes
    data: memoryview | None
    priority: int = PRIO_NORMAL
    offset: int = 0
    started: bool = False
    aborted: bool = False
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = len(self.head) + (len(self.data) if self.data is not None else 0)

    @property
    def key(self) -> tuple[bool, int]:
        """The stream key: (is response, id)."""
        return (self.is_response, self.stream_id)

    def next_chunk(self, chunk_size: int = CHUNK_SIZE) -> tuple[bytes, bytes | memoryview]:
        """Cut the next chunk: (9-byte chunk header, plaintext body)."""
        flags = FLAG_RESPONSE if self.is_response else 0
        if self.aborted:
            self.offset = self.total
            return CHUNK_HEADER.pack(flags | FLAG_ABORT | FLAG_LAST, self.stream_id, self.total), b""
        if not self.started:
            flags |= FLAG_FIRST
            self.started = True
        start = self.offset
        end = min(self.total, start + chunk_size)
        hl = len(self.head)
        if start < hl < end and self.total > chunk_size:
            # A message of several chunks: its head goes alone, so that every data chunk
            # is a view of the data (no concatenated copy; the chunk count is the same
            # or one more). A one-chunk message keeps head and data together.
            end = hl
        if end <= hl:
            body: bytes | memoryview = self.head[start:end]
        elif start >= hl:
            assert self.data is not None
            body = self.data[start - hl : end - hl]
        else:  # spans head and data: only a one-chunk message
            assert self.data is not None
            body = self.head[start:] + self.data[: end - hl]
        self.offset = end
        if end == self.total:
            flags |= FLAG_LAST
        return CHUNK_HEADER.pack(flags, self.stream_id, self.total), body

    @property
    def finished(self) -> bool:
        """True once every chunk (or the abort chunk) was cut."""
        return self.started and self.offset >= self.total


class SendScheduler:
    """Chooses which message's chunk goes out next.

    Strict priority between classes (`PRIO_HIGH` before `PRIO_NORMAL` before
    `PRIO_BACKGROUND`), round robin between messages of the same class, one
    chunk at a time — so a small high-priority message queued behind a big
    background one goes out after at most one more chunk of the big one.

    At most `max_started` messages of more than one chunk per class are in
    progress at once (the others wait their turn, unstarted; one-chunk
    messages never wait): the receiver buffers every message in progress, so
    this bounds what one connection makes its peer hold.
    """

    def __init__(self, chunk_size: int = CHUNK_SIZE, *, max_started: int = 4) -> None:
        self.chunk_size = chunk_size
        self.max_started = max_started
        self._queues: tuple[deque[OutgoingMessage], ...] = tuple(deque() for _ in _PRIORITIES)
        self._held: tuple[deque[OutgoingMessage], ...] = tuple(deque() for _ in _PRIORITIES)
        self._multi = [0] * len(_PRIORITIES)  # multi-chunk messages in the round robin
        self._by_key: dict[tuple[bool, int], OutgoingMessage] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def _is_multi(self, msg: OutgoingMessage) -> bool:
        return msg.total > self.chunk_size

    def push(self, msg: OutgoingMessage) -> None:
        """Queue a message; its stream key must not already be queued."""
        if msg.priority not in _PRIORITIES:
            raise ValueError(f"unknown priority {msg.priority!r}")
        if msg.key in self._by_key:
            raise ValueError(f"stream {msg.key} already queued")
        self._by_key[msg.key] = msg
        p = msg.priority
        if self._is_multi(msg):
            if self._multi[p] >= self.max_started:
                self._held[p].append(msg)
                return
            self._multi[p] += 1
        self._queues[p].append(msg)

    def cancel(self, key: tuple[bool, int]) -> OutgoingMessage | None:
        """Drop a queued message. Not started: removed at once (returned).

        Partly sent: its remaining chunks are replaced by one abort chunk, so
        the peer frees its partial buffer; returns None (it finishes later).
        """
        msg = self._by_key.get(key)
        if msg is None:
            return None
        if not msg.started:
            del self._by_key[key]
            p = msg.priority
            if msg in self._held[p]:
                self._held[p].remove(msg)
            else:
                self._queues[p].remove(msg)
                self._left(msg)
            return msg
        msg.aborted = True
        return None

    def _left(self, msg: OutgoingMessage) -> None:
        """`msg` left the round robin: let a held message of its class start."""
        p = msg.priority
        if self._is_multi(msg):
            self._multi[p] -= 1
            if self._held[p]:
                self._multi[p] += 1
                self._queues[p].append(self._held[p].popleft())

    def pop_chunk(self) -> tuple[OutgoingMessage, bytes, bytes | memoryview] | None:
        """The next chunk to send as (message, chunk header, body), or None if idle.

        When the returned message is `finished` it has left the scheduler.
        """
        for q in self._queues:
            if q:
                msg = q.popleft()
                header, body = msg.next_chunk(self.chunk_size)
                if msg.offset >= msg.total:
                    del self._by_key[msg.key]
                    self._left(msg)
                else:
                    q.append(msg)
                return msg, header, body
        return None

    def drain(self) -> list[OutgoingMessage]:
        """Remove and return every queued message (connection closing)."""
        msgs = list(self._by_key.values())
        self._by_key.clear()
        for q in (*self._queues, *self._held):
            q.clear()
        self._multi = [0] * len(_PRIORITIES)
        return msgs


PARTIAL_ENTRY_COST: Final = 256
"""Bytes counted for the bookkeeping of one incomplete message, besides its data."""


class _Partial:
    """One incoming message of several chunks, being reassembled."""

    __slots__ = ("key", "total", "buf", "held", "refused", "received", "admitted",
                 "last_progress", "owner")

    def __init__(self, key: tuple[bool, int], total: int, owner: MessageAssembler) -> None:
        self.key = key
        self.total = total
        self.buf: bytearray | None = None  # the whole message (None: refused or dropped)
        self.held = 0  # bytes allocated for it
        self.refused = False  # its chunks are read and discarded; answer busy
        self.received = 0
        self.admitted = False  # holds a share of the node's ReceiveBudget
        self.last_progress = 0.0
        self.owner = owner


class ReceiveBudget:
    """The node-wide cap on incoming messages in progress (shared by every connection).

    A message of several chunks is admitted at its first chunk when its
    declared size (plus `PARTIAL_ENTRY_COST`) fits in what the admitted
    messages still in progress leave of `max_bytes`; only then is its buffer
    (of the declared size) allocated, so the bytes allocated for incomplete
    messages are at most what this budget admitted. When it does
    not fit, messages that made no progress for `stale_after` seconds (a
    sender that stopped half-way) are dropped to make room, oldest first. A
    message that still does not fit is refused: its chunks are read and
    discarded, and when its last chunk arrives it is answered ``busy`` (see
    `MessageAssembler.end_chunk`). So the bytes of incomplete messages never
    exceed `max_bytes`, however many senders stop half-way, and a stalled
    sender cannot keep the budget for more than `stale_after` seconds.

    Sans-io: `clock` (seconds, monotonic) is injectable.
    """

    def __init__(
        self, max_bytes: int, *, stale_after: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("receive budget must be positive")
        self.max_bytes = max_bytes
        self.stale_after = stale_after
        self._clock = clock
        self.committed = 0
        """Declared bytes of the admitted messages in progress."""
        self.refused = 0
        """Messages refused for want of budget (count)."""
        self.dropped = 0
        """Stalled messages dropped to make room (count)."""
        self._by_progress: dict[int, _Partial] = {}  # oldest progress first

    def admit(self, p: _Partial) -> bool:
        """Admit `p` (True) or refuse it (False), dropping stalled messages if that makes room."""
        need = p.total + PARTIAL_ENTRY_COST
        if self.committed + need > self.max_bytes:
            self._drop_stalled(need)
            if self.committed + need > self.max_bytes:
                self.refused += 1
                return False
        self.committed += need
        p.admitted = True
        self.progress(p)
        return True

    def progress(self, p: _Partial) -> None:
        """A chunk of `p` arrived."""
        p.last_progress = self._clock()
        self._by_progress.pop(id(p), None)
        self._by_progress[id(p)] = p

    def release(self, p: _Partial) -> None:
        """`p` completed, was aborted or dropped: its share is free again."""
        if p.admitted:
            p.admitted = False
            self.committed -= p.total + PARTIAL_ENTRY_COST
            self._by_progress.pop(id(p), None)

    def _drop_stalled(self, need: int) -> None:
        now = self._clock()
        while self._by_progress and self.committed + need > self.max_bytes:
            p = next(iter(self._by_progress.values()))
            if now - p.last_progress < self.stale_after:
                return
            p.owner.drop(p)
            self.dropped += 1


class MessageAssembler:
    """Reassembles chunks into messages, each decrypted straight into its one buffer.

    A message of several chunks gets its whole buffer (its declared total) at
    its first chunk, and every chunk is decrypted in place: no chunk is
    copied. That allocation is bounded before it is made: the declared total
    is at most `max_message_size`; it counts against this connection's
    `max_partial_bytes` at once (over it: `RemoteProtocolError`); and with a
    `budget` only an admitted message gets a buffer (a refused one is read
    into a scratch chunk and dropped), so the bytes allocated for incomplete
    messages never exceed what the node-wide `ReceiveBudget` admitted. A
    sender that stops half-way holds its buffer until it is dropped as stale
    by the budget or the connection closes at its stall timeout. (Earlier the
    buffer grew as chunks arrived, so a stalled sender held at most twice
    what it sent; but the budget already reserved the declared total, so that
    saved no admission, only memory the budget had reserved anyway, for one
    extra copy of the first half of every message.)

    Use: ``target = asm.begin_chunk(header, body_len)`` gives the writable view
    where the chunk's plaintext belongs (the caller decrypts into it, or copies
    into it), then ``asm.end_chunk()`` returns ``(is_response, id, body)`` when
    the message is complete, else None. ``body`` is None for a message that
    was refused or dropped for want of `budget` (the node-wide
    `ReceiveBudget`): it must be answered ``busy``.

    Limits: a message's declared total above `max_message_size`, a chunk
    overrunning its message, more than `max_partial_bytes` declared by this
    connection's incomplete messages, inconsistent flags — all `RemoteProtocolError`.
    """

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        *,
        chunk_size: int = CHUNK_SIZE,
        max_partial_bytes: int | None = None,
        budget: ReceiveBudget | None = None,
    ) -> None:
        self.max_message_size = max_message_size
        self.chunk_size = chunk_size
        self.max_partial_bytes = (
            max_partial_bytes if max_partial_bytes is not None
            else PARTIAL_MESSAGES * max_message_size
        )
        self.budget = budget
        self._partial: dict[tuple[bool, int], _Partial] = {}
        self._partial_bytes = 0
        self._pending: tuple[_Partial, int, bool] | None = None
        self._scratch: bytearray | None = None

    def parse_header(self, frame: bytes | memoryview) -> tuple[int, int, int]:
        """Unpack a chunk header from the start of a frame: (flags, id, total)."""
        if len(frame) < CHUNK_HEADER.size:
            raise RemoteProtocolError(f"frame of {len(frame)} bytes is shorter than a chunk header")
        flags, sid, total = CHUNK_HEADER.unpack_from(frame)
        if flags & ~_KNOWN_FLAGS:
            raise RemoteProtocolError(f"unknown chunk flags {flags:#x}")
        return flags, sid, total

    def begin_chunk(self, flags: int, sid: int, total: int, body_len: int) -> memoryview:
        """Validate a chunk header; return the view its `body_len` bytes go into."""
        key = (bool(flags & FLAG_RESPONSE), sid)
        last = bool(flags & FLAG_LAST)
        self._pending = None
        if flags & FLAG_ABORT:
            if body_len:
                raise RemoteProtocolError("abort chunk with a body")
            p = self._partial.pop(key, None)
            if p is not None:
                self.drop(p)
            return memoryview(bytearray())
        if body_len > self.chunk_size:
            raise RemoteProtocolError(f"chunk of {body_len} bytes exceeds {self.chunk_size}")
        if flags & FLAG_FIRST:
            if key in self._partial:
                raise RemoteProtocolError(f"stream {sid} started twice")
            if total > self.max_message_size:
                raise RemoteProtocolError(
                    f"message of {total} bytes exceeds the limit of {self.max_message_size}"
                )
            if last:  # the whole message in one chunk: never held partial, one allocation
                if body_len != total:
                    raise RemoteProtocolError(f"chunk overruns or truncates stream {sid}")
                p = _Partial(key, total, self)
                p.buf = new_buffer(total)  # not zero-filled: the chunk fills every byte
                self._pending = (p, total, True)
                return memoryview(p.buf)
            cost = total + PARTIAL_ENTRY_COST * (len(self._partial) + 1)
            if self._partial_bytes + cost > self.max_partial_bytes:
                raise RemoteProtocolError("too many bytes buffered in incomplete messages")
            p = _Partial(key, total, self)
            if self.budget is not None and not self.budget.admit(p):
                p.refused = True
            else:  # checked above, admitted: the one buffer, every chunk decrypted into it
                # Not zero-filled: a message is complete, and only then returned, once its
                # chunks, contiguous from 0, have covered every byte.
                p.buf = new_buffer(total)
                p.held = total
                self._partial_bytes += total
            self._partial[key] = p
        else:
            found = self._partial.get(key)
            if found is None:
                raise RemoteProtocolError(f"continuation chunk for unknown stream {sid}")
            p = found
            if total != p.total:
                raise RemoteProtocolError(f"stream {sid} changed its total length")
        start = p.received
        end = start + body_len
        if end > p.total or (end == p.total) != last or (not last and body_len == 0):
            raise RemoteProtocolError(f"chunk overruns or truncates stream {sid}")
        self._pending = (p, end, last)
        if p.refused:  # decrypt (the cipher must see every frame) and forget
            if self._scratch is None:
                self._scratch = bytearray(self.chunk_size)
            return memoryview(self._scratch)[:body_len]
        assert p.buf is not None
        return memoryview(p.buf)[start:end]

    def end_chunk(self) -> tuple[bool, int, bytearray | None] | None:
        """Commit the chunk begun last; a complete message's body, else None.

        The body is None when the message was refused or dropped (answer ``busy``).
        """
        pending = self._pending
        self._pending = None
        if pending is None:  # an abort chunk
            return None
        p, end, last = pending
        p.received = end
        if not last:
            if p.admitted and self.budget is not None:
                self.budget.progress(p)
            return None
        if p.key in self._partial:
            del self._partial[p.key]
            self._release(p)
        return p.key[0], p.key[1], None if p.refused else p.buf

    def close(self) -> None:
        """The connection ended: free every incomplete message and its budget share."""
        for p in list(self._partial.values()):
            self.drop(p)
        self._partial.clear()

    def drop(self, p: _Partial) -> None:
        """Free an incomplete message's buffers; the rest of its chunks are discarded."""
        self._release(p)
        p.refused = True
        p.buf = None

    def _release(self, p: _Partial) -> None:
        self._partial_bytes -= p.held
        p.held = 0
        if self.budget is not None:
            self.budget.release(p)

    @property
    def partial_bytes(self) -> int:
        """Bytes allocated for incomplete messages."""
        return self._partial_bytes

    @property
    def partial_count(self) -> int:
        """Incomplete messages (held or being discarded)."""
        return len(self._partial)
