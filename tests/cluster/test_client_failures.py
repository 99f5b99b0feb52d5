"""Client-side failures that left state behind (issue 9 C.14), on in-process clusters.

- a multi-block put that fails (too many blocks for one manifest, a lost quorum,
  a cancellation) left its blocks referenced forever under a reference nobody
  knew;
- a put or unref below quorum said "0/2 succeeded" while the coordinator had
  applied it; the retry of the same command must converge.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio

from blocknode.client.manifest import max_manifest_blocks
from blocknode.errors import BlocknodeError, RemoteError
from blocknode.node import Node
from tests.cluster.harness import in_process_cluster

BLOCK = 4096
FIELDS = {"block_size": BLOCK, "inline_threshold": 1024, "rpc_timeout": 3.0}


def live_refs(node: Node) -> list[tuple[str, str]]:
    """(hash hex, ref id) of every live reference the node holds."""
    return sorted((r.hash.hex(), r.ref_id) for r in node.meta.iter_refs() if not r.deleted)


def live_ref_ids(node: Node, h: bytes) -> set[str]:
    return {r.ref_id for r in node.meta.refs_of(h) if not r.deleted}


async def test_a_put_too_large_for_one_manifest_stores_nothing(tmp_path):
    """Issue 9 C.14: 'too many blocks for one manifest' was found only after every block
    had been stored (and referenced, under a reference nobody knew)."""
    limit = max_manifest_blocks(BLOCK)
    data = os.urandom(BLOCK * (limit + 1))
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 1, rf=1, **FIELDS) as cl:
            node = cl.nodes["node1"]
            async with cl.client("node1") as c:
                with pytest.raises(BlocknodeError, match="more than one manifest can list") as e:
                    await c.put(data)
                assert "nothing was stored" in str(e.value)
                assert node.meta.counts()["refs"] == 0 and node.blocks.count() == 0
                src = tmp_path / "big"
                src.write_bytes(data)
                with pytest.raises(BlocknodeError, match="nothing was stored"):
                    await c.put_file(str(src), "doc")
                assert node.meta.counts()["refs"] == 0

                async def stream() -> AsyncIterator[bytes]:  # its size unknown up front
                    for i in range(limit + 1):
                        yield data[i * BLOCK:(i + 1) * BLOCK]

                with pytest.raises(BlocknodeError, match="more than one manifest can list") as e:
                    await c.put_chunks(stream(), ref=None)
                assert f"released from the {limit} block(s) stored" in str(e.value.__notes__)
                assert live_refs(node) == []
                assert all(not rc.is_nonzero() for _, rc in node.meta.refs.iter_rc())
                # at the limit exactly, it fits
                h = await c.put(data[:BLOCK * limit], "fits")
                assert await c.get(h) == data[:BLOCK * limit]


async def test_a_put_that_loses_its_quorum_releases_what_it_stored(tmp_path):
    """Issue 9 C.14: a multi-block put below quorum left its blocks referenced on the nodes
    that took them; a failed re-put must not take away the reference the data had."""
    data = os.urandom(5 * BLOCK + 10)
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, rf=3, **FIELDS) as cl:
            node1 = cl.nodes["node1"]
            async with cl.client("node1") as c:
                kept = await c.put(data, "doc")
                before = live_refs(node1)
                await cl.stop("node2")
                await cl.stop("node3")
                # a fresh reference: released from every block node1 took
                with pytest.raises(RemoteError, match="applied on node1") as e:
                    await c.put(data + b"!")
                assert "was released from" in " ".join(e.value.__notes__)
                assert live_refs(node1) == before
                # a reference given: the blocks were staged under a temporary one
                with pytest.raises(RemoteError, match="quorum"):
                    await c.put(data, "doc")
                assert live_refs(node1) == before  # "doc" still names the data
                with pytest.raises(RemoteError, match="quorum"):
                    await c.put(os.urandom(3 * BLOCK), "other")
                assert live_refs(node1) == before
            await cl.start("node2")
            await cl.start("node3")
            async with cl.client("node2") as c:
                assert await c.get(kept) == data


async def test_a_cancelled_put_releases_what_it_stored(tmp_path):
    """Issue 9 C.14: Ctrl-C in the middle of a large put left its blocks referenced."""
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 1, rf=1, **FIELDS) as cl:
            node = cl.nodes["node1"]
            async with cl.client("node1") as c:
                for ref in (None, "doc"):
                    with trio.CancelScope() as scope:
                        async def chunks(scope: trio.CancelScope = scope) -> AsyncIterator[bytes]:
                            for _ in range(3):
                                yield os.urandom(BLOCK)
                            while len(live_refs(node)) < 3:  # the three are stored
                                await trio.sleep(0.01)
                            scope.cancel()  # as Ctrl-C would
                            await trio.sleep(5)
                            yield os.urandom(BLOCK)

                        await c.put_chunks(chunks(), ref=ref)
                    assert scope.cancelled_caught
                    assert live_refs(node) == [], ref


async def test_below_quorum_says_where_it_applied_and_the_retry_converges(tmp_path):
    """Issue 9 C.14: a put or unref below quorum said "0/2 succeeded" while the
    coordinator kept the block and its reference (or deleted the reference)."""
    small, large = os.urandom(100), os.urandom(3000)
    with trio.fail_after(60):
        async with in_process_cluster(tmp_path, 3, rf=3, **FIELDS) as cl:
            await cl.stop("node2")
            await cl.stop("node3")
            async with cl.client("node1") as c:
                for data in (small, large):
                    with pytest.raises(RemoteError) as e:
                        await c.put(data, "doc")
                    assert "(1/2 succeeded, applied on node1)" in str(e.value), str(e.value)
                    assert "node2" in str(e.value) and "node3" in str(e.value)
            await cl.start("node2")
            await cl.start("node3")
            async with cl.client("node1") as c:
                hashes = [bytes.fromhex(await c.put(d, "doc")) for d in (small, large)]  # the retry
            for h in hashes:
                with trio.fail_after(10):  # the third write runs on after the quorum
                    while not all(live_ref_ids(n, h) == {"doc"} and n.blocks.exists(h)
                                  for n in cl.nodes.values()):
                        await trio.sleep(0.05)
            await cl.stop("node3")
            await cl.stop("node2")
            async with cl.client("node1") as c:
                with pytest.raises(RemoteError, match=r"\(1/2 succeeded, applied on node1\)"):
                    await c.unref(hashes[0].hex(), "doc")
            await cl.start("node2")
            await cl.start("node3")
            async with cl.client("node1") as c:
                assert await c.unref(hashes[0].hex(), "doc") is True  # node2, node3 still had it
            with trio.fail_after(10):
                while any(live_ref_ids(n, hashes[0]) for n in cl.nodes.values()):
                    await trio.sleep(0.05)
