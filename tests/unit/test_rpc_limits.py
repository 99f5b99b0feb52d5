"""Caps on incoming connections (issue 9 B.4): handshakes, per address, in all, idle and
stalled; and per kind of peer (issue 10 part 4): clients cannot crowd out nodes."""

from __future__ import annotations

import resource
from typing import Any

import pytest
import trio
import trio.testing

from blocknode.errors import NodeUnreachable
from blocknode.rpc.connect import handshake, open_client
from blocknode.rpc.handshake import ClientHandshake, ClientKey, Peer
from blocknode.rpc.network import (
    ConnectionLimits,
    RpcNetwork,
    fd_connection_cap,
    raise_nofile_limit,
)
from blocknode.rpc.session import Session
from blocknode.rpc.wire import CHUNK_HEADER, FLAG_FIRST, MSG_REQUEST, encode_head
from tests.fakes import SECRET

KEY = ClientKey.generate()
KEYS = {KEY.id: KEY.verifier}


async def echo(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
    if kind == "sleep":
        await trio.sleep(fields["s"])
    return {"peer": str(peer), **fields}, data


async def serving(nursery: trio.Nursery, **limits: Any) -> tuple[RpcNetwork, str]:
    net = RpcNetwork("n", SECRET, {}, echo, handshake_timeout=5, limits=ConnectionLimits(**limits),
                     lookup_key=KEYS.get)
    addr = await nursery.start(net.serve, "127.0.0.1:0")
    return net, addr


async def tcp(addr: str) -> trio.SocketStream:
    host, port = addr.rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def closed_by_peer(stream: trio.abc.Stream) -> bool:
    try:
        return await stream.receive_some(100) == b""
    except trio.BrokenResourceError:
        return True


async def test_unauthenticated_connections_past_the_cap_make_room_for_newcomers() -> None:
    # 300 idle TCP connections (no secret needed) used to take every descriptor of a node.
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            net, addr = await serving(nursery, max_handshakes=4)
            idle = [await tcp(addr) for _ in range(20)]
            await trio.testing.wait_all_tasks_blocked()
            assert len(net._handshaking) == 4 and net.connections_refused == 16
            for s in idle[:16]:  # the oldest were closed as newer ones came
                assert await closed_by_peer(s)
            async with open_client(addr, KEY, timeout=5) as client:  # displaces one more
                assert (await client.call("echo", {"x": 1}, timeout=5))[0]["x"] == 1
            for s in idle:
                await s.aclose()
            nursery.cancel_scope.cancel()


async def test_connections_per_address_and_in_all_are_capped() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            net, addr = await serving(nursery, max_per_addr=2, max_connections=3)
            async with open_client(addr, KEY, timeout=5) as c1, open_client(addr, KEY, timeout=5) as c2:
                # both slots of 127.0.0.1 are authenticated: a third is closed at once
                with pytest.raises(NodeUnreachable):
                    async with open_client(addr, KEY, timeout=5):
                        pass
                assert net.connections_refused == 1
                for c in (c1, c2):  # the two held connections are unaffected
                    assert (await c.call("echo", {}, timeout=5))[0]["peer"] == f"client key {KEY.id}"
            await trio.testing.wait_all_tasks_blocked()
            async with open_client(addr, KEY, timeout=5) as c3:  # room again
                assert (await c3.call("echo", {"y": 2}, timeout=5))[0]["y"] == 2
            nursery.cancel_scope.cancel()


async def test_idle_authenticated_connection_is_closed_but_not_while_busy() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            net, addr = await serving(nursery, idle_timeout=0.3)
            async with open_client(addr, KEY, timeout=5) as client:
                # a call longer than the idle timeout keeps the connection
                assert (await client.call("sleep", {"s": 0.6}, timeout=5))[0]["s"] == 0.6
                assert net.incoming_connections == 1
                await trio.sleep(0.5)  # now idle past the timeout
                assert net.incoming_connections == 0
                with pytest.raises(NodeUnreachable):
                    await client.call("echo", {}, timeout=5)
            nursery.cancel_scope.cancel()


async def test_a_half_sent_message_is_dropped_after_the_stall_timeout() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            net, addr = await serving(nursery, stall_timeout=0.3)
            stream = await tcp(addr)
            hs = ClientHandshake.for_key(KEY)
            await handshake(stream, hs)
            sess = Session(hs.keys, decoder=hs.decoder)
            body = encode_head(MSG_REQUEST, "echo", {}, True) + bytes(50_000)
            # the first 40 KB of a message announced as 200 KB, then nothing
            header = CHUNK_HEADER.pack(FLAG_FIRST, 1, len(body) + 150_000)
            frame = bytearray(len(header) + len(body) + 16)
            frame[: len(header)] = header
            assert sess._send_cipher is not None
            sess._send_cipher.seal_into(header, body, memoryview(frame)[len(header):])
            await stream.send_all(len(frame).to_bytes(4, "big") + bytes(frame))
            await trio.testing.wait_all_tasks_blocked()
            (conn,) = net._incoming
            assert conn.session.assembler.partial_bytes >= 50_000
            assert net.client_receive_budget.committed > 0 and net.receive_budget.committed == 0
            start = trio.current_time()
            assert await closed_by_peer(stream)
            assert 0.25 <= trio.current_time() - start < 2
            await trio.testing.wait_all_tasks_blocked()
            assert net.client_receive_budget.committed == 0 and net.incoming_connections == 0
            nursery.cancel_scope.cancel()


def test_the_soft_descriptor_limit_is_raised_and_a_reserve_kept() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        got = raise_nofile_limit()
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got >= lower and (hard == resource.RLIM_INFINITY or got == hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert fd_connection_cap(256) == 8  # 256 descriptors: nearly all for the data path
    assert fd_connection_cap(1024) == 512
    assert fd_connection_cap(65536) == 32768


async def test_connection_status_counts_refusals_and_faults() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            net, addr = await serving(nursery, max_handshakes=1)
            a, b = await tcp(addr), await tcp(addr)
            await trio.testing.wait_all_tasks_blocked()
            st = net.connection_status()
            assert st["handshaking"] == 1 and st["refused"] == 1 and st["faults"] == {}
            await a.aclose()
            await b.aclose()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- per kind of peer (issue 10 part 4)


async def test_clients_at_their_cap_and_a_handshake_flood_do_not_keep_nodes_out() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            net = RpcNetwork("n", SECRET, {}, echo, members={"n", "a"}, lookup_key=KEYS.get,
                             limits=ConnectionLimits(max_connections=2, max_per_addr=2,
                                                     max_handshakes=4))
            addr = await nursery.start(net.serve, "127.0.0.1:0")
            async with open_client(addr, KEY, timeout=5) as c1, open_client(addr, KEY, timeout=5):
                with pytest.raises(NodeUnreachable, match="cap of 2 client connections"):
                    async with open_client(addr, KEY, timeout=5):
                        pass
                idle = [await tcp(addr) for _ in range(20)]  # the handshake pool, flooded
                await trio.testing.wait_all_tasks_blocked()
                node_a = RpcNetwork("a", SECRET, {"n": addr}, echo)
                await nursery.start(node_a.run)
                fields, data = await node_a.call("n", "echo", {"x": 1}, b"replica", timeout=5)
                assert fields == {"peer": "a", "x": 1} and data == b"replica"
                st = net.connection_status()
                assert (st["clients"], st["nodes"]) == (2, 1)
                assert (await c1.call("echo", {}, timeout=5))[0]["peer"] == f"client key {KEY.id}"
                for s in idle:
                    await s.aclose()
            nursery.cancel_scope.cancel()


async def test_messages_from_clients_and_from_nodes_have_budgets_of_their_own() -> None:
    from blocknode.rpc.errors import RemoteCallError

    MiB = 1024 * 1024
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            net = RpcNetwork("n", SECRET, {}, echo, members={"n", "a"}, lookup_key=KEYS.get,
                             receive_buffer_max=4 * MiB, client_receive_buffer_max=MiB + MiB // 2)
            addr = await nursery.start(net.serve, "127.0.0.1:0")
            # a client stops half-way through a 1 MiB message: it holds the clients' budget
            stream = await tcp(addr)
            hs = ClientHandshake.for_key(KEY)
            await handshake(stream, hs)
            sess = Session(hs.keys, decoder=hs.decoder)
            body = encode_head(MSG_REQUEST, "echo", {}, True) + bytes(60_000)
            header = CHUNK_HEADER.pack(FLAG_FIRST, 1, MiB)
            frame = bytearray(len(header) + len(body) + 16)
            frame[: len(header)] = header
            assert sess._send_cipher is not None
            sess._send_cipher.seal_into(header, body, memoryview(frame)[len(header):])
            await stream.send_all(len(frame).to_bytes(4, "big") + bytes(frame))
            await trio.testing.wait_all_tasks_blocked()
            assert net.client_receive_budget.committed >= MiB
            async with open_client(addr, KEY, timeout=5) as client:
                with pytest.raises(RemoteCallError) as busy:
                    await client.call("echo", {}, bytes(MiB), timeout=5)
                assert busy.value.code == "busy"
            # replication is not affected
            node_a = RpcNetwork("a", SECRET, {"n": addr}, echo)
            await nursery.start(node_a.run)
            for _ in range(3):
                assert (await node_a.call("n", "echo", {}, bytes(MiB), timeout=5))[1] == bytes(MiB)
            assert net.receive_budget.refused == 0 and net.client_receive_budget.refused == 1
            await stream.aclose()
            nursery.cancel_scope.cancel()


def test_a_flood_of_sockets_displaces_its_own_kind_before_a_node_in_its_handshake() -> None:
    net = RpcNetwork("n", SECRET, {}, echo, members={"n", "a"}, lookup_key=KEYS.get,
                     limits=ConnectionLimits(max_handshakes=4))
    node = net._admit("10.0.0.2")
    assert node is not None and net._claim(node, "node") is None  # a node sent its hello
    client = net._admit("10.0.0.3")
    assert client is not None and net._claim(client, "client") is None
    for _ in range(50):  # silent sockets
        assert net._admit("10.0.0.9") is not None
    assert node in net._handshaking and client in net._handshaking
    assert len(net._handshaking) == 4
    for _ in range(4):  # clients that said hello: still never the node
        s = net._admit("10.0.0.9")
        assert s is not None and net._claim(s, "client") is None
    assert node in net._handshaking and client not in net._handshaking
