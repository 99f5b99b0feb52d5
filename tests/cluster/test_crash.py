"""kill -9 in the middle of a write storm: nothing acknowledged is lost (S2), RC == live refs (S4)."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from blocknode.client import open_client
from blocknode.config import load_config
from blocknode.storage import BlockFiles, MetadataStore
from tests.cluster.harness import ServeProcesses, write_cluster

pytestmark = pytest.mark.slow


async def _storm(cfg, acked: list[tuple[str, bytes]], stop: trio.Event) -> None:
    async def writer(i: int) -> None:
        try:
            async with open_client(cfg, timeout=5) as c:
                n = 0
                while not stop.is_set():
                    size = (4096, 100_000, 700_000)[n % 3]
                    data = os.urandom(size)
                    h = await c.put(data, f"w{i}")
                    acked.append((h, data))
                    n += 1
        except Exception:  # noqa: BLE001 - the server dies under us: expected
            return

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(writer, i)


def test_kill_9_mid_write_storm_loses_no_acknowledged_block(tmp_path):
    # durable settings, as shipped
    configs = write_cluster(tmp_path, 1, rf=1, data_fsync=True, metadata_fsync=True)
    cfg = load_config(configs[0])
    procs = ServeProcesses(configs)
    acked: list[tuple[str, bytes]] = []
    try:
        procs.start_all()

        async def main() -> None:
            stop = trio.Event()
            async with trio.open_nursery() as n:
                n.start_soon(_storm, cfg, acked, stop)
                while len(acked) < 80:
                    await trio.sleep(0.01)
                procs.signal(0, signal.SIGKILL)  # mid-storm: writes are in flight
                stop.set()

        trio.run(main)
        procs.kill(0)
        assert len(acked) >= 80

        # the restart sweeps stray .tmp files and serves every acknowledged block
        procs.start(0)
        procs.wait_ready(0)

        async def check() -> None:
            async with open_client(cfg, timeout=10) as c:
                for h, data in acked:
                    assert await c.get(h) == data
        trio.run(check)
    finally:
        procs.close()

    tmps = [p for p in (tmp_path / "node1" / "data").rglob("*.tmp")]
    assert tmps == []
    meta = MetadataStore(cfg.metadata_dir, map_size=cfg.lmdb_map_size)
    try:
        for h, e in meta.refs.iter_rc():
            live = [r for r in meta.refs_of(h) if not r.deleted]
            assert e.count == len(live)
        files = BlockFiles(cfg.data_dir)
        for h, _ in acked:
            hb = bytes.fromhex(h)
            assert files.exists(hb) or meta.inline.exists(hb)
    finally:
        meta.close()
