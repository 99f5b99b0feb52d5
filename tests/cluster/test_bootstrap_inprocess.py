"""Joining with `bootstrap_peers`, in one process: what a node does before, while and after
it fetches the layout (the real-process walk-through is `test_bootstrap.py`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from blocknode.config import load_config
from blocknode.errors import RemoteError
from blocknode.layout_service import MAX_KNOWN
from blocknode.protocol import ADMIN_LAYOUT_APPLY, ADMIN_LAYOUT_ASSIGN, ADMIN_LAYOUT_SHOW
from tests.cluster.harness import InProcessCluster, write_cluster


def _configs(tmp_path: Path, *, with_cluster_file: bool) -> list:
    paths = write_cluster(tmp_path, 4, rf=3)
    text = (tmp_path / "cluster.toml").read_text()
    (tmp_path / "cluster.toml").write_text(
        re.sub(r'\[\[nodes\]\]\nid = "node4"\n[^\[]*', "", text))
    peer = load_config(paths[0]).rpc_bind_addr
    own = paths[3].read_text()
    if not with_cluster_file:
        own = own.replace('cluster_file = "../cluster.toml"\n', "")
    paths[3].write_text(own + f"bootstrap_peers = {json.dumps([peer])}\n")
    return [load_config(p) for p in paths]


@pytest.mark.parametrize("with_cluster_file", [False, True])
async def test_joining_node_waits_for_the_layout_then_is_known_and_assignable(
        tmp_path: Path, caplog, with_cluster_file: bool) -> None:
    configs = _configs(tmp_path, with_cluster_file=with_cluster_file)
    async with trio.open_nursery() as nursery:
        cl = InProcessCluster(configs, nursery)
        node4 = await cl.start("node4")  # its listener runs; no bootstrap peer yet
        assert not node4.layouts.has_layout
        assert node4.layouts.show()["version"] == 0 and node4.layouts.show()["joining"]
        assert node4.status()["layout"]["joining"] is True
        assert node4.meta.layout_raw() is None  # it seeded nothing of its own
        async with cl.client("node4") as c:
            with pytest.raises(RemoteError, match="has no layout yet"):
                await c.put_block(b"x" * 100, "r")
        with trio.fail_after(10):
            while "no bootstrap peer answered" not in caplog.text:
                await trio.sleep(0.05)

        for nid in ("node1", "node2", "node3"):
            await cl.start(nid)
        with trio.fail_after(30):  # the backoff's next try
            while not node4.layouts.has_layout:
                await trio.sleep(0.05)
        one = cl.nodes["node1"].layouts
        assert node4.layouts.state.state_digest() == one.state.state_digest()
        assert node4.meta.layout_raw() is not None  # stored once fetched
        assert not node4.status()["layout"]["in_layout"] and node4.status()["capacity"] is None
        await node4.layouts.broadcast()  # its gossip tells every node of it
        for nid in ("node1", "node2", "node3"):
            n = cl.nodes[nid].layouts
            assert not n.conflicts  # no version 1 of its own clashed with the cluster's
            known = n.show()["known"]
            assert [k["id"] for k in known] == ["node4"]
            assert known[0]["addr"] == configs[3].rpc_bind_addr and known[0]["zone"] == "z4"

        async with cl.client("node2") as c:
            shown, _ = await c.call(ADMIN_LAYOUT_ASSIGN, {"node": "node4", "zone": "z4",
                                                          "capacity": 1})  # no addr: known
            assert shown["staged"][0]["addr"] == configs[3].rpc_bind_addr
            assert shown["known"] == []  # staged now
            shown, _ = await c.call(ADMIN_LAYOUT_APPLY, {"version": 2})
        with trio.fail_after(20):
            while node4.layouts.state.current != 2:
                await trio.sleep(0.05)
        assert node4.layout.has_node("node4")
        async with cl.client("node4") as c:
            shown, _ = await c.call(ADMIN_LAYOUT_SHOW, {})
            assert "node4" in [n["id"] for n in shown["nodes"]]
            await c.put_block(b"y" * 100, "r2")  # it is a node of the cluster now
        nursery.cancel_scope.cancel()


async def test_known_nodes_are_bounded_and_a_bad_address_is_ignored(tmp_path: Path) -> None:
    configs = _configs(tmp_path, with_cluster_file=False)
    async with trio.open_nursery() as nursery:
        cl = InProcessCluster(configs, nursery)
        s = (await cl.start("node1")).layouts
        for i in range(MAX_KNOWN + 10):
            s._note_known(f"x{i}", {"addr": f"10.0.0.{i % 250}:3901", "zone": "z"})
        s._note_known("bad", {"addr": "no-port", "zone": "z"})
        assert len(s.known) == MAX_KNOWN and "bad" not in s.known
        assert "x0" not in s.known and f"x{MAX_KNOWN + 9}" in s.known  # the oldest went
        s._note_known("node2", {"addr": "10.0.0.1:1", "zone": "z"})  # in the layout
        assert "node2" not in s.known
        nursery.cancel_scope.cancel()


async def test_a_bootstrap_peer_that_is_joining_too_is_named_in_the_retry_line(
        tmp_path: Path, caplog) -> None:
    paths = write_cluster(tmp_path, 2, rf=1)
    addrs = [load_config(p).rpc_bind_addr for p in paths]
    for p, other in zip(paths, reversed(addrs), strict=True):
        own = p.read_text().replace('cluster_file = "../cluster.toml"\n', "")
        p.write_text(own + f"bootstrap_peers = {json.dumps([other])}\n")
    configs = [load_config(p) for p in paths]
    async with trio.open_nursery() as nursery:
        cl = InProcessCluster(configs, nursery)
        for c in configs:
            await cl.start(c.node_id)
        with trio.fail_after(10):
            while "has no layout either" not in caplog.text:
                await trio.sleep(0.05)
        assert f"{addrs[0]}: BlocknodeError: node at {addrs[0]} has no layout either" in caplog.text
        assert not any(n.layouts.has_layout for n in cl.nodes.values())
        nursery.cancel_scope.cancel()
