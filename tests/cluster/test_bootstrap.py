"""Joining with only `bootstrap_peers` (issue 12, item 1), on real `serve` processes.

node4 has its own config and `bootstrap_peers` (no cluster file). Started before
the cluster, it listens and answers `status` at once, says in its log that no
bootstrap peer answers and retries; once node1..3 run it fetches their layout,
shows in `layout show` as known but unassigned and stores nothing; after
`layout assign node4` (no --addr: the address is known) + `layout apply` it
receives the blocks of its partitions and each block ends on exactly the nodes
of the new layout.
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


def _cli_ok(config: Path, *args: str) -> str:
    r = cli(*args, config=config)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def _until(pred, what: str, timeout: float = 60.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            assert got, what
            return got
        time.sleep(0.3)


def test_a_node_with_only_bootstrap_peers_joins_and_receives_its_blocks(tmp_path: Path) -> None:
    configs = write_cluster(tmp_path, 4, rf=3, gc_delay=1.0, anti_entropy_interval=3600.0,
                            resync_tranquility=0.0)
    text = (tmp_path / "cluster.toml").read_text()
    (tmp_path / "cluster.toml").write_text(
        re.sub(r'\[\[nodes\]\]\nid = "node4"\n[^\[]*', "", text))
    peers = [load_config(p).rpc_bind_addr for p in configs[:2]]
    own = configs[3].read_text().replace('cluster_file = "../cluster.toml"\n', "")
    assert "cluster_file" not in own
    configs[3].write_text(own + f"bootstrap_peers = {json.dumps(peers)}\n")
    cfgs = [load_config(p) for p in configs]
    assert cfgs[3].bootstrap_peers == tuple(peers) and cfgs[3].cluster_file is None
    procs = ServeProcesses(configs)
    try:
        # node4 first: its listener is up although no bootstrap peer answers.
        procs.start(3)
        procs.wait_ready(3)
        st = _cli_json(configs[3], "status")
        assert st["layout"]["joining"] is True and st["layout"]["in_layout"] is False
        log4 = configs[3].parent / "serve.log"
        _until(lambda: "no bootstrap peer answered" in log4.read_text(), "a retry line", 30)

        for i in range(3):
            procs.start(i)
        for i in range(3):
            procs.wait_ready(i)
        acked: dict[bytes, bytes] = {}

        async def put_some(k: int, tag: str) -> None:
            async with open_client(cfgs[0], timeout=20) as c:
                for i in range(k):
                    data = os.urandom(3000 + i)
                    acked[await c.put_block(data, f"{tag}-{i}")] = data

        trio.run(put_some, 60, "before")

        # It joins (backoff: 1, 2, 4, 8 s...) and every node lists it as known.
        _until(lambda: "joined the cluster: layout version 1" in log4.read_text(),
               "node4 fetched the layout", 60)
        for cfg in configs[:3]:
            shown = _until(lambda cfg=cfg: (lambda s: s if any(
                k["id"] == "node4" for k in s["known"]) else None)(
                    _cli_json(cfg, "layout", "show")), f"{cfg} knows node4", 30)
            known = next(k for k in shown["known"] if k["id"] == "node4")
            assert known["addr"] == cfgs[3].rpc_bind_addr and known["zone"] == cfgs[3].zone
            assert "node4" not in [n["id"] for n in shown["nodes"]]
        assert "known, not assigned" in _cli_ok(configs[2], "layout", "show")
        st = _cli_json(configs[3], "status")
        assert st["layout"]["joining"] is False and st["layout"]["version"] == 1
        assert st["blocks"] == 0 and st["refs"] == 0  # unassigned: it stores nothing

        _cli_ok(configs[1], "layout", "assign", "node4", "--zone", "z4", "--capacity", "1")
        _cli_ok(configs[1], "layout", "apply", "--version", "2")
        trio.run(put_some, 20, "during")
        shown = _until(lambda: (lambda s: s if s["live_versions"] == [2] else None)(
            _cli_json(configs[0], "layout", "show")), "v2 alone live", 120)
        final = Layout(ClusterConfig(
            nodes=tuple(ClusterNode(n["id"], n["addr"], n["zone"], n["capacity"])
                        for n in shown["nodes"]),
            replication_factor=shown["replication_factor"]))
        assert "node4" in final.node_ids

        async def holders() -> dict[bytes, set[str]]:
            out: dict[bytes, set[str]] = {h: set() for h in acked}
            for cfg in cfgs:
                async with open_client(cfg, timeout=20) as c:
                    for h in acked:
                        info, _ = await c.call(ADMIN_BLOCK_INFO, {"hash": h})
                        if info["present"]:
                            out[h].add(cfg.node_id)
            async with open_client(cfgs[3], timeout=20) as c:  # readable through node4 too
                for h, data in acked.items():
                    assert await c.get_block(h) == data
            return out

        def placed() -> dict[str, tuple[list[str], list[str]]] | None:
            wrong = {h.hex()[:12]: (sorted(v), sorted(final.nodes_of(h)))
                     for h, v in trio.run(holders).items() if v != set(final.nodes_of(h))}
            return None if wrong else {}

        deadline = time.monotonic() + 120
        while placed() is None and time.monotonic() < deadline:
            time.sleep(2)
        final_holders = trio.run(holders)
        wrong = {h.hex()[:12]: (sorted(v), sorted(final.nodes_of(h)))
                 for h, v in final_holders.items() if v != set(final.nodes_of(h))}
        assert not wrong, wrong
        assert sum("node4" in v for v in final_holders.values()) > 0  # it got its partitions' blocks
    finally:
        procs.close()
