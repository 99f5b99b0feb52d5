"""Group commit across clients on a 3-node in-process cluster: small puts from many
connections share rounds (fewer `put_blocks` and commits), each put lands on its replicas."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from blocknode.client import Client
from tests.cluster.harness import in_process_cluster


async def _put_from_connections(tmp_path: Path, rounds: int) -> tuple[int, int, int]:
    """32 connections to node1, each putting 6 blocks of 4 KiB one after the other; returns
    (rounds run, requests, put_blocks requests node2 received)."""
    tmp_path.mkdir()
    async with in_process_cluster(tmp_path, 3, rf=3, write_quorum=2,
                                  group_commit_rounds=rounds) as cl:
        node1, node2 = cl.nodes["node1"], cl.nodes["node2"]
        stored: dict[bytes, bytes] = {}
        async with AsyncExitStack() as stack:
            clients: list[Client] = [await stack.enter_async_context(cl.client("node1"))
                                     for _ in range(32)]

            async def one(c: Client) -> None:
                for _ in range(6):
                    d = os.urandom(4096)
                    stored[await c.put_block(d, "r")] = d

            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(one, c)
            for h, d in list(stored.items())[:20]:
                assert await clients[0].get_block(h) == d
        assert len(stored) == 32 * 6
        with trio.fail_after(10):  # the third replica's copies may come after the quorum
            while not all(node2.meta.rc_get(h).is_nonzero() for h in stored):
                await trio.sleep(0.02)
        received = int(node2.metrics.registry.get_sample_value(
            "blocknode_requests_total",
            {"source": "node", "kind": "put_blocks", "outcome": "ok"}) or 0)
        return node1.group_commit.rounds_run, node1.group_commit.requests_run, received


async def test_puts_from_many_connections_share_rounds(tmp_path: Path) -> None:
    rounds, requests, received = await _put_from_connections(tmp_path / "on", 1)
    assert requests == 32 * 6
    assert rounds < requests / 2, (rounds, requests)
    assert received == rounds  # one put_blocks per round to each replica
    off_rounds, off_requests, off_received = await _put_from_connections(tmp_path / "off", 0)
    assert off_rounds == 0 and off_received == 32 * 6  # each request on its own
