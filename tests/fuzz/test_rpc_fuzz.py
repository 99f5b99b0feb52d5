"""Fuzzing the sans-io RPC layers: every input is decoded, NEED_DATA, or our error.

Whatever the peer sends, the error blames the peer: `RemoteProtocolError` (or its
subclasses `AuthenticationError`, `StreamTruncated`), never `LocalProtocolError`.
"""

from __future__ import annotations

import os
import random
import struct

from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blocknode.errors import RemoteProtocolError
from blocknode.rpc.handshake import MAX_HANDSHAKE_FRAME, ClientHandshake, ClientKey, ServerHandshake
from blocknode.rpc.session import Session
from blocknode.rpc.wire import (
    MSG_REQUEST,
    NEED_DATA,
    FrameDecoder,
    OutgoingMessage,
    decode_message,
    encode_head,
    pack_frame_prefix,
)
from tests.fakes import SECRET

KEY = ClientKey(f"BK{'0' * 24}", bytes(range(2, 34)))
KEYS = {KEY.id: KEY.verifier}


def server() -> ServerHandshake:
    """A node that takes node "a" and the client key KEY."""
    return ServerHandshake("b", SECRET, members={"a", "b"}, lookup_key=KEYS.get)

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


def drain_frames(data_pieces: list[bytes], cap: int) -> tuple[list[bytes], str | None]:
    dec = FrameDecoder(cap)
    frames: list[bytes] = []
    try:
        for piece in data_pieces:
            dec.receive_data(piece)
            while (f := dec.next_frame()) is not NEED_DATA:
                frames.append(bytes(f))  # type: ignore[arg-type]  # a view: copy at once
    except RemoteProtocolError as exc:
        return frames, str(exc)
    return frames, None


@given(st.binary(max_size=600), st.lists(st.integers(0, 10_000), max_size=8))
def test_frame_decoder_is_total_and_split_invariant(data: bytes, cuts: list[int]) -> None:
    whole = drain_frames([data], 300)
    pieces = drain_frames(split(data, cuts), 300)
    bytewise = drain_frames([data[i : i + 1] for i in range(len(data))], 300)
    assert whole == pieces == bytewise


def drain_in_place(data: bytes, reads: list[int], cap: int) -> tuple[list[bytes], str | None]:
    """Like `drain_frames`, but through `get_buffer` / `buffer_updated` (as ``recv_into``)."""
    dec = FrameDecoder(cap)
    frames: list[bytes] = []
    pos, i = 0, 0
    try:
        while True:
            while (f := dec.next_frame()) is not NEED_DATA:
                frames.append(bytes(f))  # type: ignore[arg-type]
            if pos == len(data):
                return frames, None
            target = dec.get_buffer()
            k = min(len(target), reads[i % len(reads)], len(data) - pos)
            target[:k] = data[pos : pos + k]
            dec.buffer_updated(k)
            pos, i = pos + k, i + 1
    except RemoteProtocolError as exc:
        return frames, str(exc)


@given(
    st.lists(st.sampled_from([0, 1, 4, 100, 16 * 1024, 16 * 1024 + 1, 70_000]), max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(1, 100_000), min_size=1, max_size=6),
)
def test_receiving_in_place_is_split_invariant(sizes: list[int], tail: bytes, reads: list[int]) -> None:
    rng = random.Random(len(sizes))
    data = b"".join(pack_frame_prefix(n) + rng.randbytes(n) for n in sizes) + tail
    assert drain_in_place(data, reads, 50_000) == drain_frames([data], 50_000)


@given(st.integers(301, 2**32 - 1), st.binary(max_size=50))
def test_oversized_length_prefix_fails_before_buffering(n: int, tail: bytes) -> None:
    dec = FrameDecoder(300)
    dec.receive_data(struct.pack(">I", n) + tail)
    try:
        dec.next_frame()
    except RemoteProtocolError:
        assert dec.buffered == 4 + len(tail)  # nothing else was allocated for the body
    else:
        raise AssertionError("oversized frame accepted")


@given(st.binary(max_size=300))
def test_decode_message_garbage(data: bytes) -> None:
    try:
        decode_message(data)
    except RemoteProtocolError:
        pass


@given(st.text(max_size=30), st.dictionaries(st.text(max_size=8), msgpack_values, max_size=5), st.none() | st.binary(max_size=100))
def test_message_round_trip(kind: str, fields: dict, data: bytes | None) -> None:
    msg = decode_message(encode_head(MSG_REQUEST, kind, fields, data is not None) + (data or b""))
    assert (msg.kind, msg.fields) == (kind, fields)
    assert (bytes(msg.data) if msg.data is not None else None) == data


@given(st.binary(max_size=2000), st.lists(st.integers(0, 5000), max_size=5))
def test_plain_session_garbage_never_raises_foreign_errors(data: bytes, cuts: list[int]) -> None:
    s = Session(None, max_message_size=4096)
    try:
        for piece in split(data, cuts) + [b""]:
            s.receive_data(piece)
            while s.next_message() is not NEED_DATA:
                pass
    except RemoteProtocolError:
        pass


def _sessions() -> tuple[Session, Session]:
    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", SECRET)
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    c.process()
    s.receive_data(c.data_to_send())
    s.process()
    return Session(c.keys), Session(s.keys)


