"""The clients outlive a node restart: a real `serve` process is SIGKILLed and
restarted on the same port while a `SyncClient` and an asyncio client are in use.

During the outage every call fails with blocknode's own error (`NodeUnreachable`,
not a raw trio or OS error) within the client's timeout; after the restart the
next calls reconnect and succeed; a call made during the outage that outlasts
it (its timeout is longer than the outage) succeeds once the node is back.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import blocknode
import blocknode.aio
from tests.cluster.harness import ServeProcesses, write_cluster

BLOCK = 64 * 1024
SHORT = 3.0  # the timeout of the clients that see the outage fail


@pytest.fixture
def node(tmp_path):
    configs = write_cluster(tmp_path, 1, rf=1, block_size=BLOCK)
    procs = ServeProcesses(configs)
    try:
        procs.start_all()
        yield procs, configs[0]
    finally:
        procs.close()


def _fails_within(call, limit: float) -> BaseException:
    start = time.monotonic()
    with pytest.raises(blocknode.BlocknodeError) as e:
        call()
    took = time.monotonic() - start
    assert took < limit + 2.0, f"failed after {took:.1f}s, past its {limit}s timeout"
    return e.value


def test_sync_and_asyncio_clients_reconnect_after_a_node_restart(node):
    procs, cfg = node
    small, big = os.urandom(1000), os.urandom(3 * BLOCK + 7)

    async def main() -> None:
        sync = blocknode.connect(cfg, timeout=SHORT)
        patient = blocknode.connect(cfg, timeout=60)
        aio = await blocknode.aio.connect(cfg, timeout=SHORT)
        try:
            h_small = await asyncio.to_thread(sync.put, small, "s")
            h_big = await aio.put(big, ref="b")
            assert await aio.get(h_small) == small
            assert await asyncio.to_thread(sync.get, h_big) == big

            await asyncio.to_thread(procs.kill, 0)  # SIGKILL: no goodbye on the connections

            # During the outage: blocknode's own error, within the timeout, from both.
            for call in (lambda: sync.get(h_small), lambda: sync.put(b"x" * 10, ref="y"),
                         sync.status, lambda: sync.unref(h_small, "s")):
                err = await asyncio.to_thread(_fails_within, call, SHORT)
                assert isinstance(err, blocknode.NodeUnreachable), repr(err)
                assert "could not be reopened" in str(err) or "cannot connect" in str(err), err
            # A put of several blocks waits for its blocks (those queued behind the
            # first may say RpcTimeout), then tries to release what it stored: up to
            # twice the timeout. Both errors are RpcErrors.
            for coro, expected, limit in (
                    (aio.get(h_big), blocknode.NodeUnreachable, SHORT),
                    (aio.put(big, ref="c"), blocknode.RpcError, 2 * SHORT),
                    (aio.ref(h_big, "r"), blocknode.NodeUnreachable, SHORT)):
                start = time.monotonic()
                with pytest.raises(expected):
                    await coro
                assert time.monotonic() - start < limit + 2.0

            # A call made now, with a timeout longer than the outage, waits it out.
            waiting = asyncio.create_task(asyncio.to_thread(patient.get, h_big))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            await asyncio.to_thread(procs.start, 0)
            await asyncio.to_thread(procs.wait_ready, 0)
            assert await asyncio.wait_for(waiting, 60) == big

            # After the restart: the next calls reconnect and succeed, in both clients.
            assert await asyncio.to_thread(sync.get, h_small) == small
            assert await aio.get(h_big) == big
            h2 = await aio.put(small + b"2", ref="after")
            assert await asyncio.to_thread(sync.get, h2) == small + b"2"
            assert (await asyncio.to_thread(sync.status))["node_id"] == "node1"
            assert await aio.unref(h2, "after") is True

            # Threads and tasks together after one more restart, every byte checked.
            await asyncio.to_thread(procs.kill, 0)
            await asyncio.to_thread(procs.start, 0)
            await asyncio.to_thread(procs.wait_ready, 0)
            errors: list[BaseException] = []

            def worker(i: int) -> None:
                try:
                    data = os.urandom(100 + i)
                    h = sync.put(data, ref=f"t{i}")
                    assert sync.get(h) == data
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()

            async def task(i: int) -> None:
                data = os.urandom(BLOCK + i)
                assert await aio.get(await aio.put(data, ref=f"a{i}")) == data

            await asyncio.gather(*(task(i) for i in range(8)))
            for t in threads:
                await asyncio.to_thread(t.join)
            assert not errors, errors
        finally:
            await aio.close()
            sync.close()
            patient.close()

    asyncio.run(main())


def test_a_client_made_while_the_node_is_down_says_so(node):
    procs, cfg = node
    procs.kill(0)
    err = _fails_within(lambda: blocknode.connect(cfg, timeout=SHORT), SHORT)
    assert isinstance(err, blocknode.NodeUnreachable), repr(err)
