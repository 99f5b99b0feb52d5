"""Issue 10 part 2: reference times come from the coordinator's hybrid logical clock.

The clock (`blocknode.hlc.HybridClock`), the replica's refusal of versions from a
clock too far ahead, and the coordinator's answer to a change that lost to a
version made elsewhere (`BlockManager.set_ref` / `put`).
"""

from __future__ import annotations

import logging

import pytest
from bg_helpers import FakeClock, FakeCluster, block

from blocknode.errors import ClockSkewError, RemoteProtocolError, VersionConflict
from blocknode.hlc import HLC_STATE_KEY, HybridClock
from blocknode.manager import node_clock
from blocknode.storage import MetadataStore, RefEntry

HOUR = 3600 * 1000


def versions(node, h: bytes) -> dict[str, tuple[bool, int]]:
    return {r.ref_id: (r.deleted, r.ts_ms) for r in node.meta.refs_of(h)}


# ---------------------------------------------------------------- the clock


async def test_timestamps_follow_the_wall_clock_and_never_go_back():
    wall = FakeClock(1_000_000)
    clock = HybridClock(wall, max_skew_ms=5000)
    assert await clock.next() == 1_000_000
    assert await clock.next() == 1_000_001  # same millisecond: still newer
    wall.advance(1)
    assert await clock.next() == 1_001_000
    wall.t -= 60_000  # the wall clock is set back a minute
    assert await clock.next() == 1_001_001
    assert await clock.next(at_least=2_000_000) == 2_000_000


async def test_observed_versions_move_the_clock_unless_too_far_ahead():
    wall = FakeClock(1_000_000)
    clock = HybridClock(wall, max_skew_ms=5000)
    assert clock.observe(1_004_000)  # a peer 4 s ahead: within the skew
    assert await clock.next() == 1_004_001  # a change made after seeing it wins over it
    assert clock.too_far_ahead(1_005_000) == 0 and clock.too_far_ahead(1_005_001) == 1
    assert not clock.observe(1_000_000 + HOUR)  # an hour ahead: ignored
    assert await clock.next() == 1_004_002


async def test_the_high_water_mark_is_persisted_before_a_time_above_it_is_issued():
    wall = FakeClock(1_000_000)
    stored: list[int] = []

    async def store(mark: int) -> None:
        stored.append(mark)

    clock = HybridClock(wall, max_skew_ms=8000, load=lambda: None, store=store, reserve_ms=1000)
    issued = [await clock.next() for _ in range(5)]
    assert stored == [1_001_000]  # one write covers the next second of timestamps
    wall.advance(0.5)
    issued.append(await clock.next())
    assert stored == [1_001_000]
    wall.advance(1)
    issued.append(await clock.next())
    assert stored == [1_001_000, 1_002_500] and max(issued) <= stored[-1]
    # restarted with the wall clock an hour behind: never at or below what was issued
    wall.t -= HOUR
    again = HybridClock(wall, max_skew_ms=8000, load=lambda: stored[-1], store=store)
    assert await again.next() > max(issued)


async def test_the_node_clock_survives_a_restart_with_the_wall_clock_set_back(tmp_path):
    wall = FakeClock(1_700_000_000_000)
    meta = MetadataStore(str(tmp_path / "meta"), map_size=1 << 24, sync=False)
    try:
        clock = node_clock(meta, 5000)
        clock.now_ms = wall
        last = max([await clock.next() for _ in range(3)])
        assert meta.state_get(HLC_STATE_KEY) >= last
    finally:
        meta.close()
    wall.t -= HOUR
    meta = MetadataStore(str(tmp_path / "meta"), map_size=1 << 24, sync=False)
    try:
        clock = node_clock(meta, 5000)
        clock.now_ms = wall
        assert await clock.next() > last
    finally:
        meta.close()


# ---------------------------------------------------------------- replicas


async def test_a_client_may_not_send_a_time(tmp_path):
    c = FakeCluster(str(tmp_path), n=1, rf=1)
    try:
        m = c["n1"].manager
        h, _ = block(100)
        with pytest.raises(RemoteProtocolError, match="'ts' is refused"):
            await m.handle_client_ref("client", {"hash": h, "ref_id": "r", "deleted": True,
                                                 "ts": 2**63 - 1}, None)
        with pytest.raises(RemoteProtocolError, match="'ts' is refused"):
            await m.handle_client_put("client", {"ref_id": "r", "ts": 1}, b"x")
        with pytest.raises(RemoteProtocolError, match="ts is refused"):
            await m.handle_client_put_many("client", {"items": [["r", 1, 1]]}, b"x")
        assert c["n1"].meta.counts()["refs"] == 0
        # without one, the coordinator stamps the version with its own clock
        reply, _ = await m.handle_client_put("client", {"ref_id": "r"}, b"x")
        (ref,) = c["n1"].meta.refs_of(reply["hash"])
        assert ref.ts_ms >= c.clock.t
    finally:
        c.close()


