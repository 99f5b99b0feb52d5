"""Clusters of 3 and 5 nodes in one process, over real loopback TCP."""

from __future__ import annotations

import os

import pytest
import trio

from blocknode import fastpath
from blocknode.errors import BlockNotFound, HashMismatch, QuorumError
from tests.cluster.harness import in_process_cluster


async def test_three_nodes_put_get_everywhere(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3) as cl:
            datas = [os.urandom(n) for n in (0, 1, 4096, 100_000, 1 << 20)]
            async with cl.client("node1") as c:
                hashes = [await c.put(d, "obj") for d in datas]
            for h, d in zip(hashes, datas, strict=True):
                assert h == fastpath.block_hash(d).hex()
            # rf 3 on 3 nodes: a write quorum holds each block at once, and every node soon
            for h in hashes:
                hb = bytes.fromhex(h)
                assert sum(n.blocks.exists(hb) for n in cl.nodes.values()) >= 2
                while not all(n.blocks.exists(hb) for n in cl.nodes.values()):
                    await trio.sleep(0.01)
            for nid in cl.nodes:
                async with cl.client(nid) as c:
                    for h, d in zip(hashes, datas, strict=True):
                        assert await c.get(h) == d


async def test_large_data_manifest_round_trip(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3, block_size=65536) as cl:
            data = os.urandom(65536 * 5 + 123)
            async with cl.client("node2") as c:
                h = await c.put(data, "big")
                assert h != fastpath.block_hash(data).hex()
                assert await c.get(h) == data
                await c.ref(h, "second")
            # every block of the manifest (6 data blocks + the manifest) carries both
            # references on a write quorum at least (the third copy may still be in flight)
            live: dict[bytes, int] = {}
            for n in cl.nodes.values():
                for r in n.meta.iter_refs():
                    if not r.deleted:
                        live[r.hash] = live.get(r.hash, 0) + 1
            assert len(live) == 7
            assert all(count >= 2 * 2 for count in live.values())  # 2 refs x quorum 2


async def test_one_of_three_down_put_and_get_succeed(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3) as cl:
            await cl.stop("node3")
            async with cl.client("node1") as c:
                h = await c.put(b"x" * 5000, "r")
                assert await c.get(h) == b"x" * 5000
                h2 = await c.put(os.urandom(200_000), "r")
                assert len(await c.get(h2)) == 200_000


async def test_two_of_three_down_put_fails_naming_them(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3) as cl:
            await cl.stop("node2")
            await cl.stop("node3")
            async with cl.client("node1") as c:
                with pytest.raises(Exception) as info:
                    await c.put(b"data", "r")
            msg = str(info.value)
            assert "quorum" in msg and "node2" in msg and "node3" in msg


async def test_five_nodes_rf3(tmp_path):
    with trio.fail_after(40):
        async with in_process_cluster(tmp_path, 5) as cl:
            datas = [os.urandom(3000 + i) for i in range(30)]
            async with cl.client("node4") as c:
                hashes = [await c.put(d, "o") for d in datas]
            for h in hashes:
                holders = [nid for nid, n in cl.nodes.items() if n.blocks.exists(bytes.fromhex(h))]
                # every block landed on at least the write quorum of its 3 nodes
                expected = set(cl.nodes["node1"].layout.write_nodes(bytes.fromhex(h)))
                assert len(set(holders) & expected) >= 2 and set(holders) <= expected
            async with cl.client("node1") as c:
                for h, d in zip(hashes, datas, strict=True):
                    assert await c.get(h) == d


async def test_missing_block_is_not_found(tmp_path):
    with trio.fail_after(20):
        async with in_process_cluster(tmp_path, 3) as cl:
            async with cl.client("node1") as c:
                with pytest.raises(BlockNotFound):
                    await c.get("ab" * 32)


def _block_not_on(cl, node_id: str) -> bytes:
    layout = cl.nodes["node1"].layout
    for i in range(10_000):
        d = f"block {i}".encode()
        if node_id not in layout.write_nodes(fastpath.block_hash(d)):
            return d
    raise AssertionError("no such block")


