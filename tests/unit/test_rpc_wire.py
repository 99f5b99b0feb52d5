"""Sans-io framing: frames, messages, chunking, priority interleaving."""

from __future__ import annotations

import os
import random

import pytest

from blocknode.errors import ProtocolError
from blocknode.rpc.session import Session
from blocknode.rpc.wire import (
    CHUNK_HEADER,
    CHUNK_SIZE,
    FLAG_FIRST,
    FLAG_LAST,
    MSG_REQUEST,
    MSG_RESPONSE,
    NEED_DATA,
    PRIO_BACKGROUND,
    PRIO_HIGH,
    PRIO_NORMAL,
    FrameDecoder,
    MessageAssembler,
    OutgoingMessage,
    SendScheduler,
    decode_message,
    encode_head,
    pack_frame_prefix,
)


def frames_of(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (f := decoder.next_frame()) is not NEED_DATA:
        out.append(bytes(f))  # a view, valid until the next receive: copy at once
    return out


def test_frame_decoder_one_chunk_bytewise_and_random_splits_agree() -> None:
    bodies = [b"", b"a", os.urandom(1000), os.urandom(5)]
    stream = b"".join(pack_frame_prefix(len(b)) + b for b in bodies)

    whole = FrameDecoder(2000)
    whole.receive_data(stream)
    assert frames_of(whole) == bodies

    bytewise = FrameDecoder(2000)
    got: list[bytes] = []
    for i in range(len(stream)):
        bytewise.receive_data(stream[i : i + 1])
        got += frames_of(bytewise)
    assert got == bodies

    rng = random.Random(7)
    for _ in range(20):
        dec = FrameDecoder(2000)
        got = []
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 300)
            dec.receive_data(stream[pos : pos + step])
            pos += step
            got += frames_of(dec)
        assert got == bodies


def test_oversized_prefix_refused_before_body() -> None:
    dec = FrameDecoder(1024)
    dec.receive_data(b"\xff\xff\xff\xff")  # no body at all: refused on the prefix alone
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        dec.next_frame()
    assert dec.buffered == 4


def recv_into_decoder(dec: FrameDecoder, stream: bytes, sizes: list[int]) -> list[bytes]:
    """Feed `stream` like ``sock.recv_into(dec.get_buffer())`` returning `sizes` bytes at most."""
    got: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        target = dec.get_buffer()
        assert len(target) > 0 and not target.readonly
        k = min(len(target), sizes[i % len(sizes)], len(stream) - pos)
        target[:k] = stream[pos : pos + k]
        dec.buffer_updated(k)
        pos += k
        i += 1
        got += frames_of(dec)
    return got


def test_received_in_place_the_frames_are_those_of_receive_data() -> None:
    from blocknode.rpc.wire import SMALL_FRAME

    rng = random.Random(3)
    sizes = [0, 1, 3, 4, 5, SMALL_FRAME - 1, SMALL_FRAME, SMALL_FRAME + 1, 70_000, 300_000]
    bodies = [os.urandom(rng.choice(sizes)) for _ in range(60)]
    stream = b"".join(pack_frame_prefix(len(b)) + b for b in bodies)
    whole = FrameDecoder(400_000)
    whole.receive_data(stream)
    assert frames_of(whole) == bodies
    for reads in ([1], [7, 4096, 3], [65536], [262144], [1 << 20]):
        dec = FrameDecoder(400_000)
        assert recv_into_decoder(dec, stream, reads) == bodies
        assert dec.buffered == 0 and dec.next_frame() is NEED_DATA
        dec.eof_received()
        assert dec.at_eof