async def test_a_version_from_a_clock_too_far_ahead_is_refused_and_logged(tmp_path, caplog):
    c = FakeCluster(str(tmp_path), n=3, rf=3)
    try:
        n1 = c["n1"]
        h, blk = block(100)
        ahead = c.clock.t + 6000  # max_clock_skew is 5 s by default
        caplog.set_level(logging.WARNING, logger="blocknode.manager")
        with pytest.raises(ClockSkewError, match="ahead of node n1's clock"):
            await n1.manager.handle_add_ref("n2", {"hash": h, "ref_id": "r", "ts": ahead}, None)
        with pytest.raises(ClockSkewError):
            await n1.manager.handle_del_ref("n2", {"hash": h, "ref_id": "r", "ts": ahead}, None)
        with pytest.raises(ClockSkewError):
            await n1.manager.handle_put_block("n2", {"hash": h, "ref_id": "r", "ts": ahead}, blk)
        with pytest.raises(ClockSkewError):
            await n1.manager.handle_put_blocks(
                "n2", {"items": [[h, "ok", c.clock.t, len(blk)], [h, "r", ahead, len(blk)]]}, blk * 2)
        assert n1.meta.refs_of(h) == [] and not n1.blocks.exists(h)
        assert "refused 1 reference version(s) from n2" in caplog.text
        # within the skew it is taken, and moves this node's clock past it
        ok = c.clock.t + 4000
        await n1.manager.handle_add_ref("n2", {"hash": h, "ref_id": "r", "ts": ok}, None)
        assert versions(n1, h) == {"r": (False, ok)}
        assert await n1.manager.clock.next() > ok
        # anti-entropy: the entries too far ahead are left out, the others merged
        h2, _ = block(100)
        theirs = [RefEntry(h2, "near", False, c.clock.t), RefEntry(h2, "far", True, c.clock.t + HOUR)]
        kept = n1.manager.versions_from_peer("n3", theirs)
        assert kept == theirs[:1]
    finally:
        c.close()


async def test_a_change_that_lost_to_a_version_made_elsewhere_is_made_again_newer(tmp_path):
    """A node 3 s ahead deleted the reference (within the skew); a node behind it, which
    has not seen that deletion, then adds it again: the later change wins."""
    c = FakeCluster(str(tmp_path), n=3, rf=3)
    try:
        h, blk = block(100)
        await c["n1"].manager.put(bytes(blk), "doc")
        ahead = c.clock.t + 3000
        for nid in ("n2", "n3"):  # n1 was away when it was deleted
            await c[nid].blocks.apply_ref(RefEntry(h, "doc", True, ahead))
        assert await c["n1"].manager.set_ref(h, "doc", deleted=False) is True
        for nid in ("n1", "n2", "n3"):
            deleted, ts = versions(c[nid], h)["doc"]
            assert not deleted and ts > ahead, nid
        # the same for the reference a put carries
        h2, blk2 = block(100)
        for nid in ("n2", "n3"):
            await c[nid].blocks.apply_ref(RefEntry(h2, "doc", True, ahead + 10))
        assert await c["n1"].manager.put(bytes(blk2), "doc") == h2
        for nid in ("n1", "n2", "n3"):
            assert not versions(c[nid], h2)["doc"][0], nid
            assert c[nid].meta.rc_get(h2).is_nonzero(), nid
    finally:
        c.close()


async def test_a_change_that_cannot_win_says_so(tmp_path):
    """A deletion stored timestamped an hour ahead (written before issue 10 by a client
    whose clock was ahead): a reference cannot win over it until then, and says so."""
    c = FakeCluster(str(tmp_path), n=3, rf=3)
    try:
        h, blk = block(100)
        await c["n1"].manager.put(bytes(blk), "doc")
        for nid in ("n1", "n2", "n3"):
            await c[nid].blocks.apply_ref(RefEntry(h, "doc", True, c.clock.t + HOUR))
        with pytest.raises(VersionConflict, match="lost to a newer deletion .*beyond max_clock_skew"):
            await c["n1"].manager.set_ref(h, "doc", deleted=False)
        with pytest.raises(VersionConflict):
            await c["n2"].manager.handle_client_ref("client", {"hash": h, "ref_id": "doc"}, None)
        # a deletion of a reference that is deleted already is no conflict
        assert await c["n1"].manager.set_ref(h, "doc", deleted=True) is False
    finally:
        c.close()


async def test_unref_says_whether_the_reference_existed(tmp_path):
    c = FakeCluster(str(tmp_path), n=3, rf=3)
    try:
        h, blk = block(100)
        m = c["n1"].manager
        await m.put(bytes(blk), "doc")
        reply, _ = await m.handle_client_ref("client", {"hash": h, "ref_id": "nope", "deleted": True}, None)
        assert reply == {"existed": False}
        reply, _ = await m.handle_client_ref("client", {"hash": h, "ref_id": "doc", "deleted": True}, None)
        assert reply == {"existed": True}
    finally:
        c.close()


def test_clock_refuses_a_zero_skew():
    with pytest.raises(ValueError):
        HybridClock(FakeClock(), max_skew_ms=0)

