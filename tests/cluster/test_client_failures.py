"""Client-side failures that left state behind (issue 9 C.14), on in-process clusters.

- a multi-block put that fails (too many blocks for one manifest, a lost quorum,
  a cancellation) left its blocks referenced forever under a reference nobody
  knew;
- a put or unref below quorum said "0/2 succeeded" while the coordinator had
  applied it; the retry of the same command must converge.
"""

from __future__ import annotations

import os

import pytest
import trio

from blocknode.errors import RemoteError
from blocknode.node import Node
from tests.cluster.harness import in_process_cluster

BLOCK = 4096
FIELDS = {"block_size": BLOCK, "inline_threshold": 1024, "rpc_timeout": 3.0}


def live_refs(node: Node) -> list[tuple[str, str]]:
    """(hash hex, ref id) of every live reference the node holds."""
    return sorted((r.hash.hex(), r.ref_id) for r in node.meta.iter_refs() if not r.deleted)


def live_ref_ids(node: Node, h: bytes) -> set[str]:
    return {r.ref_id for r in node.meta.refs_of(h) if not r.deleted}


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