async def test_hedged_read_and_corrupt_replica_skipped(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 5, hedge_delay=0.05) as cl:
            data = _block_not_on(cl, "node1")
            h = fastpath.block_hash(data)
            async with cl.client("node1") as c:
                await c.put(data, "r")
                replicas = list(cl.nodes["node1"].layout.write_nodes(h))
                # the put returned at the write quorum: let the third copy land too
                while not all(cl.nodes[n].blocks.exists(h) for n in replicas):
                    await trio.sleep(0.01)
                # one replica never answers, one answers with corrupt bytes
                stuck, liar, good = replicas

                async def never(peer, fields, data):
                    await trio.sleep_forever()

                async def lie(peer, fields, data):
                    return {}, b"not the block"

                cl.nodes[stuck]._handlers["get_block"] = never
                cl.nodes[liar]._handlers["get_block"] = lie
                start = trio.current_time()
                assert await c.get_block(h) == data
                # the stuck node would have held us for rpc_timeout (5 s); the hedge did not
                assert trio.current_time() - start < 2.0


async def test_call_to_silent_node_ends_at_its_timeout(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3) as cl:
            async def never(peer, fields, data):
                await trio.sleep_forever()

            cl.nodes["node2"]._handlers["need_block"] = never
            net = cl.nodes["node1"].net
            start = trio.current_time()
            with pytest.raises(Exception) as info:
                await net.call("node2", "need_block", {"hash": b"\0" * 32}, timeout=0.5)
            elapsed = trio.current_time() - start
            assert "node2" in str(info.value)
            assert 0.5 <= elapsed < 0.8


async def test_quorum_error_lists_each_failure(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3) as cl:
            await cl.stop("node3")
            net = cl.nodes["node1"].net
            with pytest.raises(QuorumError) as info:
                await net.call_many(["node1", "node2", "node3"], "need_block", {"hash": b"\1" * 32},
                                    quorum=3, timeout=2)
            assert set(info.value.failures) == {"node3"}
            assert info.value.successes <= 2
            with pytest.raises(QuorumError) as info:
                await net.call_many(["node1", "node2"], "need_block", {"hash": b"short"},
                                    quorum=1, timeout=2)
            assert set(info.value.failures) == {"node1", "node2"}
            assert "32-byte" in str(info.value)


async def test_receiver_rejects_a_block_that_does_not_match_its_hash(tmp_path):
    with trio.fail_after(20):
        async with in_process_cluster(tmp_path, 3) as cl:
            net = cl.nodes["node1"].net
            h = fastpath.block_hash(b"the real bytes")
            for target in ("node1", "node2"):  # local and remote replicas both verify
                with pytest.raises(HashMismatch):
                    await net.call(target, "put_block", {"hash": h, "ref_id": "r", "ts": 1},
                                   b"other bytes", timeout=5)
                assert not cl.nodes[target].blocks.exists(h)
                assert cl.nodes[target].meta.rc_get(h).count == 0


async def test_concurrent_small_puts_share_rpcs_and_keep_their_own_results(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 5) as cl:
            node = cl.nodes["node1"]
            calls = []
            inner = node._handlers["client_put_many"]

            async def counting(peer, fields, data):
                calls.append(len(fields["items"]))
                return await inner(peer, fields, data)

            node._handlers["client_put_many"] = counting
            datas = [os.urandom(100 + i) for i in range(60)]
            results: dict[int, str] = {}
            async with cl.client("node1") as c:
                async def put(i):
                    results[i] = await c.put(datas[i], f"r{i}")

                async with trio.open_nursery() as n:
                    for i in range(60):
                        n.start_soon(put, i)
                assert sum(calls) == 60 and len(calls) < 10  # batched
                for i, d in enumerate(datas):
                    assert results[i] == fastpath.block_hash(d).hex()
                    assert await c.get(results[i]) == d
            # each block went to its own write nodes, with its own reference
            for i, d in enumerate(datas):
                h = fastpath.block_hash(d)
                for nid in node.layout.write_nodes(h):
                    refs = cl.nodes[nid].meta.refs_of(h)
                    if refs:
                        assert [(r.ref_id, r.deleted) for r in refs] == [(f"r{i}", False)]