def test_a_large_frame_is_received_straight_into_its_own_buffer() -> None:
    from blocknode.rpc.wire import SHARED_BUFFER, SMALL_FRAME

    dec = FrameDecoder(1 << 20)
    body = os.urandom(300_000)
    stream = pack_frame_prefix(len(body)) + body + pack_frame_prefix(3) + b"abc"
    first = dec.get_buffer()
    assert len(first) <= SHARED_BUFFER
    first[:1000] = stream[:1000]
    dec.buffer_updated(1000)
    assert dec.next_frame() is NEED_DATA  # the prefix is parsed: the frame has its buffer
    rest = dec.get_buffer()
    assert len(rest) == len(body) - 996  # exactly the rest of the frame, never beyond it
    frame_buffer = rest.obj
    assert isinstance(frame_buffer, bytearray) and len(frame_buffer) == len(body)
    rest[:] = stream[1000 : 4 + len(body)]
    dec.buffer_updated(len(rest))
    frame = dec.next_frame()
    assert isinstance(frame, memoryview) and frame.obj is frame_buffer and frame == body
    del frame
    # the next prefix lands in the shared buffer; after a large frame, that read is short
    after = dec.get_buffer()
    assert after.obj is not frame_buffer and len(after) <= SMALL_FRAME + 4
    after[:7] = stream[4 + len(body) :]
    dec.buffer_updated(7)
    small = dec.next_frame()
    assert isinstance(small, memoryview) and small == b"abc" and small.obj is after.obj
    # the frame buffer is reused by the next large frame of at most its size
    dec.receive_data(pack_frame_prefix(len(body) - 5) + body[:100])
    assert dec.next_frame() is NEED_DATA
    assert dec.get_buffer().obj is frame_buffer


def test_small_frames_share_one_buffer_that_does_not_grow() -> None:
    from blocknode.rpc.wire import SHARED_BUFFER

    dec = FrameDecoder(1 << 20)
    bodies = [os.urandom(random.Random(i).randint(0, 5000)) for i in range(500)]
    stream = b"".join(pack_frame_prefix(len(b)) + b for b in bodies)
    owners = set()
    got = []
    pos = 0
    while pos < len(stream):
        target = dec.get_buffer()
        k = min(len(target), 9000, len(stream) - pos)
        target[:k] = stream[pos : pos + k]
        dec.buffer_updated(k)
        pos += k
        while (f := dec.next_frame()) is not NEED_DATA:
            assert isinstance(f, memoryview)
            owners.add(id(f.obj))
            got.append(bytes(f))
    assert got == bodies
    assert len(owners) == 1 and len(dec._sbuf) == SHARED_BUFFER and dec._fbuf is None


def test_oversized_prefix_received_in_place_allocates_nothing() -> None:
    import tracemalloc

    dec = FrameDecoder(1 << 20)
    target = dec.get_buffer()
    target[:4] = pack_frame_prefix((1 << 20) + 1)
    dec.buffer_updated(4)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            dec.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and dec._fbuf is None and dec.buffered == 4


def test_eof_in_the_middle_of_a_large_frame_is_truncation() -> None:
    dec = FrameDecoder(1 << 20)
    dec.receive_data(pack_frame_prefix(100_000) + bytes(50_000))
    assert dec.next_frame() is NEED_DATA
    dec.eof_received()
    assert not dec.at_eof
    with pytest.raises(ProtocolError, match="middle of a frame"):
        dec.next_frame()
    with pytest.raises(ProtocolError, match="after end of stream"):
        dec.get_buffer()
    with pytest.raises(ProtocolError, match="eof_received"):
        FrameDecoder(10).buffer_updated(0)


def test_eof_mid_frame_is_protocol_error() -> None:
    dec = FrameDecoder(1024)
    dec.receive_data(pack_frame_prefix(10) + b"abc")
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a frame"):
        dec.next_frame()


def test_message_round_trip_with_and_without_data() -> None:
    head = encode_head(MSG_REQUEST, "put", {"hash": b"\x01" * 32, "n": 3}, True, PRIO_HIGH)
    msg = decode_message(head + b"payload")
    assert (msg.type, msg.kind, msg.fields, bytes(msg.data), msg.priority) == (
        MSG_REQUEST, "put", {"hash": b"\x01" * 32, "n": 3}, b"payload", PRIO_HIGH
    )
    empty = decode_message(encode_head(MSG_RESPONSE, "ok", {}, True))
    assert empty.data is not None and bytes(empty.data) == b""
    none = decode_message(encode_head(MSG_RESPONSE, "ok", {}, False))
    assert none.data is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00\x05abc",
        b"\x00\x00\x00\x01\xc1",  # reserved msgpack byte
        b"\x00\x00\x00\x01\x90",  # empty array
        b"\x00\x00\x00\x06\x95\x07\xa1k\x80\xc2\x01",  # unknown type 7
        b"\x00\x00\x00\x06\x95\x00\x01\x80\xc2\x01",  # kind not a str
        b"\x00\x00\x00\x06\x95\x00\xa1k\x90\xc2\x01",  # fields not a map
        b"\x00\x00\x00\x07\x95\x00\xa1k\x81\x01\x01\xc2\x01",  # int map key
        b"\x00\x00\x00\x06\x95\x00\xa1k\x80\x01\x01",  # has_data not bool
        b"\x00\x00\x00\x06\x95\x00\xa1k\x80\xc2\x09",  # unknown priority
        b"\x00\x00\x00\x06\x95\x00\xa1k\x80\xc2\x01trailing",  # bytes but no data flag
    ],
)
def test_decode_message_garbage_is_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(body)


