"""kill -9 in the middle of a write storm: nothing acknowledged is lost (S2), RC == live refs (S4)."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from blocknode.client import open_client
from blocknode.config import load_config
from blocknode.errors import AuthenticationError, NodeUnreachable
from blocknode.storage import BlockFiles, MetadataStore
from tests.cluster.harness import ServeProcesses, write_cluster

pytestmark = pytest.mark.slow


class Storm:
    """Four writers putting until told to stop; the node is SIGKILLed under them.

    Only the errors a killed node causes, and only once it has been killed, end
    a writer quietly: the connection broke or was refused (`NodeUnreachable`),
    or a reply was cut in the middle of a frame (an `AuthenticationError` saying
    the stream was truncated). Any other error, or any error before the kill,
    propagates and fails the test at once with its own message.
    """

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.acked: list[tuple[str, bytes]] = []
        self.killed = False
        self.stop = trio.Event()

    def expected(self, exc: Exception) -> bool:
        if not self.killed:
            return False
        if isinstance(exc, NodeUnreachable):
            return True
        return isinstance(exc, AuthenticationError) and "truncated" in str(exc)

    async def writer(self, i: int) -> None:
        try:
            async with open_client(self.cfg, timeout=5) as c:
                n = 0
                while not self.stop.is_set():
                    size = (4096, 100_000, 700_000)[n % 3]
                    data = os.urandom(size)
                    h = await c.put(data, f"w{i}")
                    self.acked.append((h, data))
                    n += 1
        except Exception as exc:
            if not self.expected(exc):
                raise

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(self.writer, i)


def test_kill_9_mid_write_storm_loses_no_acknowledged_block(tmp_path):
    # durable settings, as shipped
    configs = write_cluster(tmp_path, 1, rf=1, data_fsync=True, metadata_fsync=True)
    cfg = load_config(configs[0])
    procs = ServeProcesses(configs)
    storm = Storm(cfg)
    acked = storm.acked
    try:
        procs.start_all()

        async def main() -> None:
            async with trio.open_nursery() as n:
                n.start_soon(storm.run)
                with trio.fail_after(60):  # a writer's error fails at once, through the nursery
                    while len(acked) < 80:
                        await trio.sleep(0.01)
                storm.killed = True
                procs.signal(0, signal.SIGKILL)  # mid-storm: writes are in flight
                storm.stop.set()

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
