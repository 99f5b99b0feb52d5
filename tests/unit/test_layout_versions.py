"""Versioned layouts: staging, apply, revert, digests, merge, retirement, quorum across versions."""

from __future__ import annotations

import pytest
import trio

from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.errors import ConfigError, QuorumError
from blocknode.layout import PARTITION_COUNT, Layout, LiveLayout
from blocknode.layout_state import LayoutState, StaleVersion, version_digest
from tests.unit.test_rpc_network import cluster as net_cluster


def three() -> ClusterConfig:
    return ClusterConfig(
        nodes=tuple(ClusterNode(f"n{i}", f"127.0.0.1:{3900 + i}", f"z{i}", 1) for i in (1, 2, 3)),
        replication_factor=3)


def test_seed_is_version_one_the_same_on_every_node() -> None:
    a, b = LayoutState.seed(three()), LayoutState.seed(three())
    assert a.current == 1 and a.live == [1]
    assert a.state_digest() == b.state_digest()
    assert a.digest() == version_digest(1, three())
    assert a.pending_sync() == []  # a new cluster has nothing to move
    assert LayoutState.decode(a.encode()) == a


def test_stage_apply_revert_and_stale_version() -> None:
    s = LayoutState.seed(three())
    with pytest.raises(ConfigError, match="addr"):
        s.assign("n4", zone="z4", capacity=1, addr=None, now_ms=10)
    s = s.assign("n4", zone="z4", capacity=2, addr="127.0.0.1:3904", now_ms=10)
    assert set(s.staged_changes()) == {"n4"}
    assert len(s.staged_cluster().nodes) == 4
    reverted = s.revert(now_ms=11)
    assert reverted.staged_changes() == {}
    with pytest.raises(ConfigError, match="no staged"):
        reverted.apply(2, now_ms=12)
    with pytest.raises(StaleVersion, match="current version is 1"):
        s.apply(1, now_ms=12)
    with pytest.raises(StaleVersion):
        s.apply(3, now_ms=12)
    s2 = s.apply(2, now_ms=12)
    assert s2.current == 2 and s2.live == [1, 2] and s2.staged_changes() == {}
    assert s2.digest(2) == version_digest(2, s2.versions[2]) != s2.digest(1)
    with pytest.raises(StaleVersion):
        s2.apply(2, now_ms=13)
    # Removing below the replication factor cannot be applied.
    s3 = s2.remove("n1", now_ms=14).remove("n2", now_ms=15)
    with pytest.raises(ConfigError):
        s3.apply(3, now_ms=16)
    with pytest.raises(ConfigError, match="not in the layout"):
        s2.remove("nope", now_ms=17)


def test_retirement_waits_for_every_node_of_the_new_version() -> None:
    s = LayoutState.seed(three()).assign("n4", zone="z4", capacity=1, addr="h:4", now_ms=1)
    s = s.apply(2, now_ms=2).settle(3)
    assert s.live == [1, 2] and s.pending_sync() == ["n1", "n2", "n3", "n4"]
    for n in ("n1", "n2", "n3"):
        s = s.ack_synced(n, 2).settle(4)
    assert s.live == [1, 2] and s.pending_sync() == ["n4"]
    s = s.ack_synced("n4", 2).settle(5)
    assert s.live == [2] and s.history[1].retired_ms == 5 and s.history[2].retired_ms == 0


def test_merge_is_a_join_and_converges() -> None:
    base = LayoutState.seed(three())
    a = base.assign("n4", zone="z4", capacity=1, addr="h:4", now_ms=5).apply(2, now_ms=6)
    b = base.ack_synced("n1", 1).assign("n2", zone="z9", capacity=3, addr=None, now_ms=7)
    c = a.ack_synced("n2", 2)
    for x, y in ((a, b), (b, c), (a, c)):
        assert x.merge(y) == y.merge(x)
        assert x.merge(x) == x
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    m = a.merge(b)
    assert m.current == 2
    # b's staging was made against version 1: version 2 supersedes it.
    assert m.staged_changes() == {}
    assert LayoutState.decode(m.encode()) == m


def test_merge_of_two_different_versions_with_one_number_is_deterministic() -> None:
    base = LayoutState.seed(three())
    a = base.assign("n4", zone="z4", capacity=1, addr="h:4", now_ms=5).apply(2, now_ms=6)
    b = base.assign("n5", zone="z5", capacity=1, addr="h:5", now_ms=5).apply(2, now_ms=6)
    assert a.merge(b).state_digest() == b.merge(a).state_digest()
    assert a.merge(b).digest(2) == max(a.digest(2), b.digest(2))


def test_live_layout_write_sets_and_read_order() -> None:
    old = Layout(three())
    four = ClusterConfig(nodes=(*three().nodes, ClusterNode("n4", "h:4", "z4", 1)),
                         replication_factor=3)
    new = Layout(four)
    synced = {"n1": 2}
    live = LiveLayout([(1, old), (2, new)], synced=lambda n: synced.get(n, 1))
    moved = [p for p in range(PARTITION_COUNT) if new.partition_nodes(p) != old.partition_nodes(p)]
    assert moved
    p = next(p for p in moved if "n4" in new.partition_nodes(p))
    h = bytes([p]) + bytes(31)
    sets = live.write_sets(h)
    assert sets == [(new.nodes_of(h), 2), (old.nodes_of(h), 2)]
    assert set(live.write_nodes(h)) == {"n1", "n2", "n3", "n4"}
    order = live.read_nodes(h, None)
    assert order[-1] == "n4"  # not synced yet: asked last
    assert set(live.partitions_of_node("n4")) == set(new.partitions_of_node("n4"))
    assert live.partitions_of_node("stranger") == []
    live.update([(2, new)])
    assert live.write_sets(h) == [(new.nodes_of(h), 2)] and live.version == 2


async def test_call_many_reaches_a_quorum_in_every_set() -> None:
    async with net_cluster("abcd", extra_peers={"x": "127.0.0.1:1", "y": "127.0.0.1:2"}) as (nets, _):
        a = nets["a"]
        # Old set {a, b, x}, new set {c, d, y}: 2 of 3 needed in each.
        got = await a.call_many(["a", "b", "x", "c", "d", "y"], "echo", {}, quorum=2, timeout=5,
                                interrupt_after_quorum=False,
                                quorum_sets=[(("a", "b", "x"), 2), (("c", "d", "y"), 2)])
        assert {"a", "b"} <= {n for n, _ in got} and {"c", "d"} <= {n for n, _ in got}
        # A majority of one set down: the write fails, although 4 of 6 answered overall.
        with pytest.raises(QuorumError):
            await a.call_many(["a", "b", "c", "x", "y"], "echo", {}, quorum=2, timeout=5,
                              interrupt_after_quorum=False,
                              quorum_sets=[(("a", "b", "c"), 2), (("c", "x", "y"), 2)])
        await trio.sleep(0)
