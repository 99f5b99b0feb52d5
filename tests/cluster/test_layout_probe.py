"""Probe (issue 12): real `serve` processes under a put/get load while the layout changes.

3 nodes; add a 4th (`layout assign` + `apply`), remove one of the first three,
change a capacity. Throughout: every acknowledged put stays readable and no put
fails. At the end every block is on exactly the nodes of the newest layout (the
old copies garbage-collected), with the real workers doing the work.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import trio

from blocknode.client import open_client
from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.config import load_config
from blocknode.layout import Layout
from blocknode.protocol import ADMIN_BLOCK_INFO
from tests.cluster.harness import ServeProcesses, cli, write_cluster

pytestmark = pytest.mark.slow


def _cli_json(config: Path, *args: str) -> dict:
    r = cli(*args, "--json", config=config)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def _cli_ok(config: Path, *args: str) -> None:
    r = cli(*args, config=config)
    assert r.returncode == 0, r.stderr.decode()


def _wait_live(config: Path, version: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        shown = _cli_json(config, "layout", "show")
        if shown["live_versions"] == [version] or time.monotonic() > deadline:
            assert shown["live_versions"] == [version], shown
            return shown
        time.sleep(0.5)


def test_probe_add_remove_and_reweight_under_load(tmp_path: Path) -> None:
    configs = write_cluster(tmp_path, 4, rf=3, gc_delay=1.0, anti_entropy_interval=3600.0,
                            resync_tranquility=0.0)
    text = (tmp_path / "cluster.toml").read_text()
    (tmp_path / "cluster.toml").write_text(re.sub(r'\[\[nodes\]\]\nid = "node4"\n[^\[]*', "", text))
    cfgs = [load_config(p) for p in configs]
    procs = ServeProcesses(configs)
    acked: dict[bytes, bytes] = {}
    failures: list[str] = []
    try:
        for i in range(3):
            procs.start(i)
        for i in range(3):
            procs.wait_ready(i)

        async def load(stop: trio.Event) -> None:
            async with open_client(cfgs[2], timeout=20) as c:
                i = 0
                while not stop.is_set():
                    data = os.urandom(3000)
                    try:
                        h = await c.put_block(data, f"probe-{i}")
                        acked[h] = data
                        got = await c.get_block(h)
                        assert got == data
                    except Exception as exc:  # noqa: BLE001 - counted, asserted below
                        failures.append(f"{type(exc).__name__}: {exc}")
                    i += 1
                    await trio.sleep(0.02)

        async def control() -> None:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load, stop)
                await trio.sleep(2)
                node4 = cfgs[3].rpc_bind_addr
                await trio.to_thread.run_sync(lambda: _cli_ok(
                    configs[0], "layout", "assign", "node4", "--zone", "z4", "--capacity", "1",
                    "--addr", node4))
                await trio.to_thread.run_sync(lambda: _cli_ok(
                    configs[0], "layout", "apply", "--version", "2"))
                procs.start(3)
                await trio.to_thread.run_sync(procs.wait_ready, 3)
                await trio.to_thread.run_sync(_wait_live, configs[1], 2)
                await trio.to_thread.run_sync(lambda: _cli_ok(
                    configs[1], "layout", "remove", "node1"))
                await trio.to_thread.run_sync(lambda: _cli_ok(
                    configs[1], "layout", "apply", "--version", "3"))
                await trio.to_thread.run_sync(_wait_live, configs[1], 3)
                await trio.to_thread.run_sync(lambda: _cli_ok(
                    configs[1], "layout", "assign", "node2", "--zone", "z2", "--capacity", "3"))
                await trio.to_thread.run_sync(lambda: _cli_ok(
                    configs[1], "layout", "apply", "--version", "4"))
                await trio.to_thread.run_sync(_wait_live, configs[1], 4)
                await trio.sleep(1)
                stop.set()

        trio.run(control)
        assert failures == []
        assert len(acked) > 20
        shown = _cli_json(configs[1], "layout", "show")
        final = Layout(ClusterConfig(
            nodes=tuple(ClusterNode(n["id"], n["addr"], n["zone"], n["capacity"])
                        for n in shown["nodes"]),
            replication_factor=shown["replication_factor"]))

        async def check() -> dict[bytes, set[str]]:
            async with open_client(cfgs[3], timeout=20) as c:
                for h, data in acked.items():
                    assert await c.get_block(h) == data
            holders: dict[bytes, set[str]] = {h: set() for h in acked}
            for cfg in cfgs:
                async with open_client(cfg, timeout=20) as c:
                    for h in acked:
                        info, _ = await c.call(ADMIN_BLOCK_INFO, {"hash": h})
                        if info["present"]:
                            holders[h].add(cfg.node_id)
            return holders

        deadline = time.monotonic() + 120
        while True:
            holders = trio.run(check)
            wrong = {h.hex()[:12]: (sorted(v), sorted(final.nodes_of(h)))
                     for h, v in holders.items() if v != set(final.nodes_of(h))}
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert not wrong, wrong
    finally:
        procs.close()