def test_encode_head_refuses_unencodable_fields() -> None:
    with pytest.raises(ProtocolError, match="msgpack"):
        encode_head(MSG_REQUEST, "x", {"o": object()}, False)


def _msg(sid: int, size: int, prio: int) -> OutgoingMessage:
    head = encode_head(MSG_REQUEST, "k", {}, True, prio)
    return OutgoingMessage(sid, False, head, memoryview(os.urandom(size)), prio)


def test_small_high_priority_message_overtakes_big_background_transfer() -> None:
    sched = SendScheduler()
    big = _msg(1, 1024 * 1024, PRIO_BACKGROUND)
    sched.push(big)
    first = sched.pop_chunk()
    assert first is not None and first[0] is big
    small = _msg(2, 10, PRIO_HIGH)
    sched.push(small)
    nxt = sched.pop_chunk()
    assert nxt is not None and nxt[0] is small and small.finished
    order = []
    while (item := sched.pop_chunk()) is not None:
        order.append(item[0].stream_id)
    # the rest of the 1 MiB (and its head), CHUNK_SIZE at a time
    assert set(order) == {1} and len(order) == -(-(big.total - len(first[2])) // CHUNK_SIZE)


def test_same_priority_messages_round_robin() -> None:
    sched = SendScheduler()
    sched.push(_msg(1, 3 * CHUNK_SIZE, PRIO_NORMAL))
    sched.push(_msg(2, 3 * CHUNK_SIZE, PRIO_NORMAL))
    order = []
    while (item := sched.pop_chunk()) is not None:
        order.append(item[0].stream_id)
    assert order[:4] == [1, 2, 1, 2]


def test_interleaved_chunks_reassemble_over_plain_session() -> None:
    a, b = Session(None), Session(None)
    payloads = {sid: os.urandom(sid * 50_000) for sid in (1, 2, 3)}
    for sid, prio in zip((1, 2, 3), (PRIO_BACKGROUND, PRIO_NORMAL, PRIO_HIGH), strict=True):
        head = encode_head(MSG_REQUEST, f"k{sid}", {"sid": sid}, True, prio)
        a.queue(OutgoingMessage(sid, False, head, memoryview(payloads[sid]), prio))
    wire = bytearray()
    while a.pending:
        view, _ = a.data_to_send(limit=1)  # one frame at a time
        wire += view
    got = {}
    for i in range(0, len(wire), 7777):
        b.receive_data(wire[i : i + 7777])
        while (m := b.next_message()) is not NEED_DATA:
            got[m[1]] = bytes(m[2].data)
    assert got == payloads


def test_cancel_before_start_drops_and_after_start_aborts() -> None:
    a, b = Session(None), Session(None)
    big = _msg(1, 3 * CHUNK_SIZE, PRIO_NORMAL)  # within the 1 MiB block limit
    a.queue(big)
    view, _ = a.data_to_send(limit=1)
    b.receive_data(bytes(view))
    assert b.next_message() is NEED_DATA
    assert b.assembler.partial_bytes > 0
    assert a.cancel(big.key) is None  # started: becomes an abort chunk
    waiting = _msg(2, 10, PRIO_NORMAL)
    a.queue(waiting)
    assert a.cancel(waiting.key) is waiting  # never started: just dropped
    while a.pending:
        view, _ = a.data_to_send()
        b.receive_data(bytes(view))
    assert b.next_message() is NEED_DATA
    assert b.assembler.partial_bytes == 0


def test_assembler_limits() -> None:
    asm = MessageAssembler(max_message_size=1000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        asm.begin_chunk(FLAG_FIRST | FLAG_LAST, 1, 1001, 10)
    with pytest.raises(ProtocolError, match="unknown stream"):
        asm.begin_chunk(FLAG_LAST, 2, 10, 10)
    with pytest.raises(ProtocolError, match="overruns"):
        asm.begin_chunk(FLAG_FIRST | FLAG_LAST, 3, 10, 11)
    with pytest.raises(ProtocolError, match="unknown chunk flags"):
        asm.parse_header(CHUNK_HEADER.pack(0x80, 1, 1))


def test_the_largest_batch_reply_always_fits_in_a_head() -> None:
    # Issue 9 B.7: every reply to a batch of MAX_BATCH_ROWS rows must encode.
    from blocknode.rpc.wire import HEAD_MAX, MAX_BATCH_ROWS, MSG_RESPONSE, fit_texts

    long_error = "quorum not reached; failed: " + "node9: NodeUnreachable é " * 400
    for n_ok in (0, 1, MAX_BATCH_ROWS // 2, MAX_BATCH_ROWS):
        hashes = [b"\xab" * 32] * n_ok + [None] * (MAX_BATCH_ROWS - n_ok)
        errors = fit_texts([None] * n_ok + [long_error] * (MAX_BATCH_ROWS - n_ok))
        head = encode_head(MSG_RESPONSE, "client_put_many", {"hashes": hashes, "errors": errors}, False)
        assert len(head) <= 4 + HEAD_MAX
        assert all(e is None or e.startswith("quorum not reached") for e in errors)
    assert fit_texts(["short", None]) == ["short", None]


def test_a_message_gets_its_one_buffer_at_its_first_chunk_within_every_bound() -> None:
    # Issue 15: every chunk is decrypted straight into the message's one buffer (no copy
    # of the first chunks); the allocation is checked against the connection's
    # max_partial_bytes and the node's ReceiveBudget before it is made.
    import tracemalloc

    from blocknode.rpc.wire import FLAG_FIRST, FLAG_LAST, PARTIAL_ENTRY_COST, ReceiveBudget

    mib = 1024 * 1024
    asm = MessageAssembler(max_message_size=mib, chunk_size=mib, max_partial_bytes=2 * mib + 2 * PARTIAL_ENTRY_COST)
    owners = set()
    for i, (flags, n) in enumerate([(FLAG_FIRST, 1000), (0, mib // 2), (FLAG_LAST, mib // 2 - 1000)]):
        target = asm.begin_chunk(flags, 1, mib, n)
        owners.add(id(target.obj))
        target[:] = bytes([i]) * n
        done = asm.end_chunk()
        if i == 0:
            assert asm.partial_bytes == mib  # the whole buffer, at the first chunk
    assert done is not None and len(owners) == 1 and id(done[2]) in owners
    assert done[2] == b"\x00" * 1000 + b"\x01" * (mib // 2) + b"\x02" * (mib // 2 - 1000)
    assert asm.partial_bytes == 0

    tracemalloc.start()
    try:
        for sid in (2, 3):
            asm.begin_chunk(FLAG_FIRST, sid, mib, 100)[:] = bytes(100)
            asm.end_chunk()
        with pytest.raises(ProtocolError, match="incomplete messages"):
            asm.begin_chunk(FLAG_FIRST, 4, 1000, 100)  # over max_partial_bytes: refused first
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert asm.partial_bytes == 2 * mib and peak < 2 * mib + 256 * 1024

    budget = ReceiveBudget(mib + PARTIAL_ENTRY_COST)
    b = MessageAssembler(max_message_size=8 * mib, budget=budget)
    tracemalloc.start()
    try:
        target = b.begin_chunk(FLAG_FIRST, 1, 8 * mib, 100)  # refused by the budget
        target[:] = bytes(100)
        del target
        assert b.end_chunk() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert budget.refused == 1 and b.partial_bytes == 0 and peak < 512 * 1024


def test_receive_budget_refuses_then_drops_stalled_messages() -> None:
    # Issue 9 B.5: incomplete messages count against one node-wide budget; a sender that
    # stops half-way holds its share only until a newcomer needs it and it is stale.
    from blocknode.rpc.wire import FLAG_FIRST, FLAG_LAST, PARTIAL_ENTRY_COST, ReceiveBudget

    now = [0.0]
    mib = 1024 * 1024
    budget = ReceiveBudget(2 * mib + 2 * PARTIAL_ENTRY_COST, stale_after=1.0, clock=lambda: now[0])
    a = MessageAssembler(max_message_size=2 * mib, chunk_size=2 * mib, budget=budget)
    b = MessageAssembler(max_message_size=2 * mib, chunk_size=2 * mib, budget=budget)

    def chunk(asm: MessageAssembler, flags: int, sid: int, total: int, n: int):
        asm.begin_chunk(flags, sid, total, n)[:] = b"y" * n
        return asm.end_chunk()

    assert chunk(a, FLAG_FIRST, 1, mib, 1000) is None  # admitted
    assert chunk(a, FLAG_FIRST, 2, mib, 1000) is None  # admitted: the budget is now committed
    assert chunk(b, FLAG_FIRST, 3, mib, 1000) is None  # refused: read and discarded
    assert b.partial_bytes == 0 and budget.refused == 1
    assert chunk(b, FLAG_LAST, 3, mib, mib - 1000) == (False, 3, None)  # answer busy
    now[0] += 0.5
    assert chunk(a, FLAG_LAST, 2, mib, mib - 1000) == (False, 2, bytearray(b"y" * mib))
    now[0] += 1.0  # message 1 made no progress for 1.5 s: stale
    assert chunk(b, FLAG_FIRST, 4, 2 * mib, 1000) is None  # admitted after dropping message 1
    assert budget.dropped == 1 and a.partial_bytes == 0
    assert chunk(a, FLAG_LAST, 1, mib, mib - 1000) == (False, 1, None)  # its sender gets busy
    assert chunk(b, FLAG_LAST, 4, 2 * mib, 2 * mib - 1000) is not None
    assert budget.committed == 0 and a.partial_count == b.partial_count == 0


def test_scheduler_keeps_few_big_messages_in_progress_per_class() -> None:
    # The receiver holds every message in progress: a sender starts at most
    # `max_started` multi-chunk messages per class; one-chunk messages never wait.
    sched = SendScheduler(max_started=2)
    bigs = [_msg(i, 3 * CHUNK_SIZE + 1000, PRIO_NORMAL) for i in range(1, 5)]
    for m in bigs:
        sched.push(m)
    small = _msg(9, 10, PRIO_NORMAL)
    sched.push(small)
    sched.cancel(bigs[3].key)  # a held (unstarted) one can still be dropped
    order = []
    while (item := sched.pop_chunk()) is not None:
        msg = item[0]
        order.append(msg.stream_id)
        in_progress = {m.stream_id for m in bigs if m.started and not m.finished}
        assert len(in_progress) <= 2
    assert order.index(9) <= 2  # the small one went out within the first round
    assert set(order) == {1, 2, 3, 9} and len(sched) == 0


def test_a_big_message_sends_its_head_alone_and_its_data_as_views() -> None:
    data = bytearray(os.urandom(CHUNK_SIZE * 4))
    head = encode_head(MSG_REQUEST, "put", {"h": b"x" * 32}, True)
    msg = OutgoingMessage(1, False, head, memoryview(data))
    bodies = []
    while not msg.finished:
        _, body = msg.next_chunk()
        bodies.append(body)
    assert bytes(bodies[0]) == head and len(bodies) == 5  # as many chunks as head + data cut at CHUNK_SIZE
    assert all(isinstance(b, memoryview) and b.obj is data and len(b) == CHUNK_SIZE for b in bodies[1:])
    assert b"".join(bytes(b) for b in bodies) == head + data
    small = OutgoingMessage(2, False, head, memoryview(b"abc"))  # one chunk: head and data together
    _, body = small.next_chunk()
    assert bytes(body) == head + b"abc" and small.finished