@given(st.integers(0, 200_000), st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4))
def test_encrypted_stream_bit_flips_fail_authentication(size: int, flips: list[tuple[int, int]]) -> None:
    a, b = _sessions()
    a.queue(OutgoingMessage(1, False, encode_head(MSG_REQUEST, "k", {}, True), memoryview(os.urandom(size))))
    wire = bytearray()
    while a.pending:
        wire += a.data_to_send()[0]
    original = bytes(wire)
    for pos, mask in flips:
        wire[pos % len(wire)] ^= mask
    assume(bytes(wire) != original)  # two flips may cancel out
    try:
        b.receive_data(bytes(wire))
        b.receive_data(b"")
        while b.next_message() is not NEED_DATA:
            pass
    except RemoteProtocolError:  # AuthenticationError, or an oversized length from a flipped prefix
        return
    raise AssertionError("tampered stream accepted")


@given(st.binary(max_size=MAX_HANDSHAKE_FRAME + 50), st.lists(st.integers(0, 2000), max_size=5), st.booleans())
def test_handshake_garbage_is_protocol_error_or_need_data(data: bytes, cuts: list[int], server: bool) -> None:
    hs = ServerHandshake("b", SECRET, lookup_key=KEYS.get) if server else ClientHandshake("a", SECRET)
    hs.data_to_send()
    try:
        for piece in split(data, cuts):
            hs.receive_data(piece)
            hs.process()
    except RemoteProtocolError:
        return
    assert not hs.done


@given(st.dictionaries(st.sampled_from(["t", "v", "role", "id", "nonce", "mac", "why", "detail", "x"]),
                      msgpack_values | st.sampled_from(["hello", "finish", "reject", "node", "client",
                                                        "busy", "member", "role", KEY.id, 2]),
                      max_size=7))
def test_handshake_typed_garbage(obj: dict) -> None:
    import msgpack

    body = msgpack.packb(obj, use_bin_type=True)
    for hs in (server(), ClientHandshake("a", SECRET), ClientHandshake.for_key(KEY)):
        hs.receive_data(pack_frame_prefix(len(body)) + body)
        try:
            hs.process()
        except RemoteProtocolError:
            continue
        assert not hs.done


class HandshakeMachine(RuleBasedStateMachine):
    """Client and server exchange frames in any order, with drops and corruption.

    Invariant: whenever both finish, they agree on keys and on who the client is;
    corruption only ever gives RemoteProtocolError/AuthenticationError.
    """

    def __init__(self) -> None:
        super().__init__()
        self.client = self.make_client()
        self.server = server()
        self.to_server = bytearray(self.client.data_to_send())
        self.to_client = bytearray()
        self.failed = False
        self.rng = random.Random(0)

    def _deliver(self, hs: ClientHandshake | ServerHandshake, buf: bytearray, n: int, out: bytearray) -> None:
        chunk = bytes(buf[:n])
        del buf[:n]
        hs.receive_data(chunk)
        try:
            hs.process()
        except RemoteProtocolError:  # AuthenticationError included
            self.failed = True
        out += hs.data_to_send()

    @precondition(lambda self: not self.failed and self.to_server)
    @rule(n=st.integers(1, 200))
    def deliver_to_server(self, n: int) -> None:
        self._deliver(self.server, self.to_server, n, self.to_client)

    @precondition(lambda self: not self.failed and self.to_client)
    @rule(n=st.integers(1, 200))
    def deliver_to_client(self, n: int) -> None:
        self._deliver(self.client, self.to_client, n, self.to_server)

    @precondition(lambda self: not self.failed and (self.to_server or self.to_client))
    @rule(pos=st.integers(0, 10_000), mask=st.integers(1, 255), to_server=st.booleans())
    def corrupt(self, pos: int, mask: int, to_server: bool) -> None:
        buf = self.to_server if to_server and self.to_server else self.to_client or self.to_server
        buf[pos % len(buf)] ^= mask

    @precondition(lambda self: not self.failed)
    @rule()
    def server_sees_eof(self) -> None:
        """The client goes away: an unfinished server handshake must fail, never hang."""
        self.server.receive_data(b"")
        self.failed = True  # nothing can be delivered after the end of the stream
        try:
            self.server.process()
        except RemoteProtocolError:
            return
        assert self.server.done

    @rule()
    def idle(self) -> None:
        """Always possible, so a stuck (failed) handshake is a valid end state."""

    @invariant()
    def keys_agree_when_done(self) -> None:
        if self.client.done and self.server.done:
            assert self.client.keys.send_key == self.server.keys.recv_key
            assert self.client.keys.recv_key == self.server.keys.send_key
            assert (self.server.keys.role, self.server.keys.peer_id) == (self.client.role,
                                                                         self.client.node_id)

    @staticmethod
    def make_client() -> ClientHandshake:
        return ClientHandshake("a", SECRET)


class ClientKeyHandshakeMachine(HandshakeMachine):
    """The same with a client proving a client key."""

    @staticmethod
    def make_client() -> ClientHandshake:
        return ClientHandshake.for_key(KEY)


TestHandshakeMachine = HandshakeMachine.TestCase
TestClientKeyHandshakeMachine = ClientKeyHandshakeMachine.TestCase
