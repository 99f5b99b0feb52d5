"""Reference anti-entropy: diverged replicas converge to the last-writer-wins merge."""

from __future__ import annotations

import pytest
import trio
from bg_helpers import FakeCluster, block
from storage_helpers import add_ref, del_ref

from blocknode.errors import ProtocolError
from blocknode.workers.anti_entropy import AntiEntropy
from blocknode.workers.resync import Resync


@pytest.fixture
def cluster(tmp_path):
    c = FakeCluster(str(tmp_path), n=2, rf=2)
    for nid in c.nodes:
        ae = AntiEntropy(c[nid].manager, c[nid].ctx, rpc_timeout=5)
        c[nid].ae = ae
        for kind, h in ae.handlers().items():
            c[nid].register(kind, h)
    yield c
    c.close()


def refs_of(meta) -> dict:
    return {(r.hash, r.ref_id): (r.deleted, r.ts_ms) for r in meta.iter_refs()}


async def test_diverged_metas_converge_to_lww_merge(cluster):
    with trio.fail_after(10):
        m1, m2 = cluster["n1"].meta, cluster["n2"].meta
        h = [block(100)[0] for _ in range(6)]
        for m in (m1, m2):  # common history
            await add_ref(m, h[0], "a", 100)
            await add_ref(m, h[1], "b", 100)
        await add_ref(m1, h[2], "only-on-1", 200)
        await add_ref(m2, h[3], "only-on-2", 200)
        await del_ref(m1, h[0], "a", 300)  # deletion newer than the add on n2
        await add_ref(m2, h[1], "b", 150)  # newer version on n2 (still live)
        await del_ref(m2, h[1], "b", 400)  # ... then deleted on n2
        await add_ref(m1, h[4], "x", 500)
        await del_ref(m2, h[4], "x", 500)  # tie: the deletion wins
        await add_ref(m2, h[5], "y", 600)
        expected = {
            (h[0], "a"): (True, 300), (h[1], "b"): (True, 400), (h[2], "only-on-1"): (False, 200),
            (h[3], "only-on-2"): (False, 200), (h[4], "x"): (True, 500), (h[5], "y"): (False, 600),
        }
        stats = await cluster["n1"].ae.run_round()
        assert stats["peers_ok"] == ["n2"] and stats["partitions_differing"] >= 1
        assert refs_of(m1) == expected and refs_of(m2) == expected
        # The RC follows the merged refs on both sides.
        for m in (m1, m2):
            assert m.rc_get(h[0]).is_zero() and m.rc_get(h[1]).is_zero()
            assert m.rc_get(h[2]).count == 1 and m.rc_get(h[3]).count == 1
            assert m.rc_get(h[5]).count == 1
        # A second round finds nothing to do.
        stats = await cluster["n2"].ae.run_round()
        assert stats["partitions_differing"] == 0 and stats["ranges_exchanged"] == 0


async def test_only_differing_sub_ranges_are_exchanged(cluster):
    with trio.fail_after(10):
        m1, m2 = cluster["n1"].meta, cluster["n2"].meta
        common = [block(50)[0] for _ in range(300)]
        for m in (m1, m2):
            for x in common:
                await add_ref(m, x, "c", 10)
        extra = block(50)[0]
        await add_ref(m2, extra, "late", 20)
        stats = await cluster["n1"].ae.run_round()
        assert stats["partitions_differing"] == 1 and stats["ranges_exchanged"] == 1
        assert stats["merged_here"] == 1
        assert m1.ref_digests([extra[:1]]) == m2.ref_digests([extra[:1]])


async def test_catching_up_node_fetches_newly_referenced_block(cluster):
    with trio.fail_after(10):
        n1, n2 = cluster["n1"], cluster["n2"]
        h, data = block(3000)
        await n2.blocks.write(data)
        await add_ref(n2.meta, h, "obj")  # n1 was down while this happened
        await n1.ae.run_round()
        assert n1.meta.rc_get(h).count == 1
        cluster.clock.advance(61)  # the incref check is due
        await Resync(n1.manager, n1.ctx).run_once()
        assert await n1.blocks.read(h) == data


async def test_unreachable_peer_is_reported_not_fatal(cluster):
    cluster.down.add("n2")
    stats = await cluster["n1"].ae.run_round()
    assert "n2" in stats["peers_failed"] and stats["peers_ok"] == []


async def test_malformed_exchange_is_refused(cluster):
    with pytest.raises(ProtocolError):
        await cluster["n1"].ae.handle_exchange("n2", {"prefix": b"\x01", "refs": [[b"x", "r", 0, 1]]}, None)
    with pytest.raises(ProtocolError):
        await cluster["n1"].ae.handle_digests("n2", {"prefixes": [b""]}, None)


async def test_large_ranges_are_exchanged_in_pages_both_ways(cluster, monkeypatch):
    # Issue 9 C.8: a range is exchanged a page at a time, whichever side holds more.
    from blocknode.workers import anti_entropy

    monkeypatch.setattr(anti_entropy, "PAGE_BYTES", 1500)  # ~20 rows a page
    with trio.fail_after(20):
        m1, m2 = cluster["n1"].meta, cluster["n2"].meta
        h = block(100)[0]
        other = h[:2] + bytes(30)  # same two-byte sub-range, another block
        for i in range(150):
            await add_ref(m1, h, f"one-{i:04d}", 100 + i)
        for i in range(400):
            await add_ref(m2, h, f"two-{i:04d}", 100 + i)
        for i in range(0, 150, 3):  # newer versions of some of n1's refs on n2
            await del_ref(m2, h, f"one-{i:04d}", 1000)
        await add_ref(m2, other, "x", 5)
        stats = await cluster["n1"].ae.run_round()
        assert stats["peers_ok"] == ["n2"] and stats["ranges_failed"] == 0
        assert stats["ranges_exchanged"] == 1 and stats["calls"] >= 20
        assert refs_of(m1) == refs_of(m2) and len(refs_of(m1)) == 551
        assert m1.rc_get(h).count == m2.rc_get(h).count == 150 - 50 + 400
        stats = await cluster["n2"].ae.run_round()
        assert stats["partitions_differing"] == 0


async def test_paged_exchange_refuses_entries_outside_its_window(cluster):
    ae = cluster["n1"].ae
    h = block(100)[0]
    row = [h, "r", False, 5]
    with pytest.raises(ProtocolError):  # `until` before the entry
        await ae.handle_exchange("n2", {"prefix": h[:2], "refs": [row], "paged": True,
                                        "after": None, "until": [h, "a"]}, None)
    with pytest.raises(ProtocolError):  # `after` the entry
        await ae.handle_exchange("n2", {"prefix": h[:2], "refs": [row], "paged": True,
                                        "after": [h, "s"], "until": None}, None)
    with pytest.raises(ProtocolError):  # a bound outside the prefix
        await ae.handle_exchange("n2", {"prefix": h[:2], "refs": [], "paged": True,
                                        "after": [bytes(32), "s"], "until": None}, None)
    reply, _ = await ae.handle_exchange("n2", {"prefix": h[:2], "refs": [row], "paged": True,
                                               "after": [h, "q"], "until": [h, "r"]}, None)
    assert reply == {"refs": [], "changed": 1, "until": [h, "r"]}
