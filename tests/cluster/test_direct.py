"""The direct path (issue 15 item 2): a client puts large blocks to their replicas and reads
them from one itself; each replica checks the key, its layout and the hash, and stamps
the reference with its own clock. In-process clusters on loopback TCP."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from blocknode import fastpath
from blocknode.client import Client, open_client
from blocknode.clock import wall_ms
from blocknode.errors import BlockCorrupted, BlockNotFound, Forbidden, HashMismatch, RemoteError
from blocknode.fastpath import block_hash
from blocknode.protocol import (
    ADMIN_KEY_CREATE,
    ADMIN_LAYOUT_APPLY,
    ADMIN_LAYOUT_REMOVE,
    CLIENT_PUT_DIRECT,
)
from blocknode.rpc.connect import open_client as open_rpc_client
from blocknode.rpc.handshake import ClientKey
from tests.cluster.harness import InProcessCluster, in_process_cluster

MIB = 1 << 20


async def make_key(cl: InProcessCluster, *perms: str) -> ClientKey:
    """A client key with `perms`, known to every node when this returns."""
    key = ClientKey.generate()
    async with cl.client("node1") as admin:
        reply, _ = await admin.call(ADMIN_KEY_CREATE, {"name": f"k{os.urandom(3).hex()}",
                                                       "id": key.id, "permissions": list(perms),
                                                       "verifier": key.verifier})
    assert reply["nodes"] == len(cl.nodes)
    return key


@asynccontextmanager
async def client(cl: InProcessCluster, key: ClientKey, node: str = "node1",
                 direct: bool | None = None) -> AsyncIterator[Client]:
    async with open_client(cl.cfg(node), key=key, timeout=10, direct=direct) as c:
        yield c


def holders(cl: InProcessCluster, h: bytes, ref_id: str) -> dict[str, int]:
    """node → the time of its live version of reference `ref_id` on `h`."""
    out = {}
    for nid, n in cl.nodes.items():
        (v,) = n.meta.ref_versions([(h, ref_id)])
        if v is not None and not v.deleted:
            out[nid] = v.ts_ms
    return out


def direct_puts(cl: InProcessCluster) -> dict[str, int]:
    return {nid: n.direct.puts for nid, n in cl.nodes.items()}


async def test_a_large_put_goes_to_the_replicas_and_a_get_comes_from_one(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 4, rf=2, write_quorum=2) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            layout = cl.nodes["node1"].layout
            datas = [os.urandom(MIB - i) for i in range(6)]
            while all("node1" in layout.write_nodes(block_hash(d)) for d in datas):
                datas[-1] = os.urandom(MIB - 5)  # at least one block node1 holds no copy of
            hashes = [bytes.fromhex(await c.put(d, f"r{i}")) for i, d in enumerate(datas)]
            assert c.direct is not None and c.direct.stats["puts"] == 6
            assert c.direct.stats["put_fallbacks"] == 0
            for i, (h, d) in enumerate(zip(hashes, datas, strict=True)):
                assert h == block_hash(d)
                layout_nodes = set(cl.nodes["node1"].layout.write_nodes(h))
                assert set(holders(cl, h, f"r{i}")) == layout_nodes
                assert await c.get(h.hex()) == d
            assert c.direct.stats["gets"] == 6 and c.direct.stats["get_fallbacks"] == 0
        # Blocks whose replicas do not include node1 were sent there by the client itself.
        assert sum(direct_puts(cl).values()) == 12
        assert any(cl.nodes["node1"].node_id not in cl.nodes["node1"].layout.write_nodes(h)
                   for h in hashes)
        # Off: everything goes through node1 (no replica sees a direct put).
        before = direct_puts(cl)
        async with client(cl, key, direct=False) as c:
            d = os.urandom(MIB)
            h = await c.put(d)
            assert c.direct is None and await c.get(h) == d
        assert direct_puts(cl) == before


async def test_a_compressible_block_is_compressed_once_by_the_client(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            d = b"compressible " * (MIB // 13)
            h = bytes.fromhex(await c.put(d, "r"))
            assert c.direct is not None and c.direct.stats["puts"] == 1
            assert c.direct.level == cl.cfg("node1").compression_level is not None
            with trio.fail_after(10):
                while len(holders(cl, h, "r")) < 3:
                    await trio.sleep(0.02)
            for nid in cl.nodes:
                data_dir = Path(cl.cfg(nid).data_dir) if isinstance(cl.cfg(nid).data_dir, str) \
                    else Path(cl.cfg(nid).data_dir[0].path)
                names = [p.name for p in data_dir.rglob(f"{h.hex()}*")]
                assert names and all(n.endswith(".zst") for n in names), (nid, names)
            assert await c.get(h.hex()) == d


async def test_with_a_replica_down_the_quorum_is_met_directly(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2, rpc_timeout=2.0) as cl:
        key = await make_key(cl, "read", "write")
        await cl.stop("node3")
        async with client(cl, key) as c:
            d = os.urandom(MIB)
            h = bytes.fromhex(await c.put(d, "r"))
            assert c.direct is not None and c.direct.stats["puts"] == 1
            assert set(holders(cl, h, "r")) == {"node1", "node2"}
            assert await c.get(h.hex()) == d


async def test_replicas_the_client_cannot_reach_fall_back_to_the_node(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=3, rpc_timeout=2.0,
                                  connect_timeout=0.5) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            assert c.direct is not None
            await c.direct.refresh()
            # The client cannot reach node2 and node3 (the nodes can).
            c.direct._addrs.update({"node2": "127.0.0.1:1", "node3": "127.0.0.1:1"})
            d = os.urandom(MIB)
            h = bytes.fromhex(await c.put(d, "r"))
            assert c.direct.stats == {**c.direct.stats, "puts": 0, "put_fallbacks": 1}
            assert set(holders(cl, h, "r")) == {"node1", "node2", "node3"}
            assert await c.get(h.hex()) == d


async def test_a_stale_client_layout_is_refreshed_and_the_put_succeeds(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 4, rf=3, write_quorum=2, rpc_timeout=10.0) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            assert c.direct is not None
            await c.direct.refresh()
            assert c.direct.layout is not None and c.direct.layout.versions == [1]
            async with cl.client("node1") as admin:
                await admin.call(ADMIN_LAYOUT_REMOVE, {"node": "node4"})
                await admin.call(ADMIN_LAYOUT_APPLY, {"version": 2})
            with trio.fail_after(10):  # (v1 may retire at once: no data to move)
                while not all(n.layouts.state.current == 2 for n in cl.nodes.values()):
                    await trio.sleep(0.05)
            d = os.urandom(MIB)
            h = bytes.fromhex(await c.put(d, "r"))
            assert c.direct.stats["refreshes"] == 2 and c.direct.layout.versions[-1] == 2
            assert c.direct.stats["puts"] == 1 and c.direct.stats["put_fallbacks"] == 0
            # A write quorum of each live version holds it.
            stored = set(holders(cl, h, "r"))
            for nodes, q in cl.nodes["node1"].layout.write_sets(h):
                assert len(stored & set(nodes)) >= q
            assert await c.get(h.hex()) == d


async def test_a_replica_refuses_a_key_without_write_a_bad_hash_a_wrong_node_and_a_ts(
        tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 4, rf=2, write_quorum=2) as cl:
        reader = await make_key(cl, "read")
        writer = await make_key(cl, "write")
        d = os.urandom(MIB)
        h = block_hash(d)
        layout = cl.nodes["node1"].layout
        holder = layout.write_nodes(h)[0]
        other = next(n for n in cl.nodes if n not in layout.write_nodes(h))
        fields = {"hash": h, "ref_id": "r", "versions": layout.versions}

        async def call(node: str, key: ClientKey, fields: dict, data: bytes) -> None:
            async with open_rpc_client(cl.cfg(node).rpc_bind_addr, key, timeout=5,
                                       max_message_size=2 * MIB + 65536) as conn:
                await conn.call(CLIENT_PUT_DIRECT, fields, data, timeout=5)

        with pytest.raises(Forbidden, match="lacks the 'write' permission"):
            await call(holder, reader, fields, d)
        async with client(cl, reader) as c:
            with pytest.raises(Forbidden):
                await c.put_block(d, "r")
        bad = d[:-1] + bytes([d[-1] ^ 1])
        with pytest.raises(HashMismatch):
            await call(holder, writer, fields, bad)
        with pytest.raises(HashMismatch):  # verified and written from the receive buffer
            await call(holder, writer, {**fields, "form_final": True}, bad)
        with pytest.raises(RemoteError) as info:
            await call(other, writer, fields, d)
        assert info.value.code == "wrong_node"
        with pytest.raises(RemoteError) as info:
            await call(holder, writer, {**fields, "versions": [0]}, d)
        assert info.value.code == "stale_layout"
        with pytest.raises(RemoteError, match="ts"):
            await call(holder, writer, {**fields, "ts": 2**62}, d)
        assert holders(cl, h, "r") == {}
        assert not any([await n.blocks.aexists(h) for n in cl.nodes.values()])
        await call(holder, writer, fields, d)
        assert set(holders(cl, h, "r")) == {holder}


async def test_reference_times_come_from_each_replicas_clock(tmp_path: Path) -> None:
    ahead = wall_ms() + 3_600_000  # the nodes' clock: an hour ahead of the client's
    async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2,
                                  clock=lambda: ahead) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            d = os.urandom(MIB)
            h = bytes.fromhex(await c.put(d, "r"))
            assert c.direct is not None and c.direct.stats["puts"] == 1
        with trio.fail_after(10):
            while len(holders(cl, h, "r")) < 3:
                await trio.sleep(0.02)
        times = holders(cl, h, "r")
        for nid, ts in times.items():
            node_clock = cl.nodes[nid].manager.clock
            assert ahead <= ts <= node_clock.last, (nid, ts)
        assert all(ts > wall_ms() + 3_000_000 for ts in times.values())
        assert fastpath.hash_to_hex(h) == h.hex()


async def test_the_layout_is_fetched_again_once_it_is_older_than_the_interval(
        tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            assert c.direct is not None
            c.direct.refresh_interval = 0.0
            for _ in range(2):
                await c.put(os.urandom(MIB))
                await trio.sleep(0.01)
            assert c.direct.stats["refreshes"] == 2
            assert c.direct.home_id == "node1" and c.direct.layout is not None
            assert set(c.direct.layout.node_ids) == {"node1", "node2", "node3"}
            c.direct.refresh_interval = 3600.0
            await c.put(os.urandom(MIB))
            assert c.direct.stats["refreshes"] == 2 and c.direct.stats["puts"] == 3


async def test_a_direct_read_hedges_past_a_stuck_replica_and_a_lying_one(tmp_path: Path) -> None:
    """Of the block's three replicas, the first the client asks never answers, the second
    sends corrupt bytes, the third the block: the client's hedge and its own check get it."""
    async with in_process_cluster(tmp_path, 5, rf=3, write_quorum=2, hedge_delay=0.1,
                                  rpc_timeout=30.0) as cl:
        key = await make_key(cl, "read", "write")
        while True:
            d = os.urandom(MIB)
            h = block_hash(d)
            replicas = list(cl.nodes["node1"].layout.write_nodes(h))
            if "node1" not in replicas:
                break
        async with client(cl, key) as c:
            assert bytes.fromhex(await c.put(d, "r")) == h
            with trio.fail_after(10):
                while not all(cl.nodes[n].blocks.exists(h) for n in replicas):
                    await trio.sleep(0.01)
            asked: list[str] = []

            def misbehave(nid: str, inner):  # noqa: ANN001, ANN202
                async def get(peer, fields, data):  # noqa: ANN001, ANN202
                    if fields.get("hash") != h:
                        return await inner(peer, fields, data)
                    asked.append(nid)
                    if len(asked) == 1:
                        await trio.sleep_forever()
                    if len(asked) == 2:
                        return {}, b"not the block"
                    return await inner(peer, fields, data)
                return get

            for nid in replicas:
                node = cl.nodes[nid]
                node._handlers["client_get_direct"] = misbehave(
                    nid, node._handlers["client_get_direct"])
            assert c.direct is not None
            with trio.fail_after(10):
                assert await c.get_block(h) == d
            assert sorted(asked) == sorted(replicas)
            assert c.direct.stats["gets"] == 1 and c.direct.stats["get_fallbacks"] == 0


