"""The blocking client (`blocknode.connect`) and the asyncio client (`blocknode.aio`):
shared by many threads / tasks with every byte checked, cancellation and Ctrl-C."""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import threading
import time
from typing import Any

import pytest

import blocknode
from blocknode import block
from blocknode.client.manifest import encode_manifest, split
from blocknode.protocol import block_info_all
from blocknode.rpc.handshake import SECRET_SIZE
from tests.cluster.cluster_thread import cluster_in_thread

BLOCK = 64 * 1024  # small blocks: manifests are cheap to exercise


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    with cluster_in_thread(tmp_path_factory.mktemp("three"), 3, block_size=BLOCK) as configs:
        yield configs


@pytest.fixture
def one(tmp_path):
    with cluster_in_thread(tmp_path, 1, rf=1, block_size=BLOCK) as configs:
        yield configs


def _sizes(rng: random.Random) -> int:
    return rng.choice([0, 1, 100, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])


def _worker_sync(client: blocknode.SyncClient, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    kept: list[tuple[str, bytes, str]] = []
    for i in range(rounds):
        data = rng.randbytes(_sizes(rng))
        ref = f"w{seed}-{i}"
        if i % 3 == 2:
            h = client.put(io.BytesIO(data), ref=ref)
        else:
            h = client.put(data, ref=ref)
        assert client.get(h) == data
        out = io.BytesIO()
        assert client.get_into(h, out) == len(data) and out.getvalue() == data
        client.ref(h, ref + "-extra")
        assert client.unref(h, ref + "-extra") is True
        kept.append((h, data, ref))
        if len(kept) > 3:
            old_h, old_data, old_ref = kept.pop(0)
            assert client.get(old_h) == old_data
            assert client.unref(old_h, old_ref) is True
    for h, data, _ in kept:
        assert client.get(h) == data


def test_sixteen_threads_share_one_sync_client(three):
    with blocknode.connect(three[0], timeout=20) as client:
        errors: list[BaseException] = []

        def run(seed: int) -> None:
            try:
                _worker_sync(client, seed, 12)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert client.status()["node_id"] == "node1"
    with pytest.raises(blocknode.BlocknodeError):
        client.get(block.hashed(b"x").hash.hex())


async def _worker_aio(client: blocknode.aio.Client, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    for i in range(rounds):
        data = rng.randbytes(_sizes(rng))
        ref = f"a{seed}-{i}"
        h = await client.put(io.BytesIO(data) if i % 3 == 2 else data, ref=ref)
        assert await client.get(h) == data
        out = io.BytesIO()
        assert await client.get_into(h, out) == len(data) and out.getvalue() == data
        await client.ref(h, ref + "-extra")
        assert await client.unref(h, ref + "-extra") is True
        assert await client.unref(h, ref) is True


def test_sixty_four_asyncio_tasks_share_one_client(three):
    async def main() -> None:
        async with await blocknode.aio.connect(str(three[1].source), timeout=20) as client:
            await asyncio.gather(*(_worker_aio(client, 100 + s, 4) for s in range(64)))
            assert (await client.status())["node_id"] == "node2"

    asyncio.run(main())


def test_errors_are_blocknodes_own(three):
    with blocknode.connect(three[0]) as client:
        with pytest.raises(blocknode.InvalidHash):
            client.get("nothex")
        with pytest.raises(blocknode.BlockNotFound):
            client.get(block.hashed(os.urandom(8)).hash.hex())

    async def main() -> None:
        async with await blocknode.aio.connect(three[0]) as client:
            with pytest.raises(blocknode.InvalidHash):
                await client.get("nothex")

    asyncio.run(main())
    with pytest.raises(blocknode.AuthenticationError):
        blocknode.connect(three[0], key="BK" + "0" * 24 + ":" + "00" * SECRET_SIZE)
    with pytest.raises(blocknode.ConfigError):
        blocknode.connect(three[0], key="not a key")


def _live_refs(client: blocknode.SyncClient, h: bytes) -> set[str]:
    async def call(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        reply, _ = await client._t.client.call(kind, fields)  # type: ignore[union-attr]
        return reply

    info = client._call(block_info_all, call, h)
    return {r["ref_id"] for r in info.get("refs") or [] if not r["deleted"]}


def _check_all_or_nothing(client: blocknode.SyncClient, data: bytes, ref: str) -> bool:
    """The put of `data` under `ref` either landed with its ref (True) or left no
    live reference on any block it may have stored (False)."""
    blocks = [block.hashed(c).hash for c in split(data, BLOCK)]
    manifest = block.hashed(encode_manifest(len(data), blocks)).hash
    if ref in _live_refs(client, manifest):
        assert client.get(manifest.hex()) == data
        for h in blocks:
            assert _live_refs(client, h) == {ref}, "a block lacks the ref or keeps a staging ref"
        return True
    for h in [*blocks, manifest]:
        assert _live_refs(client, h) == set(), "a cancelled put left a reference behind"
    return False


def test_cancelled_asyncio_put_leaves_nothing_half_applied(one):
    rng = random.Random(7)
    outcomes: list[bool] = []
    with blocknode.connect(one[0], timeout=20) as probe:
        for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, None):  # None: not cancelled
            data = rng.randbytes(48 * BLOCK + 5)
            ref = f"obj-{delay}"

            async def main(data: bytes = data, ref: str = ref, delay: float | None = delay) -> None:
                async with await blocknode.aio.connect(one[0], timeout=20) as client:
                    task = asyncio.create_task(client.put(data, ref=ref))
                    if delay is not None:
                        await asyncio.sleep(delay)
                        task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                    assert await client.status()  # still usable

            asyncio.run(main())
            outcomes.append(_check_all_or_nothing(probe, data, ref))
    assert outcomes[-1] is True and outcomes[0] is False, outcomes


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals go to the main thread")
def test_ctrl_c_leaves_the_sync_client_usable(one):
    release = threading.Event()
    stalled = threading.Event()

    class SlowReader(io.RawIOBase):
        """Two blocks, then a read that blocks until released (a stalled upload)."""

        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            if self.sent >= 2 * BLOCK:
                stalled.set()
                release.wait(30)
                return 0
            n = min(len(b), 2 * BLOCK - self.sent)
            b[:n] = b"z" * n
            self.sent += n
            return n

    with blocknode.connect(one[0], timeout=20) as client:
        main_id = threading.main_thread().ident
        assert main_id is not None

        def interrupt() -> None:
            stalled.wait(30)  # the put is under way: its upload waits for the reader
            time.sleep(0.1)
            signal.pthread_kill(main_id, signal.SIGINT)

        t = threading.Thread(target=interrupt)
        t.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                client.put(SlowReader(), ref="stalled")
        finally:
            t.join()
            release.set()
        # The put was cancelled in the Trio thread: its blocks hold no reference.
        assert _live_refs(client, block.hashed(b"z" * BLOCK).hash) == set()
        data = os.urandom(3 * BLOCK)
        h = client.put(data, ref="after")
        assert client.get(h) == data
        assert client.status()["node_id"] == "node1"


def test_a_client_whose_node_went_away_says_so(tmp_path):
    with cluster_in_thread(tmp_path, 1, rf=1, block_size=BLOCK) as configs:
        client = blocknode.connect(configs[0], timeout=5)
        h = client.put(b"still here?")
    # The node stopped: every call fails with blocknode's own error, in the caller.
    with pytest.raises(blocknode.BlocknodeError, match="closed"):
        client.get(h)
    with pytest.raises(blocknode.BlocknodeError, match="closed"):
        client.put(b"x")
    client.close()
    client.close()  # idempotent
    with pytest.raises(blocknode.BlocknodeError, match="client is closed"):
        client.status()
