"""Live layout changes on an in-process cluster: add a 4th node, remove one of the first three.

Every acknowledged put stays readable throughout, and once the migrations are
done (sync steps, resync and GC driven by hand with the injected clock) each
block is on exactly the nodes the newest layout gives it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import trio

from blocknode.config import load_config
from blocknode.layout import Layout
from blocknode.protocol import ADMIN_LAYOUT_APPLY, ADMIN_LAYOUT_ASSIGN, ADMIN_LAYOUT_REMOVE
from tests.cluster.harness import InProcessCluster, write_cluster

T0 = 1_800_000_000_000


async def _until(pred, what: str, timeout: float = 20.0) -> None:  # noqa: ANN001
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)
    assert pred(), what


async def _migrate(cl: InProcessCluster, now: list[int], version: int) -> None:
    """Drive every node until `version` is the only live one everywhere."""
    await _until(lambda: all(n.layouts.state.current == version for n in cl.nodes.values()),
                 f"every node has version {version}")
    for _ in range(10):
        for n in list(cl.nodes.values()):
            await n.layout_sync.run_once()
        await cl.resync_all()
        for n in list(cl.nodes.values()):
            await n.layout_sync.run_once()
        for n in list(cl.nodes.values()):
            await n.layouts.broadcast()
        if all(n.layouts.state.live == [version] for n in cl.nodes.values()):
            return
    raise AssertionError({nid: (n.layouts.state.live, n.layout_sync.progress)
                          for nid, n in cl.nodes.items()})


async def _gc(cl: InProcessCluster, now: list[int]) -> None:
    """Drop left partitions, let the GC delay pass, run resync (hand over, delete)."""
    for n in cl.nodes.values():
        await n.layout_sync.run_once()
    now[0] += 3_600_000
    for _ in range(3):
        await cl.resync_all()


async def _holders(cl: InProcessCluster, h: bytes) -> set[str]:
    return {nid for nid, n in cl.nodes.items() if await n.blocks.aexists(h)}


async def test_add_a_node_then_remove_one_every_put_readable_blocks_on_new_nodes(
        tmp_path: Path) -> None:
    now = [T0]
    paths = write_cluster(tmp_path, 4, rf=3, gc_delay=60.0, anti_entropy_interval=3600.0)
    # The cluster file lists the first three; node4 joins by `layout assign` + `apply`.
    text = (tmp_path / "cluster.toml").read_text()
    text = re.sub(r'\[\[nodes\]\]\nid = "node4"\n[^\[]*', "", text)
    (tmp_path / "cluster.toml").write_text(text)
    configs = [load_config(p) for p in paths]
    acked: dict[bytes, bytes] = {}

    async with trio.open_nursery() as nursery:
        cl = InProcessCluster(configs, nursery, lambda: now[0])
        for nid in ("node1", "node2", "node3"):
            await cl.start(nid)
        for n in cl.nodes.values():
            await n.net.check_peers()
        assert {n.layouts.state.current for n in cl.nodes.values()} == {1}

        async def put_some(via: str, k: int, tag: str) -> None:
            async with cl.client(via) as c:
                for i in range(k):
                    data = os.urandom(2000 + i)
                    h = await c.put_block(data, f"{tag}-{i}")
                    acked[h] = data

        async def check_all_readable() -> None:
            for via in list(cl.nodes)[:2]:
                async with cl.client(via) as c:
                    for h, data in acked.items():
                        assert await c.get_block(h) == data

        await put_some("node1", 40, "v1")

        # ---- add node4
        node4_addr = cl.cfg("node4").rpc_bind_addr
        async with cl.client("node1") as c:
            shown, _ = await c.call(ADMIN_LAYOUT_ASSIGN, {"node": "node4", "zone": "z4",
                                                          "capacity": 1, "addr": node4_addr})
            assert shown["version"] == 1 and shown["staged"][0]["id"] == "node4"
            assert shown["moves"] > 0
            shown, _ = await c.call(ADMIN_LAYOUT_APPLY, {"version": 2})
            assert shown["version"] == 2 and shown["live_versions"] == [1, 2]
        await cl.start("node4")
        await _until(lambda: cl.nodes["node4"].layouts.state.current == 2, "node4 learns v2")
        # Writes during the migration reach both versions' quorums.
        await put_some("node2", 20, "mid2")
        await check_all_readable()
        await _migrate(cl, now, 2)
        await check_all_readable()
        await _gc(cl, now)
        await check_all_readable()
        v2 = Layout(cl.nodes["node2"].layouts.state.current_cluster)
        for h in acked:
            assert await _holders(cl, h) == set(v2.nodes_of(h)), h.hex()

        # ---- remove node1
        async with cl.client("node2") as c:
            await c.call(ADMIN_LAYOUT_REMOVE, {"node": "node1"})
            shown, _ = await c.call(ADMIN_LAYOUT_APPLY, {"version": 3})
            assert [n["id"] for n in shown["nodes"]] == ["node2", "node3", "node4"]
        await put_some("node3", 20, "mid3")
        await _migrate(cl, now, 3)
        await _gc(cl, now)
        await check_all_readable()
        v3 = Layout(cl.nodes["node2"].layouts.state.current_cluster)
        for h in acked:
            assert await _holders(cl, h) == set(v3.nodes_of(h)), h.hex()
        assert cl.nodes["node1"].blocks.count() == 0
        hist = cl.nodes["node3"].layouts.state.history
        assert hist[1].retired_ms and hist[2].retired_ms and not hist[3].retired_ms
        st = cl.nodes["node2"].status()["layout"]
        assert st["version"] == 3 and st["pending_sync"] == [] and st["live_versions"] == [3]
        nursery.cancel_scope.cancel()


async def test_a_node_started_with_another_cluster_file_is_reported(tmp_path: Path, caplog) -> None:
    paths = write_cluster(tmp_path, 3, rf=3)
    other = tmp_path / "other.toml"
    other.write_text((tmp_path / "cluster.toml").read_text().replace(
        'id = "node3"', 'id = "node3"\ncapacity = 5'))
    cfg3 = paths[2].read_text().replace('cluster_file = "../cluster.toml"',
                                        f'cluster_file = "{other}"')
    paths[2].write_text(cfg3)
    configs = [load_config(p) for p in paths]
    async with trio.open_nursery() as nursery:
        cl = InProcessCluster(configs, nursery)
        for c in configs:
            await cl.start(c.node_id)
        for n in cl.nodes.values():
            await n.net.check_peers()
        await cl.nodes["node1"].layouts.broadcast()
        # The node that saw both versions says so (status and log).
        assert any("1" in n.status()["layout"]["conflicts"] for n in cl.nodes.values())
        assert "two different layouts carry version 1" in caplog.text
        # Every node ends up with one and the same version 1.
        for n in cl.nodes.values():
            await n.layouts.broadcast()
        assert len({n.layouts.state.digest() for n in cl.nodes.values()}) == 1
        nursery.cancel_scope.cancel()


async def test_during_a_migration_a_put_needs_the_quorum_of_each_live_version(
        tmp_path: Path) -> None:
    """v1 = node1..3, v2 adds node4 (never started); node2 stopped. A block whose v2 nodes
    are node4, node2 and one other has a v1 quorum and 2 answers in the union, but only
    1 of 3 in v2: the put fails. A block whose v2 nodes avoid node2 and node4 succeeds."""
    from blocknode.errors import BlocknodeError
    from blocknode.fastpath import block_hash

    paths = write_cluster(tmp_path, 4, rf=3, rpc_timeout=2.0)
    text = (tmp_path / "cluster.toml").read_text()
    (tmp_path / "cluster.toml").write_text(
        re.sub(r'\[\[nodes\]\]\nid = "node4"\n[^\[]*', "", text))
    configs = [load_config(p) for p in paths]
    async with trio.open_nursery() as nursery:
        cl = InProcessCluster(configs, nursery)
        for nid in ("node1", "node2", "node3"):
            await cl.start(nid)
        async with cl.client("node1") as c:
            await c.call(ADMIN_LAYOUT_ASSIGN, {"node": "node4", "zone": "z4", "capacity": 1,
                                               "addr": cl.cfg("node4").rpc_bind_addr})
            await c.call(ADMIN_LAYOUT_APPLY, {"version": 2})
        await _until(lambda: all(n.layouts.state.current == 2 for n in cl.nodes.values()), "v2")
        await cl.stop("node2")
        v2 = Layout(cl.nodes["node1"].layouts.state.versions[2])

        def data_in(pred) -> bytes:  # noqa: ANN001
            while True:
                d = os.urandom(100)
                if pred(set(v2.nodes_of(block_hash(d)))):
                    return d

        bad = data_in(lambda ns: {"node2", "node4"} <= ns)
        good = data_in(lambda ns: ns == {"node1", "node3", "node4"})
        async with cl.client("node1") as c:
            try:
                await c.put_block(bad, "r")
            except BlocknodeError as exc:
                assert "quorum" in str(exc).lower() or "node" in str(exc), exc
            else:
                raise AssertionError("a put with 1 of 3 nodes of version 2 succeeded")
            h = await c.put_block(good, "r")
            assert await c.get_block(h) == good
        nursery.cancel_scope.cancel()


async def test_a_dead_node_can_be_removed(tmp_path: Path) -> None:
    """node4 dies for good; `layout remove node4` + apply: the migration completes without
    it (its copies are rebuilt from the survivors) and every put stays readable."""
    now = [T0]
    paths = write_cluster(tmp_path, 4, rf=3, gc_delay=60.0, anti_entropy_interval=3600.0,
                          rpc_timeout=2.0)
    configs = [load_config(p) for p in paths]
    acked: dict[bytes, bytes] = {}
    async with trio.open_nursery() as nursery:
        cl = InProcessCluster(configs, nursery, lambda: now[0])
        for c in configs:
            await cl.start(c.node_id)
        async with cl.client("node1") as c:
            for i in range(30):
                data = os.urandom(1500 + i)
                acked[await c.put_block(data, f"r{i}")] = data
        await cl.stop("node4")
        async with cl.client("node1") as c:
            shown, _ = await c.call(ADMIN_LAYOUT_REMOVE, {"node": "node4"})
            await c.call(ADMIN_LAYOUT_APPLY, {"version": 2})
        await _migrate(cl, now, 2)
        await _gc(cl, now)
        v2 = Layout(cl.nodes["node1"].layouts.state.current_cluster)
        async with cl.client("node2") as c:
            for h, data in acked.items():
                assert await c.get_block(h) == data
                assert await _holders(cl, h) == set(v2.nodes_of(h))
        nursery.cancel_scope.cancel()
