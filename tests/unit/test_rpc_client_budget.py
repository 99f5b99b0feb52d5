"""Client requests' payloads are bounded: a flood of large puts cannot grow a node's memory."""

from __future__ import annotations

import os
from typing import Any

import trio
import trio.testing

from blocknode.rpc.connect import open_client
from blocknode.rpc.network import RpcNetwork
from tests.fakes import KEY, OPEN, SECRET, MemoryNet

MiB = 1024 * 1024


async def test_client_payloads_wait_for_the_request_budget() -> None:
    mem = MemoryNet()
    entered: list[int] = []
    release = trio.Event()

    async def holding(peer: str, kind: str, fields: dict[str, Any], data: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        entered.append(fields["i"])
        await release.wait()
        return {}, None

    node = RpcNetwork("n", SECRET, {}, holding, **OPEN, connect=mem.connect, client_buffer_max=2 * MiB)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve_listener, mem.listener("mem-n"))
            async with open_client("mem-n", KEY, timeout=5, connect=mem.connect) as conn:
                async with trio.open_nursery() as calls:
                    for i in range(5):
                        calls.start_soon(lambda i=i: conn.call("put", {"i": i}, os.urandom(MiB), timeout=10))
                    await trio.testing.wait_all_tasks_blocked()
                    # two payloads fit the budget; the reader stopped before handling a third
                    assert len(entered) == 2
                    assert node.client_budget.used == 2 * MiB
                    release.set()
                    await trio.testing.wait_all_tasks_blocked()
                    assert sorted(entered) == [0, 1, 2, 3, 4]
                    assert node.client_budget.used == 0
            nursery.cancel_scope.cancel()
