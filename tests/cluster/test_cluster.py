"""Clusters of 3 and 5 nodes in one process, over real loopback TCP."""

from __future__ import annotations

import os

import pytest
import trio

from blocknode import fastpath
from blocknode.client import BATCH_MAX_BLOCK, open_client
from blocknode.errors import BlocknodeError, BlockNotFound, HashMismatch, QuorumError, RpcTimeout
from blocknode.protocol import ADMIN_BLOCK_INFO
from tests.cluster.harness import in_process_cluster

HEDGE_MARGIN = 3.0
"""Slack over the hedge delays for a hedged read on loaded cores (no hedge: >= 10 s)."""


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


SINGLE = 100_000
"""Over the client's batching size: `client_put` -> coordinator `put` -> `put_block`."""
BATCHED = 1_000
"""Batched: `client_put_many` -> coordinator `put_many` -> `put_blocks`."""
PUT_KIND = {SINGLE: "put_block", BATCHED: "put_blocks"}
QUORUM_HOLD = 1.0
"""How long the test waits for a put to return while only one replica has stored the
block. A correct put cannot return before the test releases the second replica,
whatever this value; one that counts a single acknowledgement returns within
milliseconds."""


async def _block_info(cl, node_id: str, h: bytes) -> dict:
    async with cl.client(node_id) as c:
        reply, _ = await c.call(ADMIN_BLOCK_INFO, {"hash": h})
    return reply


@pytest.mark.parametrize("size", [SINGLE, BATCHED], ids=["single", "batched"])
@pytest.mark.parametrize("fault", ["down", "failing"])
async def test_put_fails_when_two_of_three_replicas_cannot_store(tmp_path, size, fault):
    """rf 3, write quorum 2: with only the coordinator's own replica able to store the
    block, the put must fail (for a single large block as for a batch of small ones)."""
    assert SINGLE > BATCH_MAX_BLOCK >= BATCHED
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2) as cl:
            if fault == "down":
                await cl.stop("node2")
                await cl.stop("node3")
            else:
                async def disk_full(peer, fields, data):
                    raise BlocknodeError("cannot write block: [Errno 28] No space left on device")

                for nid in ("node2", "node3"):
                    cl.nodes[nid]._handlers[PUT_KIND[size]] = disk_full
            data = os.urandom(size)
            async with cl.client("node1") as c:
                with pytest.raises(BlocknodeError) as info:
                    await c.put(data, "r")
            msg = str(info.value)
            assert "quorum" in msg and "node2" in msg and "node3" in msg, msg


@pytest.mark.parametrize("size", [SINGLE, BATCHED], ids=["single", "batched"])
async def test_put_with_exactly_a_quorum_reachable_returns_once_both_replicas_hold_it(tmp_path, size):
    """node3 down: the put needs node1 *and* node2. node2's store is held back until the
    test releases it; the put must not return in the meantime, although node1 (the
    coordinator's own replica) has acknowledged. Once it returns, both hold the block
    and its reference."""
    with trio.fail_after(30):
        async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2) as cl:
            await cl.stop("node3")
            kind = PUT_KIND[size]
            n1, n2 = cl.nodes["node1"], cl.nodes["node2"]
            inner1, inner2 = n1._handlers[kind], n2._handlers[kind]
            node1_stored, release, returned = trio.Event(), trio.Event(), trio.Event()

            async def store_then_tell(peer, fields, data):
                reply = await inner1(peer, fields, data)
                node1_stored.set()
                return reply

            async def held_back(peer, fields, data):
                await release.wait()
                return await inner2(peer, fields, data)

            n1._handlers[kind] = store_then_tell
            n2._handlers[kind] = held_back
            data = os.urandom(size)
            h = fastpath.block_hash(data)
            async with cl.client("node1") as c:
                async def put() -> None:
                    assert await c.put(data, "r") == h.hex()
                    returned.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(put)
                    await node1_stored.wait()
                    # One acknowledgement is in: a put that does not wait for the write
                    # quorum returns now (within milliseconds); a correct one cannot.
                    with trio.move_on_after(QUORUM_HOLD):
                        await returned.wait()
                    assert not returned.is_set(), "put acknowledged before the write quorum stored it"
                    release.set()
            assert returned.is_set()
            for nid in ("node1", "node2"):
                info = await _block_info(cl, nid, h)
                assert info["present"] and info["rc"] == 1, (nid, info)


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
    """Whichever replica the coordinator asks first never answers: only the hedge saves the read.

    Reads go in order of measured latency, so the test does not pick the stuck
    replica by name: every replica's `get_block` handler shares one counter, and
    the first one asked stalls, the second answers with corrupt bytes, the third
    with the block. Without hedging the read would wait out `rpc_timeout` (30 s,
    beyond the client's own 10 s) on the first replica; with it, the read ends
    about two hedge delays later (one to ask the liar, one more to ask the good
    replica while the first is still pending).
    """
    hedge = 0.1
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 5, hedge_delay=hedge, rpc_timeout=30.0) as cl:
            data = _block_not_on(cl, "node1")
            h = fastpath.block_hash(data)
            # The coordinator's hedged read (the client's own: tests/cluster/test_direct.py).
            async with open_client(cl.cfg("node1"), timeout=10, direct=False) as c:
                await c.put(data, "r")
                replicas = list(cl.nodes["node1"].layout.write_nodes(h))
                # the put returned at the write quorum: let the third copy land too
                while not all(cl.nodes[n].blocks.exists(h) for n in replicas):
                    await trio.sleep(0.01)
                asked: list[str] = []

                def misbehave(nid, inner):
                    async def get_block(peer, fields, d):
                        if fields.get("hash") != h:
                            return await inner(peer, fields, d)
                        asked.append(nid)
                        if len(asked) == 1:
                            await trio.sleep_forever()  # the first replica asked is stuck
                        if len(asked) == 2:
                            return {}, b"not the block"  # the second one lies
                        return await inner(peer, fields, d)
                    return get_block

                for nid in replicas:
                    node = cl.nodes[nid]
                    node._handlers["get_block"] = misbehave(nid, node._handlers["get_block"])
                start = trio.current_time()
                with trio.fail_after(2 * hedge + HEDGE_MARGIN):
                    assert await c.get_block(h) == data
                assert trio.current_time() - start >= hedge  # it did wait for the stuck one first
                assert sorted(asked) == sorted(replicas)


async def test_call_to_silent_node_ends_at_its_timeout(tmp_path):
    """A call's own timeout ends it, not `rpc_timeout` (30 s here) nor the silent handler (never).

    The bound is a generous multiple of the timeout: on two shared cores a
    scheduling hiccup must not fail the test, and 5 s still tells a call that
    honours its 0.5 s timeout from one that waits for `rpc_timeout` or forever.
    """
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, rpc_timeout=30.0) as cl:
            async def never(peer, fields, data):
                await trio.sleep_forever()

            cl.nodes["node2"]._handlers["need_block"] = never
            net = cl.nodes["node1"].net
            start = trio.current_time()
            with pytest.raises(RpcTimeout) as info:
                await net.call("node2", "need_block", {"hash": b"\0" * 32}, timeout=0.5)
            elapsed = trio.current_time() - start
            assert "node2" in str(info.value)
            assert 0.5 <= elapsed < 0.5 * 10


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
                rows = [[f"r{i}", 8] for i in range(4096)]
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
                    "client_put_many", {"items": [["r" * 200, 8] for _ in range(n)]},
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