async def test_batched_puts_fail_per_item_with_the_quorum_error(tmp_path):
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3) as cl:
            await cl.stop("node2")
            await cl.stop("node3")
            async with cl.client("node1") as c:
                errors = []

                async def put(i):
                    try:
                        await c.put(os.urandom(50), f"r{i}")
                    except Exception as exc:  # noqa: BLE001
                        errors.append(str(exc))

                async with trio.open_nursery() as n:
                    for i in range(10):
                        n.start_soon(put, i)
            assert len(errors) == 10
            assert all("quorum" in e and "node2" in e and "node3" in e for e in errors)


async def test_batches_split_by_size_leave_no_put_behind(tmp_path):
    with trio.fail_after(20):
        async with in_process_cluster(tmp_path, 3, block_size=65536) as cl:
            async with cl.client("node1") as c:
                datas = [os.urandom(30_000) for _ in range(20)]  # two per 64 KiB batch
                got: list[str] = []

                async def put(d):
                    got.append(await c.put(d, "r"))

                async with trio.open_nursery() as n:
                    for d in datas:
                        n.start_soon(put, d)
                assert sorted(got) == sorted(fastpath.block_hash(d).hex() for d in datas)


async def test_block_size_above_one_mib_round_trips_through_a_client(tmp_path):
    # One message limit for nodes and clients, derived from block_size (issue 8 point 2):
    # a client whose connection kept the 1 MiB default refused every full block it fetched.
    mib = 1024 * 1024
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, block_size=4 * mib) as cl:
            block = os.urandom(4 * mib)
            data = os.urandom(10 * mib)
            src = tmp_path / "ten.bin"
            src.write_bytes(data)
            async with cl.client("node1") as c:
                h_block = await c.put(block, "one-block")
                assert h_block == fastpath.block_hash(block).hex()
                h_file = await c.put_file(str(src), "ten-mib")
            async with cl.client("node2") as c:
                assert await c.get(h_block) == block
                assert await c.get(h_file) == data


async def test_put_many_batches_are_refused_up_front_or_answered_in_full(tmp_path):
    # Issue 9 B.7: a 4096-row client_put_many stored everything, then could not encode
    # its reply (head > 64 KiB) and answered 'internal'.
    from blocknode.rpc.errors import RemoteCallError
    from blocknode.rpc.wire import MAX_BATCH_ROWS

    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3) as cl:
            async with cl.client("node1") as c:
                rows = [[f"r{i}", 1, 8] for i in range(4096)]
                payload = b"".join(i.to_bytes(8, "big") for i in range(4096))
                with pytest.raises(RemoteCallError) as info:
                    await c.call("client_put_many", {"items": rows}, payload)
                assert info.value.code == "bad_request" and str(MAX_BATCH_ROWS) in info.value.message
                assert all(n.meta.counts()["refs"] == 0 for n in cl.nodes.values())  # nothing done
                # the largest batch allowed, every row failing with a long error: still answered
                await cl.stop("node2")
                await cl.stop("node3")
                n = MAX_BATCH_ROWS
                reply, _ = await c.call(
                    "client_put_many", {"items": [["r" * 200, 1, 8] for _ in range(n)]},
                    b"".join(i.to_bytes(8, "big") for i in range(n)))
                assert reply["hashes"] == [None] * n
                assert len(reply["errors"]) == n and all("quorum" in e for e in reply["errors"])


async def test_client_batches_respect_the_row_and_head_limits(tmp_path):
    # Issue 9 B.7: the client batcher keeps each batch within MAX_BATCH_ROWS rows and a
    # head that fits (long reference ids), so 300 concurrent small puts all succeed.
    from blocknode.rpc.wire import MAX_BATCH_ROWS

    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 1, rf=1) as cl:
            node = cl.nodes["node1"]
            sizes: list[int] = []
            inner = node._handlers["client_put_many"]

            async def counting(peer, fields, data):
                sizes.append(len(fields["items"]))
                return await inner(peer, fields, data)

            node._handlers["client_put_many"] = counting
            datas = [os.urandom(64) for _ in range(300)]
            async with cl.client("node1") as c:
                async def put(i):
                    await c.put(datas[i], f"{i:03d}" + "r" * 252)

                async with trio.open_nursery() as n:
                    for i in range(300):
                        n.start_soon(put, i)
            assert sum(sizes) == 300 and max(sizes) <= MAX_BATCH_ROWS and len(sizes) >= 2
