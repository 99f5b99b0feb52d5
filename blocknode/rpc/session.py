"""Sans-io state of an established (post-handshake) RPC connection.

`Session` glues the pure pieces together: `FrameDecoder` (bytes received in
place: `get_buffer`/`buffer_updated`) -> chunk header ->
`SessionCipher.open_into` (decrypting straight into the message's preallocated
buffer) -> `MessageAssembler` -> `decode_message`; and on the way out
`SendScheduler` -> `SessionCipher.seal_into` (encrypting straight into one
reusable output buffer). It never awaits; `connection.py` drives it. A
message of several chunks takes its share of the node's `ReceiveBudget` (when
one is given) while it is being reassembled.

With ``keys=None`` frames are plaintext: only for tests and the benchmark
baseline, never on a real connection.
"""

from __future__ import annotations

from blocknode.errors import AuthenticationError, RemoteProtocolError, StreamTruncated
from blocknode.rpc.handshake import TAG_SIZE, SessionCipher, SessionKeys
from blocknode.rpc.wire import (
    CHUNK_HEADER,
    CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    FrameDecoder,
    Message,
    MessageAssembler,
    OutgoingMessage,
    ReceiveBudget,
    SendScheduler,
    _NeedData,
    decode_message,
)

__all__ = ["SEND_BATCH", "Session"]

SEND_BATCH = 256 * 1024
"""`data_to_send` stops adding frames once this many bytes are ready."""

_PREFIX = 4
_HDR = CHUNK_HEADER.size


class Session:
    """Frames, encryption, chunking and reassembly of one connection, no I/O.

    Receiving: `receive_data(bytes)` (or `get_buffer()` + ``recv_into`` +
    `buffer_updated(n)`, no copy) then `next_message()` until `NEED_DATA`;
    it returns ``(is_response, stream_id, Message)``. A message's data is a
    view of its reassembly buffer, which nothing else holds. Any violation by the peer
    raises `RemoteProtocolError`; any authentication failure (including, on an
    encrypted session, a stream cut in the middle of a frame)
    `AuthenticationError`. After either, the session is unusable and the
    connection must close.

    Sending: `queue(OutgoingMessage)`, then `data_to_send()` while `pending`.
    """

    def __init__(
        self,
        keys: SessionKeys | None,
        *,
        decoder: FrameDecoder | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        chunk_size: int = CHUNK_SIZE,
        receive_budget: ReceiveBudget | None = None,
    ) -> None:
        self.keys = keys
        self._tag = TAG_SIZE if keys is not None else 0
        self._send_cipher = SessionCipher(keys.send_key) if keys is not None else None
        self._recv_cipher = SessionCipher(keys.recv_key) if keys is not None else None
        self.max_frame_size = _HDR + chunk_size + self._tag
        self.decoder = decoder if decoder is not None else FrameDecoder(self.max_frame_size)
        self.decoder.max_frame_size = self.max_frame_size  # leftover handshake bytes kept
        self.assembler = MessageAssembler(max_message_size, chunk_size=chunk_size, budget=receive_budget)
        self.scheduler = SendScheduler(chunk_size)
        self._wbuf = bytearray(SEND_BATCH + _PREFIX + self.max_frame_size)

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer (copied in); ``b""`` = the peer closed its side."""
        self.decoder.receive_data(data)

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the peer go (``recv_into`` it; see `FrameDecoder`).

        Drain `next_message` until `NEED_DATA` first, so that a large frame is
        received straight into its own buffer.
        """
        return self.decoder.get_buffer()

    def buffer_updated(self, n: int) -> None:
        """`n` bytes (> 0) were received into the view `get_buffer` gave."""
        self.decoder.buffer_updated(n)

    def eof_received(self) -> None:
        """The peer closed its side."""
        self.decoder.eof_received()

    def next_message(self) -> tuple[bool, int, Message | None] | _NeedData:
        """The next complete message, or `NEED_DATA`.

        The message is None when it was refused for want of the node's
        `ReceiveBudget`: a request must then be answered ``busy``.
        """
        while True:
            try:
                frame = self.decoder.next_frame()
            except StreamTruncated:
                if self._recv_cipher is not None:
                    raise AuthenticationError("stream truncated in the middle of a frame") from None
                raise
            if frame is NEED_DATA:
                return NEED_DATA
            assert isinstance(frame, memoryview)
            done = self._on_frame(frame)  # decrypted at once: the view is the decoder's
            if done is not None:
                is_resp, sid, body = done
                return is_resp, sid, decode_message(body) if body is not None else None

    def _on_frame(self, frame: memoryview) -> tuple[bool, int, bytearray | None] | None:
        header = frame[:_HDR]
        payload = frame[_HDR:]
        body_len = len(payload) - self._tag
        try:
            flags, sid, total = self.assembler.parse_header(frame)
            if body_len < 0:
                raise RemoteProtocolError("frame too short for its authentication tag")
            target = self.assembler.begin_chunk(flags, sid, total, body_len)
        except RemoteProtocolError:
            # A header the assembler refuses: blame tampering if the frame does
            # not even authenticate, else the (authenticated) peer is buggy.
            self._check_auth(header, payload)
            raise
        if self._recv_cipher is None:
            target[:] = payload
        else:
            self._recv_cipher.open_into(header, payload, target)
        return self.assembler.end_chunk()

    def _check_auth(self, header: memoryview, payload: memoryview) -> None:
        if self._recv_cipher is None:
            return
        if len(payload) < self._tag:
            raise AuthenticationError("frame too short to hold an authentication tag")
        scratch = bytearray(len(payload) - self._tag)
        self._recv_cipher.open_into(header, payload, memoryview(scratch))

    # -- sending ---------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """True while some message still has chunks to send."""
        return bool(self.scheduler)

    def queue(self, msg: OutgoingMessage) -> None:
        """Queue a message; its chunks come out of `data_to_send` by priority."""
        self.scheduler.push(msg)

    def cancel(self, key: tuple[bool, int]) -> OutgoingMessage | None:
        """Drop a queued message (see `SendScheduler.cancel`)."""
        return self.scheduler.cancel(key)

    def data_to_send(self, limit: int = SEND_BATCH) -> tuple[memoryview, list[OutgoingMessage]]:
        """Seal queued chunks into wire bytes, highest priority first.

        Returns ``(bytes to send, messages whose last chunk is in them)``. The
        view points into a buffer reused by the next call: send it first.
        """
        buf = self._wbuf
        out = memoryview(buf)
        pos = 0
        finished: list[OutgoingMessage] = []
        limit = min(limit, SEND_BATCH)
        while pos < limit:
            item = self.scheduler.pop_chunk()
            if item is None:
                break
            msg, header, body = item
            n = _HDR + len(body) + self._tag
            out[pos : pos + _PREFIX] = n.to_bytes(4, "big")
            out[pos + _PREFIX : pos + _PREFIX + _HDR] = header
            start = pos + _PREFIX + _HDR
            if self._send_cipher is None:
                out[start : start + len(body)] = body
            else:
                self._send_cipher.seal_into(header, body, out[start : start + len(body) + self._tag])
            pos += _PREFIX + n
            if msg.finished:
                finished.append(msg)
        return out[:pos], finished