async def _spread_block(cl: InProcessCluster, c: Client) -> tuple[bytes, bytes, list[str]]:
    """A 1 MiB block none of whose replicas is node1 (the client's home), on all of them."""
    while True:
        d = os.urandom(MIB)
        h = block_hash(d)
        replicas = list(cl.nodes["node1"].layout.write_nodes(h))
        if "node1" not in replicas:
            break
    assert bytes.fromhex(await c.put(d, "r")) == h
    with trio.fail_after(10):
        while not all(cl.nodes[n].blocks.exists(h) for n in replicas):
            await trio.sleep(0.01)
    return d, h, replicas


async def test_a_direct_read_asks_a_slow_first_replica_again_last(tmp_path: Path) -> None:
    """The first replica asked does not answer within the hedge delay, the other two have
    no copy: the client asks the others, then the first one again, which answers."""
    async with in_process_cluster(tmp_path, 5, rf=3, write_quorum=2, hedge_delay=0.1,
                                  rpc_timeout=30.0) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            d, h, replicas = await _spread_block(cl, c)
            asked: list[str] = []

            def misbehave(nid: str, inner):  # noqa: ANN001, ANN202
                async def get(peer, fields, data):  # noqa: ANN001, ANN202
                    if fields.get("hash") != h:
                        return await inner(peer, fields, data)
                    asked.append(nid)
                    if len(asked) == 1:
                        await trio.sleep(5)  # slow, past the hedge delay
                    if nid != asked[0]:
                        raise BlockNotFound(h.hex())
                    return await inner(peer, fields, data)
                return get

            for nid in replicas:
                node = cl.nodes[nid]
                node._handlers["client_get_direct"] = misbehave(
                    nid, node._handlers["client_get_direct"])
            assert c.direct is not None
            with trio.fail_after(4):  # well before the slow first answer
                got = await c.get_block(h)
            assert got == d and type(got) is bytes  # the bytes received, no VerifiedBlock
            assert len(asked) == 4 and asked[0] == asked[3]
            assert sorted(asked[:3]) == sorted(replicas)
            assert c.direct.stats["gets"] == 1 and c.direct.stats["get_fallbacks"] == 0


