"""RpcNetwork over real loopback TCP: three nodes in one process, and a CLI client."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from blocknode.errors import (
    AuthenticationError,
    BlockNotFound,
    NodeUnreachable,
    QuorumError,
    RemoteError,
    RpcTimeout,
)
from blocknode.rpc.connect import open_client
from blocknode.rpc.errors import RemoteCallError, RemoteNotFound
from blocknode.rpc.handshake import ClientKey, Peer
from blocknode.rpc.network import RpcNetwork
from blocknode.rpc.wire import PRIO_BACKGROUND
from tests.fakes import SECRET

KEY = ClientKey.generate()
KEYS = {KEY.id: KEY.verifier}


async def handler(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
    if kind == "echo":
        return {"peer": str(peer), **fields}, data
    if kind == "missing":
        raise BlockNotFound("ab" * 32)
    if kind == "crash":
        raise KeyError("secret internals")
    if kind == "hang":
        await trio.sleep_forever()
    raise ValueError(kind)


def free_addrs(ids: str) -> dict[str, str]:
    """A loopback address with a port that was free a moment ago, per id."""
    socks = []
    for _ in ids:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    addrs = {i: f"127.0.0.1:{s.getsockname()[1]}" for i, s in zip(ids, socks, strict=True)}
    for s in socks:
        s.close()
    return addrs


@asynccontextmanager
async def cluster(ids: str = "abc", *, extra_peers: dict[str, str] | None = None,
                  **kw: Any) -> AsyncIterator[tuple[dict[str, RpcNetwork], dict[str, str]]]:
    """Networks `ids` serving on loopback, each knowing the others (and `extra_peers`)."""
    addrs = free_addrs(ids)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nets = {i: RpcNetwork(i, SECRET, {**addrs, **(extra_peers or {})}, handler,
                                  lookup_key=KEYS.get, **kw) for i in ids}
            for i in ids:
                await nursery.start(nets[i].serve, addrs[i])
            yield nets, addrs
            nursery.cancel_scope.cancel()


async def test_call_round_trip_with_one_mib_payload() -> None:
    async with cluster() as (nets, _):
        data = os.urandom(1024 * 1024)
        fields, out = await nets["a"].call("b", "echo", {"x": 1}, data, timeout=5)
        assert fields == {"peer": "a", "x": 1} and out == data
        fields, out = await nets["b"].call("a", "echo", {}, None, timeout=5, priority=PRIO_BACKGROUND)
        assert fields == {"peer": "b"} and out is None
        assert nets["a"].is_up("b")


async def test_local_call_uses_handler_without_socket_and_maps_errors() -> None:
    net = RpcNetwork("solo", SECRET, {}, handler)  # not even running
    assert await net.call("solo", "echo", {"k": 2}, b"x", timeout=1) == ({"peer": "solo", "k": 2}, b"x")
    with pytest.raises(RemoteNotFound):
        await net.call("solo", "missing", {}, timeout=1)


async def test_remote_errors_map_to_codes() -> None:
    async with cluster("ab") as (nets, _):
        with pytest.raises(BlockNotFound) as info:
            await nets["a"].call("b", "missing", {}, timeout=5)
        assert isinstance(info.value, RemoteError) and info.value.code == "not_found"  # type: ignore[attr-defined]
        assert info.value.hash_hex == "ab" * 32
        with pytest.raises(RemoteCallError) as crash:
            await nets["a"].call("b", "crash", {}, timeout=5)
        assert crash.value.code == "internal" and "secret internals" not in str(crash.value)


async def test_hanging_node_ends_at_the_timeout_not_later() -> None:
    async with cluster("ab") as (nets, _):
        await nets["a"].call("b", "echo", {}, timeout=5)  # connected already
        start = trio.current_time()
        with pytest.raises(RpcTimeout, match="node b"):
            await nets["a"].call("b", "hang", {}, timeout=0.3)
        elapsed = trio.current_time() - start
        assert 0.3 <= elapsed < 0.3 + 0.1
        # The connection is still fine for the next call.
        assert (await nets["a"].call("b", "echo", {"n": 1}, timeout=5))[0]["n"] == 1


async def test_call_many_quorum_with_one_node_down() -> None:
    async with cluster(extra_peers={"d": "127.0.0.1:1"}) as (nets, addrs):  # nothing listens at d
        got = await nets["a"].call_many(["a", "b", "c", "d"], "echo", {}, b"blk", quorum=3, timeout=5)
        assert len(got) >= 3 and {nid for nid, _ in got} <= {"a", "b", "c"}
        assert all(res == ({"peer": "a"}, b"blk") for _, res in got)
        assert nets["a"].budget.used == 0


async def test_call_many_quorum_error_names_every_failed_node() -> None:
    async with cluster(extra_peers={"d": "127.0.0.1:1", "e": "127.0.0.1:2"}) as (nets, addrs):
        with pytest.raises(QuorumError) as info:
            await nets["a"].call_many(["b", "d", "e"], "echo", {}, quorum=2, timeout=5)
        assert set(info.value.failures) == {"d", "e"}
        assert "NodeUnreachable" in info.value.failures["d"]
        assert "d:" in str(info.value) and "e:" in str(info.value)


async def test_call_many_with_a_hanging_node_returns_at_quorum() -> None:
    async def slow_c(peer: Peer, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        await trio.sleep_forever()
        raise AssertionError

    async with cluster() as (nets, addrs):
        nets["c"]._handler = slow_c
        start = trio.current_time()
        got = await nets["a"].call_many("abc", "echo", {}, quorum=2, timeout=3)
        assert {nid for nid, _ in got} == {"a", "b"}
        assert trio.current_time() - start < 1  # did not wait for c
        # Without interruption the quorum still returns early; c times out in the background.
        got = await nets["a"].call_many("abc", "echo", {}, quorum=2, timeout=0.5, interrupt_after_quorum=False)
        assert {nid for nid, _ in got} == {"a", "b"}
        with pytest.raises(QuorumError, match="c: RpcTimeout"):
            await nets["a"].call_many("ac", "echo", {}, quorum=2, timeout=0.3)


async def test_unreachable_node_and_backoff() -> None:
    net = RpcNetwork("a", SECRET, {"z": "127.0.0.1:1"}, handler, backoff_initial=10)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(net.run)
            for _ in range(net.fail_fast_after):  # each call tries to connect
                with pytest.raises(NodeUnreachable, match="cannot connect"):
                    await net.call("z", "echo", {}, timeout=5)
            # then, while it backs off, calls fail at once
            with pytest.raises(NodeUnreachable, match="next connect attempt"):
                await net.call("z", "echo", {}, timeout=5)
            assert not net.is_up("z")
            assert [r["up"] for r in net.peer_status()] == [True, False]
            nursery.cancel_scope.cancel()


async def test_peer_status_and_latency_after_a_maintenance_round() -> None:
    async with cluster() as (nets, addrs):
        for other in "bc":  # connected (a's first maintenance round may have run before they listened)
            await nets["a"].call(other, "echo", {}, timeout=5)
        await nets["a"].check_peers()
        rows = nets["a"].peer_status()
        assert [(r["id"], r["addr"], r["up"]) for r in rows] == [(i, addrs[i], True) for i in "abc"]
        lat = nets["a"].latency("b")
        assert lat is not None and 0 < lat < 1


async def test_node_keeps_serving_after_garbage_and_silent_clients() -> None:
    async with cluster("ab", handshake_timeout=0.5) as (nets, addrs):
        host, port = addrs["b"].rsplit(":", 1)
        garbage = await trio.open_tcp_stream(host, int(port))
        await garbage.send_all(b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n")
        assert await garbage.receive_some(100) == b""  # closed on us
        silent = await trio.open_tcp_stream(host, int(port))
        assert await silent.receive_some(100) == b""  # closed at the handshake deadline
        assert nets["b"].handshake_failures == 2
        assert (await nets["a"].call("b", "echo", {"ok": True}, timeout=5))[0]["ok"] is True
        await garbage.aclose()
        await silent.aclose()


async def test_client_connection_calls_and_wrong_secret() -> None:
    async with cluster("ab") as (_, addrs):
        async with open_client(addrs["b"], KEY, timeout=5) as client:
            assert client.peer_id == "b"
            async with trio.open_nursery() as nursery:  # concurrent calls share the connection
                results: dict[int, Any] = {}

                async def one(i: int) -> None:
                    results[i] = await client.call("echo", {"i": i}, os.urandom(i * 10_000), timeout=5)

                for i in range(5):
                    nursery.start_soon(one, i)
            assert sorted(r[0]["i"] for r in results.values()) == list(range(5))
            assert all(r[0]["peer"] == f"client key {KEY.id}" for r in results.values())
            with pytest.raises(RpcTimeout):
                await client.call("hang", {}, timeout=0.2)
            with pytest.raises(RemoteNotFound):
                await client.call("missing", {}, timeout=5)
        with pytest.raises(AuthenticationError, match="does not know client key"):
            async with open_client(addrs["b"], ClientKey(KEY.id, bytes(32)), timeout=5):
                pass
        with pytest.raises(AuthenticationError, match="does not know client key"):
            async with open_client(addrs["b"], ClientKey.generate(), timeout=5):
                pass
        with pytest.raises(NodeUnreachable):
            async with open_client("127.0.0.1:1", KEY, timeout=5):
                pass


async def test_node_with_wrong_secret_or_not_a_member_is_refused() -> None:
    async with cluster("ab") as (nets, addrs):
        intruder = RpcNetwork("a", bytes(32), {"b": addrs["b"]}, handler)  # a member's id
        stranger = RpcNetwork("x", SECRET, {"b": addrs["b"]}, handler)  # not a member
        async with trio.open_nursery() as nursery:
            await nursery.start(intruder.run)
            await nursery.start(stranger.run)
            with pytest.raises(NodeUnreachable, match="cluster secret"):
                await intruder.call("b", "echo", {}, timeout=5)
            with pytest.raises(NodeUnreachable, match="'x' is not a node of its cluster"):
                await stranger.call("b", "echo", {}, timeout=5)
            nursery.cancel_scope.cancel()
        assert nets["b"].handshake_failures >= 2


async def test_a_peer_that_comes_up_late_is_called_at_once_not_after_its_backoff() -> None:
    # As when a cluster starts: a's first connect to b fails (b not listening yet),
    # which starts a backoff; once b listens, a's next call must connect right away.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    a = RpcNetwork("a", SECRET, {"b": f"127.0.0.1:{port}"}, handler, backoff_initial=30)
    b = RpcNetwork("b", SECRET, {}, handler, members={"a", "b"})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(a.run)
            with pytest.raises(NodeUnreachable, match="cannot connect"):
                await a.call("b", "echo", {}, timeout=5)
            await nursery.start(b.serve, f"127.0.0.1:{port}")
            fields, _ = await a.call("b", "echo", {"x": 1}, timeout=5)
            assert fields["x"] == 1 and a.is_up("b")
            nursery.cancel_scope.cancel()
