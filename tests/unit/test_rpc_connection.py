"""Connections and the network over in-memory streams (no sockets)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
import trio.testing

from blocknode.errors import NodeUnreachable
from blocknode.rpc.connect import handshake
from blocknode.rpc.handshake import ClientHandshake, Peer
from blocknode.rpc.network import ByteBudget, RpcNetwork
from blocknode.rpc.session import Session
from blocknode.rpc.wire import MSG_REQUEST, NEED_DATA, OutgoingMessage, encode_head
from tests.fakes import KEY, OPEN, SECRET, MemoryListener, MemoryNet

MiB = 1024 * 1024


async def echo(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
    return {"peer": str(peer), **fields}, data


async def test_byte_budget_is_fifo_and_clamps() -> None:
    budget = ByteBudget(100)
    assert await budget.acquire(60) == 60
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        got = await budget.acquire(n)
        order.append(name)
        budget.release(got)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "big", 500)  # clamped to 100: waits for everything
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 10)  # would fit, but FIFO keeps it behind "big"
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and budget.waiting == 2
        budget.release(60)
    assert order == ["big", "small"] and budget.used == 0


async def test_ram_budget_blocks_a_second_payload_until_the_first_is_done() -> None:
    mem = MemoryNet()
    entered: list[int] = []
    release = trio.Event()

    async def holding(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        entered.append(fields["i"])
        await release.wait()
        return {}, None

    a = RpcNetwork("a", SECRET, {"b": "mem-b"}, echo, connect=mem.connect, ram_buffer_max=MiB + MiB // 2)
    b = RpcNetwork("b", SECRET, {}, holding, **OPEN, connect=mem.connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_listener, mem.listener("mem-b"))
            await nursery.start(a.run)
            for i in (1, 2):
                nursery.start_soon(lambda i=i: a.call("b", "put", {"i": i}, os.urandom(MiB), timeout=10))
            await trio.testing.wait_all_tasks_blocked()
            assert len(entered) == 1  # the second payload was never queued
            assert a.budget.used == MiB and a.budget.waiting == 1
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(entered) == [1, 2]
            nursery.cancel_scope.cancel()
    assert a.budget.used == 0


async def raw_client(mem: MemoryNet, addr: str) -> tuple[trio.abc.Stream, Session]:
    stream = await mem.connect(addr)
    hs = ClientHandshake.for_key(KEY)
    await handshake(stream, hs)
    return stream, Session(hs.keys, decoder=hs.decoder)


async def test_tampered_frame_closes_only_that_connection() -> None:
    mem = MemoryNet()
    b = RpcNetwork("b", SECRET, {}, echo, **OPEN, connect=mem.connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_listener, mem.listener("mem-b"))
            good_stream, good = await raw_client(mem, "mem-b")
            bad_stream, bad = await raw_client(mem, "mem-b")
            await trio.testing.wait_all_tasks_blocked()
            assert b.incoming_connections == 2

            bad.queue(OutgoingMessage(1, False, encode_head(MSG_REQUEST, "echo", {}, True), memoryview(b"x" * 100)))
            frame = bytearray(bad.data_to_send()[0])
            frame[-1] ^= 1
            await bad_stream.send_all(frame)
            assert await bad_stream.receive_some(1000) == b""  # the node hung up
            await trio.testing.wait_all_tasks_blocked()
            assert b.incoming_connections == 1

            good.queue(OutgoingMessage(1, False, encode_head(MSG_REQUEST, "echo", {"v": 7}, False), None))
            await good_stream.send_all(good.data_to_send()[0])
            while (item := good.next_message()) is NEED_DATA:
                good.receive_data(await good_stream.receive_some(65536))
            assert item[2].fields == {"peer": f"client key {KEY.id}", "v": 7}  # type: ignore[index]
            nursery.cancel_scope.cancel()


async def test_cancelled_call_drops_its_transfer_and_connection_survives() -> None:
    mem = MemoryNet()
    a = RpcNetwork("a", SECRET, {"b": "mem-b"}, echo, connect=mem.connect)
    b = RpcNetwork("b", SECRET, {}, echo, **OPEN, connect=mem.connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_listener, mem.listener("mem-b"))
            await nursery.start(a.run)
            await a.call("b", "echo", {}, timeout=5)
            with trio.CancelScope() as scope:
                scope.cancel()  # cancelled as soon as it blocks: chunks still queued
                await a.call("b", "echo", {}, os.urandom(MiB), timeout=5)
            await trio.testing.wait_all_tasks_blocked()
            assert a.budget.used == 0
            (conn,) = b._incoming
            assert conn.session.assembler.partial_bytes == 0
            assert (await a.call("b", "echo", {"z": 1}, b"ok", timeout=5)) == ({"peer": "a", "z": 1}, b"ok")
            nursery.cancel_scope.cancel()


async def test_pending_calls_fail_when_the_peer_goes_away() -> None:
    mem = MemoryNet()
    never = trio.Event()

    async def stuck(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        await never.wait()
        return {}, None

    a = RpcNetwork("a", SECRET, {"b": "mem-b"}, echo, connect=mem.connect)
    b = RpcNetwork("b", SECRET, {}, stuck, **OPEN, connect=mem.connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            await outer.start(a.run)
            async with trio.open_nursery() as bn:
                await bn.start(b.serve_listener, mem.listener("mem-b"))
                failure: list[BaseException] = []

                async def caller() -> None:
                    try:
                        await a.call("b", "x", {}, timeout=5)
                    except NodeUnreachable as exc:
                        failure.append(exc)

                outer.start_soon(caller)
                await trio.testing.wait_all_tasks_blocked()
                bn.cancel_scope.cancel()  # node b shuts down
            await trio.testing.wait_all_tasks_blocked()
            assert len(failure) == 1 and not a.is_up("b")
            outer.cancel_scope.cancel()


@pytest.mark.parametrize("size", [0, 1, 65536 - 40, 65536, 3 * 65536 + 5])
async def test_payload_sizes_round_trip_in_memory(size: int) -> None:
    mem = MemoryNet()
    a = RpcNetwork("a", SECRET, {"b": "mem-b"}, echo, connect=mem.connect)
    b = RpcNetwork("b", SECRET, {}, echo, **OPEN, connect=mem.connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_listener, mem.listener("mem-b"))
            await nursery.start(a.run)
            data = os.urandom(size)
            assert await a.call("b", "echo", {}, data, timeout=5) == ({"peer": "a"}, data)
            nursery.cancel_scope.cancel()


async def test_duplicate_request_id_closes_only_that_connection() -> None:
    # Issue 9 A.2: two requests with one id made SendScheduler.push raise inside the
    # connection, which escaped into the network's nursery and stopped the node.
    mem = MemoryNet()
    b = RpcNetwork("b", SECRET, {}, echo, **OPEN, connect=mem.connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_listener, mem.listener("mem-b"))
            bad_stream, bad = await raw_client(mem, "mem-b")
            for _ in range(2):
                bad.queue(OutgoingMessage(7, False, encode_head(MSG_REQUEST, "echo", {}, False), None))
                await bad_stream.send_all(bad.data_to_send()[0])
            while await bad_stream.receive_some(65536):  # at most one answer, then closed
                pass
            await trio.testing.wait_all_tasks_blocked()
            assert b.incoming_connections == 0
            assert b.connection_faults == {KEY.id: 1}
            good_stream, good = await raw_client(mem, "mem-b")
            good.queue(OutgoingMessage(7, False, encode_head(MSG_REQUEST, "echo", {"v": 1}, False), None))
            await good_stream.send_all(good.data_to_send()[0])
            while (item := good.next_message()) is NEED_DATA:
                good.receive_data(await good_stream.receive_some(65536))
            assert item[2].fields == {"peer": f"client key {KEY.id}", "v": 1}  # type: ignore[index]
            nursery.cancel_scope.cancel()


async def test_an_exception_inside_a_connection_closes_only_that_connection(monkeypatch) -> None:
    # Issue 9 A.2/A.3: nothing a connection does may escape into the node's nursery.
    from blocknode.rpc.connection import RpcConnection

    mem = MemoryNet()
    b = RpcNetwork("b", SECRET, {}, echo, **OPEN, connect=mem.connect)
    real_dispatch = RpcConnection._dispatch

    def dispatch(self: RpcConnection, sid: int, msg: Any, taken: int = 0) -> None:
        if msg.kind == "boom":
            raise RuntimeError("injected")
        real_dispatch(self, sid, msg, taken)

    monkeypatch.setattr(RpcConnection, "_dispatch", dispatch)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_listener, mem.listener("mem-b"))
            stream, sess = await raw_client(mem, "mem-b")
            sess.queue(OutgoingMessage(1, False, encode_head(MSG_REQUEST, "boom", {}, False), None))
            await stream.send_all(sess.data_to_send()[0])
            assert await stream.receive_some(65536) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert b.connection_faults == {KEY.id: 1}
            a = RpcNetwork("a", SECRET, {"b": "mem-b"}, echo, connect=mem.connect)
            await nursery.start(a.run)
            assert (await a.call("b", "echo", {"ok": 1}, timeout=5))[0] == {"peer": "a", "ok": 1}
            nursery.cancel_scope.cancel()


async def test_messages_beyond_the_receive_budget_are_answered_busy() -> None:
    # Issue 9 B.5: incomplete incoming messages count against the node's budget; past it a
    # message is refused (answered busy) and the connection goes on.
    from blocknode.rpc.errors import RemoteCallError

    mem = MemoryNet()
    a = RpcNetwork("a", SECRET, {"b": "mem-b"}, echo, connect=mem.connect)
    b = RpcNetwork("b", SECRET, {}, echo, **OPEN, connect=mem.connect, receive_buffer_max=2 * MiB + MiB // 2)
    outcomes: list[str] = []

    async def put(i: int) -> None:
        try:
            await a.call("b", "echo", {"i": i}, os.urandom(MiB), timeout=5)
            outcomes.append("ok")
        except RemoteCallError as exc:
            outcomes.append(exc.code)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_listener, mem.listener("mem-b"))
            await nursery.start(a.run)
            await a.call("b", "echo", {}, timeout=5)
            async with trio.open_nursery() as calls:
                for i in range(3):  # interleaved: all three are in progress at once
                    calls.start_soon(put, i)
            assert sorted(outcomes) == ["busy", "ok", "ok"]
            assert b.receive_budget.committed == 0 and b.receive_budget.refused == 1
            assert (await a.call("b", "echo", {"z": 1}, b"ok", timeout=5)) == ({"peer": "a", "z": 1}, b"ok")
            nursery.cancel_scope.cancel()


async def test_unread_replies_are_bounded_and_stop_the_reading() -> None:
    # Issue 9 B.6: 256 client_get whose replies were never read grew a node by 256 MiB.
    # Reply payloads now take from a budget (a client's request reserves its largest reply
    # before it is handled), and a connection holding more than its share is not read.
    from blocknode.rpc.connect import open_client

    calls: list[int] = []

    async def get(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        calls.append(fields.get("i", -1))
        return {}, bytes(MiB)

    streams: list[trio.abc.Stream] = []
    listener = MemoryListener()

    async def lockstep_connect(addr: str) -> trio.abc.Stream:  # send_all waits for the reader
        client, server = trio.testing.lockstep_stream_pair()
        streams.append(client)
        await listener.send.send(server)
        return client

    node = RpcNetwork("n", SECRET, {}, get, **OPEN, reply_buffer_max=8 * MiB,
                      reply_size=lambda kind: MiB if kind == "get" else 0)
    assert node.reply_share == 2 * MiB
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve_listener, listener)
            stream = await lockstep_connect("n")
            hs = ClientHandshake.for_key(KEY)
            await handshake(stream, hs)
            greedy = Session(hs.keys, decoder=hs.decoder)
            for i in range(64):
                greedy.queue(OutgoingMessage(i + 1, False, encode_head(MSG_REQUEST, "get", {"i": i}, False), None))
            async def send_requests() -> None:
                while greedy.pending:
                    await stream.send_all(greedy.data_to_send()[0])
            nursery.start_soon(send_requests)
            await trio.testing.wait_all_tasks_blocked()
            # never read: the node handled only what its share allows, then stopped reading
            assert len(calls) <= 3
            assert node.reply_budget.used <= node.reply_share + MiB
            # another client is still served
            async with open_client("n", KEY, timeout=5, connect=lockstep_connect) as other:
                fields, data = await other.call("get", {}, timeout=5)
                assert data == bytes(MiB)
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert node.reply_budget.used == 0
            nursery.cancel_scope.cancel()


async def test_reserved_replies_that_come_back_small_let_reading_go_on() -> None:
    # A request kind that may answer a block reserves one; when the answer is small the
    # reservation is given back at once, and a reader waiting for room goes on.
    from blocknode.rpc.connect import open_client

    mem = MemoryNet()
    node = RpcNetwork("n", SECRET, {}, echo, **OPEN, connect=mem.connect, reply_buffer_max=8 * MiB,
                      reply_size=lambda kind: MiB)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve_listener, mem.listener("mem-n"))
            async with open_client("mem-n", KEY, timeout=5, connect=mem.connect) as client:
                got: list[int] = []

                async def one(i: int) -> None:
                    got.append((await client.call("echo", {"i": i}, timeout=5))[0]["i"])

                async with trio.open_nursery() as calls:
                    for i in range(20):
                        calls.start_soon(one, i)
                assert sorted(got) == list(range(20))
            await trio.testing.wait_all_tasks_blocked()
            assert node.reply_budget.used == 0
            nursery.cancel_scope.cancel()


async def socket_pair_connections(
    handler: Any,
) -> tuple[Any, Any]:
    """Two `RpcConnection`s over a real socket pair (the `recv_into` receive path)."""
    from blocknode.rpc.connection import RpcConnection
    from blocknode.rpc.handshake import ServerHandshake

    c, s = ClientHandshake("a", SECRET), ServerHandshake("b", SECRET, members={"a", "b"})
    s.receive_data(c.data_to_send())
    s.process()
    c.receive_data(s.data_to_send())
    c.process()
    s.receive_data(c.data_to_send())
    s.process()
    sa, sb = trio.socket.socketpair()
    a = RpcConnection(trio.SocketStream(sa), Session(c.keys), "b")
    b = RpcConnection(trio.SocketStream(sb), Session(s.keys), "a", handler)
    return a, b


async def test_call_with_view_returns_the_reassembly_buffer_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import blocknode.rpc.session as session_mod

    bodies: list[bytearray] = []
    decode = session_mod.decode_message

    def spying(body: Any) -> Any:
        bodies.append(body)
        return decode(body)

    monkeypatch.setattr(session_mod, "decode_message", spying)
    payloads = {"big": os.urandom(MiB), "small": os.urandom(3000)}

    async def serve(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        return {"n": len(payloads[kind])}, payloads[kind]

    a, b = await socket_pair_connections(serve)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            for kind in ("big", "small"):
                bodies.clear()
                fields, got = await a.call(kind, {}, view=True)
                assert fields == {"n": len(payloads[kind])}
                assert isinstance(got, memoryview) and not got.readonly and got == payloads[kind]
                reply_body = bodies[-1]  # the last message a decoded is b's reply
                assert got.obj is reply_body and isinstance(reply_body, bytearray)
                fields, copied = await a.call(kind, {})
                assert type(copied) is bytes and copied == payloads[kind]
            _, got = await a.call("small", {}, view=True, timeout=5)  # with a deadline too
            assert isinstance(got, memoryview) and got == payloads["small"]
            nursery.cancel_scope.cancel()


async def test_reads_without_waiting_while_a_message_arrives_stay_correct_and_yield() -> None:
    """While a message of several chunks is arriving, reads are tried straight on the
    socket (`_FAST_READS` in a row at most, then one normal, checkpointing read): the
    bytes still arrive intact, both ways, and other tasks keep running meanwhile."""
    payload = os.urandom(MiB - 4096)

    async def echo(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        return {"n": len(data or b"")}, data

    a, b = await socket_pair_connections(echo)

    class CountingSocket:
        """The raw socket, counting the reads tried without waiting."""

        def __init__(self, sock: Any) -> None:
            self.sock, self.reads, self.got = sock, 0, 0

        def recv_into(self, view: memoryview) -> int:
            self.reads += 1
            n = self.sock.recv_into(view)  # BlockingIOError passes through
            self.got += n
            return n

    spies = [CountingSocket(c._raw_sock) for c in (a, b)]
    a._raw_sock, b._raw_sock = spies
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            nursery.start_soon(ticker)
            for _ in range(8):
                fields, got = await a.call("echo", {}, payload)
                assert fields == {"n": len(payload)} and got == payload
            nursery.cancel_scope.cancel()
    assert all(s.got > 0 for s in spies), [(s.reads, s.got) for s in spies]  # both directions
    assert ticks > 10  # the other task ran while megabytes went by
    assert all(s.reads > 0 for s in spies)