async def test_a_direct_read_does_not_ask_a_failed_first_replica_again(tmp_path: Path) -> None:
    """The first replica asked has no copy: the next is asked at once, the first never again."""
    async with in_process_cluster(tmp_path, 5, rf=3, write_quorum=2, hedge_delay=5.0,
                                  rpc_timeout=30.0) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            d, h, replicas = await _spread_block(cl, c)
            asked: list[str] = []

            def misbehave(nid: str, inner):  # noqa: ANN001, ANN202
                async def get(peer, fields, data):  # noqa: ANN001, ANN202
                    if fields.get("hash") != h:
                        return await inner(peer, fields, data)
                    asked.append(nid)
                    if len(asked) == 1:
                        raise BlockNotFound(h.hex())
                    return await inner(peer, fields, data)
                return get

            for nid in replicas:
                node = cl.nodes[nid]
                node._handlers["client_get_direct"] = misbehave(
                    nid, node._handlers["client_get_direct"])
            with trio.fail_after(4):  # far less than the hedge delay: no waiting on a failure
                assert await c.get_block(h) == d
            assert len(asked) == 2 and asked[0] != asked[1]


async def test_a_node_reads_its_own_copy_first_and_the_others_only_when_it_fails(
        tmp_path: Path) -> None:
    """`BlockManager.get` on a replica that comes first in the read order: its own copy,
    without a network call; when that copy is corrupt, another replica's; when no node
    has it, `BlockNotFound` naming every node asked."""
    async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2, hedge_delay=5.0) as cl:
        key = await make_key(cl, "read", "write")
        d = os.urandom(MIB)
        async with client(cl, key) as c:
            h = bytes.fromhex(await c.put(d, "r"))
        with trio.fail_after(10):
            while not all(n.blocks.exists(h) for n in cl.nodes.values()):
                await trio.sleep(0.01)
        m = cl.nodes["node1"].manager
        assert m.read_order(h)[0] == "node1"
        calls: list[str] = []
        net_call = m.net.call

        async def counting_call(node, kind, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append(node)
            return await net_call(node, kind, *args, **kwargs)

        m.net.call = counting_call  # type: ignore[method-assign]
        assert await m.get(h) == d and calls == []
        read_local = m.read_local

        async def corrupt(hh: bytes):  # noqa: ANN202
            if hh == h:
                raise BlockCorrupted(h.hex())
            return await read_local(hh)

        m.read_local = corrupt  # type: ignore[method-assign]
        with trio.fail_after(4):  # no hedge wait: the failure sends it on at once
            assert await m.get(h) == d
        assert len(calls) == 1 and calls[0] != "node1"
        m.read_local = read_local  # type: ignore[method-assign]
        missing = fastpath.block_hash(b"never stored")
        with pytest.raises(BlockNotFound) as info:
            await m.get(missing, nodes=["node1", "node2", "node3"])
        assert "node1, node2, node3" in str(info.value)


async def test_a_direct_read_opens_the_first_replicas_connection_past_the_hedge_delay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hedge delay far shorter than a handshake: the first get from a fresh client opens
    each replica's connection once (the first one's handshake is not cut at the hedge
    deadline and tried again), and the next get uses it."""
    from blocknode.client import direct as direct_mod
    opened: list[str] = []
    real_open = direct_mod.open_connection

    async def counting_open(addr, secret, **kw):  # noqa: ANN001, ANN003, ANN202
        opened.append(kw["expected_peer_id"])
        return await real_open(addr, secret, **kw)

    async with in_process_cluster(tmp_path, 5, rf=3, write_quorum=2, hedge_delay=0.0005,
                                  rpc_timeout=30.0) as cl:
        key = await make_key(cl, "read", "write")
        async with client(cl, key) as c:
            d, h, replicas = await _spread_block(cl, c)
        monkeypatch.setattr(direct_mod, "open_connection", counting_open)
        async with client(cl, key) as c:  # a fresh client: no connection to a replica yet
            assert c.direct is not None and await c.direct._ready()
            first = c.direct.layout.read_nodes(h, c.direct.home_id)[0]
            assert first in replicas and not c.direct._connected(first)

            def slow(inner):  # noqa: ANN001, ANN202 - the others answer late: the first wins
                async def get(peer, fields, data):  # noqa: ANN001, ANN202
                    await trio.sleep(3)
                    return await inner(peer, fields, data)
                return get

            for nid in replicas:
                if nid != first:
                    node = cl.nodes[nid]
                    node._handlers["client_get_direct"] = slow(node._handlers["client_get_direct"])
            with trio.fail_after(10):
                assert await c.get_block(h) == d
            assert opened.count(first) == 1 and c.direct._connected(first)
            assert await c.get_block(h) == d
            assert opened.count(first) == 1
            assert c.direct.stats["gets"] == 2 and c.direct.stats["get_fallbacks"] == 0
