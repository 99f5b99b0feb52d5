"""Resync and GC over an in-process fake cluster: fetch, offload, delete, backoff, workers."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from bg_helpers import FakeCluster, block
from storage_helpers import add_ref, del_ref, incref

from blocknode import fastpath
from blocknode.context import NodeContext
from blocknode.storage import MetadataStore
from blocknode.workers.anti_entropy import AntiEntropy
from blocknode.workers.resync import Resync

GC_MS = 600_000


@pytest.fixture
def cluster(tmp_path):
    c = FakeCluster(str(tmp_path), n=3, rf=3, gc_delay_ms=GC_MS)
    yield c
    c.close()


def resync_of(cluster: FakeCluster, nid: str, **kw) -> Resync:
    return Resync(cluster[nid].manager, cluster[nid].ctx, need_block_timeout=1.0, **kw)


async def test_absent_and_needed_block_is_fetched(cluster):
    with trio.fail_after(10):
        h, data = block(3000)
        for nid in ("n2", "n3"):
            await cluster[nid].blocks.write(data)
        await add_ref(cluster["n1"].meta, h, "obj")  # queued for a check at +60 s
        r = resync_of(cluster, "n1")
        assert await r.run_once() == 0  # not due yet
        cluster.clock.advance(61)
        assert await r.run_once() == 1
        assert await cluster["n1"].blocks.read(h) == data
        assert cluster["n1"].meta.counts()["resync_queue"] == 0
        assert cluster["n1"].meta.errors_list() == []


async def test_deletable_block_offloaded_then_deleted_after_gc_delay_only(tmp_path):
    # 4 nodes, rf 3: n1 holds a block of a partition it is not a write node for (as
    # after a layout change); a write node needs it. n1 offloads it, then deletes it.
    cluster = FakeCluster(str(tmp_path), n=4, rf=3, gc_delay_ms=GC_MS)
    try:
        with trio.fail_after(10):
            for i in range(10_000):
                h, data = block(3000, seed=str(i).encode())
                if "n1" not in cluster.layout.write_nodes(h):
                    break
            n1 = cluster["n1"]
            needy, *others = cluster.layout.write_nodes(h)
            await n1.blocks.write(data)
            await add_ref(n1.meta, h, "obj")
            await del_ref(n1.meta, h, "obj")
            await add_ref(cluster[needy].meta, h, "obj2")  # needs it, lacks it
            r = resync_of(cluster, "n1")
            cluster.clock.advance(61)
            await r.run_once()
            assert n1.blocks.exists(h)  # GC delay not passed
            await r.resync_block(h)  # even forced, nothing happens before the delay
            assert n1.blocks.exists(h) and not cluster[needy].blocks.exists(h)
            cluster.clock.advance(GC_MS / 1000 - 61 + 11)
            assert await r.run_once() >= 1
            assert not n1.blocks.exists(h)
            assert await cluster[needy].blocks.read(h) == data  # offloaded first
            assert not any(cluster[o].blocks.exists(h) for o in others)
            assert n1.meta.rc_get(h).encode() is None  # Deletable entry dropped
            assert n1.meta.errors_list() == []
    finally:
        cluster.close()


async def test_write_node_behind_on_references_merges_them_instead_of_deleting(cluster):
    # n1's RC says deletable, but n2 still holds a live reference n1 never saw (as after
    # a lost LMDB): n1 must keep its copy and take the reference (S3).
    with trio.fail_after(10):
        for nid in ("n1", "n2", "n3"):
            ae = AntiEntropy(cluster[nid].manager, cluster[nid].ctx, interval=600, rpc_timeout=5)
            for kind, handler in ae.handlers().items():
                cluster[nid].register(kind, handler)
        h, data = block(3000)
        n1, n2 = cluster["n1"], cluster["n2"]
        await n1.blocks.write(data)
        await add_ref(n1.meta, h, "obj")
        await del_ref(n1.meta, h, "obj")
        await add_ref(n2.meta, h, "obj2")
        r = resync_of(cluster, "n1")
        cluster.clock.advance(GC_MS / 1000 + 11)
        assert await r.run_once() >= 1
        assert await n1.blocks.read(h) == data
        assert [(x.ref_id, x.deleted) for x in n1.meta.refs_of(h)] == [("obj", True), ("obj2", False)]
        assert n1.meta.rc_get(h).count == 1
        assert n1.meta.errors_list() == []


async def test_incref_during_gc_delay_saves_the_block(cluster):
    with trio.fail_after(10):
        h, data = block(3000)
        n1 = cluster["n1"]
        await n1.blocks.write(data)
        await add_ref(n1.meta, h, "a")
        await del_ref(n1.meta, h, "a")
        cluster.clock.advance(100)
        await add_ref(n1.meta, h, "b")
        cluster.clock.advance(GC_MS / 1000 + 20)
        r = resync_of(cluster, "n1")
        assert await r.run_once() >= 1
        assert n1.blocks.exists(h)
        assert n1.meta.rc_get(h).count == 1


async def test_unreachable_peer_blocks_deletion_and_backoff_doubles(cluster):
    with trio.fail_after(10):
        h, data = block(3000)
        n1 = cluster["n1"]
        await n1.blocks.write(data)
        await add_ref(n1.meta, h, "a")
        await del_ref(n1.meta, h, "a")
        cluster.down.add("n3")
        r = resync_of(cluster, "n1")
        cluster.clock.advance(GC_MS / 1000 + 11)
        t0 = cluster.clock.t
        assert await r.run_once() >= 1
        assert n1.blocks.exists(h)
        err = n1.meta.error_get(h)
        assert err is not None and err.count == 1 and err.next_try_ms == t0 + 60_000
        assert "n3" in err.message
        assert n1.meta.resync_next_due() == t0 + 60_000
        delays = []
        for expected in (120_000, 240_000, 480_000):
            cluster.clock.advance((n1.meta.resync_next_due() - cluster.clock.t) / 1000)
            now = cluster.clock.t
            assert await r.run_once() == 1
            err = n1.meta.error_get(h)
            delays.append(err.next_try_ms - now)
            assert err.next_try_ms - now == expected
        assert delays == [120_000, 240_000, 480_000]  # doubles
        assert n1.blocks.exists(h)
        cluster.down.clear()
        assert await r.retry_now(h) == 1
        await r.run_once()
        assert not n1.blocks.exists(h)
        assert n1.meta.error_get(h) is None


async def test_backoff_is_capped_at_one_hour(tmp_path):
    c = FakeCluster(str(tmp_path), n=1, rf=1)
    try:
        h, _ = block(10)
        for _ in range(10):
            err = await c["n1"].meta.error_record(h, "x")
        assert err.next_try_ms - c.clock.t == 3_600_000
    finally:
        c.close()


async def test_a_block_that_fails_for_ever_never_stops_the_worker(tmp_path):
    # issue 9 A.1: a block failing for the 1025th time (~42 days, or seconds with `block
    # retry-now` in a loop) raised OverflowError out of the worker, and again on every restart.
    c = FakeCluster(str(tmp_path), n=1, rf=1)
    try:
        with trio.fail_after(10):
            n1 = c["n1"]
            h, _ = block(100)
            await add_ref(n1.meta, h, "lost")  # referenced here, held nowhere: every resync fails
            for _ in range(1024):
                await n1.meta.error_record(h, "earlier failure")
            await n1.meta.retry_now([h])
            r = resync_of(c, "n1")
            assert await r.run_once() >= 1
            err = n1.meta.error_get(h)
            assert err.count == 1025 and err.next_try_ms == c.clock.t + 3_600_000
            due = [fastpath.queue_key_decode(k)[0] for k, _ in n1.meta.resync_due(now_ms=2**62)]
            assert err.next_try_ms in due  # requeued at its next try
    finally:
        c.close()


async def test_entry_of_a_backing_off_block_waits_for_its_next_try(cluster):
    with trio.fail_after(10):
        h, _ = block(100)
        n1 = cluster["n1"]
        err = await n1.meta.error_record(h, "earlier failure")
        await n1.meta.resync_put(h, 0)
        r = resync_of(cluster, "n1")
        called = []
        r.resync_block = lambda x: called.append(x)  # type: ignore[method-assign]
        assert await r.run_once() == 1
        assert called == [] and n1.meta.resync_next_due() == err.next_try_ms


async def test_layout_change_block_offloaded_to_write_nodes_then_deleted(tmp_path):
    c = FakeCluster(str(tmp_path), n=4, rf=2)
    try:
        with trio.fail_after(10):
            h, data = block(3000)
            owners = c.layout.write_nodes(h)
            stranger = next(n for n in c.nodes if n not in owners)
            await c[stranger].blocks.write(data)
            for o in owners:
                await add_ref(c[o].meta, h, "obj")
            await c[stranger].meta.resync_put(h, 0)
            r = Resync(c[stranger].manager, c[stranger].ctx, need_block_timeout=1.0)
            await r.run_once()
            assert c[stranger].blocks.exists(h)  # no RC record here: a grace period first
            c.clock.advance(GC_MS / 1000 + 11)
            await r.run_once()
            assert not c[stranger].blocks.exists(h)
            for o in owners:
                assert await c[o].blocks.read(h) == data
    finally:
        c.close()


async def test_workers_process_each_block_once_and_settings_persist(cluster, tmp_path):
    with trio.fail_after(15):
        n1 = cluster["n1"]
        blocks = [block(2000) for _ in range(12)]
        for h, data in blocks:
            await cluster["n2"].blocks.write(data)
            await add_ref(n1.meta, h, "x")
        r = resync_of(cluster, "n1", workers=1, tranquility=0)
        active: set[bytes] = set()
        overlaps = []
        real = r.resync_block

        async def checked(h: bytes) -> None:
            if h in active:
                overlaps.append(h)
            active.add(h)
            try:
                await trio.sleep(0.001)
                await real(h)
            finally:
                active.discard(h)

        r.resync_block = checked  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(n1.meta.run_writer)
            nursery.start_soon(r.run)
            await trio.testing.wait_all_tasks_blocked()
            await r.set_workers(4)
            # duplicate entries for the same blocks: never handled concurrently
            await n1.meta.resync_put_many([h for h, _ in blocks], 0)
            cluster.clock.advance(61)
            await n1.meta.resync_put_many([h for h, _ in blocks], 0)  # wakes the workers
            while n1.meta.counts()["resync_queue"]:
                await r.progress.wait()
            assert len(r.worker_states) == 4
            nursery.cancel_scope.cancel()
        assert overlaps == []
        for h, _ in blocks:
            assert n1.blocks.exists(h)
        await r.set_tranquility(0.5)
        r2 = resync_of(cluster, "n1", workers=1, tranquility=2)
        assert r2.workers == 4 and r2.tranquility == 0.5


async def test_a_commit_between_the_queue_check_and_the_wait_wakes_the_worker(tmp_path):
    # issue 9 C.12: the worker checked the queue, then started waiting; an entry committed
    # in between fired a notify nobody was waiting for yet, and the worker slept on.
    c = FakeCluster(str(tmp_path), n=1, rf=1)
    try:
        meta = c["n1"].meta
        h, _ = block(10)
        r = resync_of(c, "n1", tranquility=0)
        handled = trio.Event()

        async def record(x: bytes) -> None:
            handled.set()

        r.resync_block = record  # type: ignore[method-assign]
        real_next_due = meta.resync_next_due
        raced = []

        def next_due_then_commit() -> int | None:
            due = real_next_due()  # the worker has looked: nothing queued
            if not raced:
                raced.append(True)  # ... and now, before it waits, an entry is committed
                meta.env.write_now(lambda txn: meta.queue.tx_put(txn, h, 0))
            return due

        meta.resync_next_due = next_due_then_commit  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            with trio.fail_after(5):
                await handled.wait()
            nursery.cancel_scope.cancel()
        assert raced
    finally:
        c.close()


async def test_worker_sleeps_until_due_time_with_mock_clock(tmp_path, mock_clock):
    base = 1_700_000_000_000

    def now_ms() -> int:
        # called from LMDB worker threads too: read the mock clock itself
        return base + int(mock_clock.current_time() * 1000)

    meta = MetadataStore(str(tmp_path / "m"), map_size=1 << 24, sync=False,
                         ctx=NodeContext(now_ms=now_ms))
    try:
        c = FakeCluster(str(tmp_path / "c"), n=1, rf=1)
        c["n1"].manager.meta = meta
        r = Resync(c["n1"].manager, c["n1"].ctx, tranquility=0)
        r.meta = meta
        handled: list[tuple[bytes, float]] = []

        async def record(h: bytes) -> None:
            handled.append((h, trio.current_time()))

        r.resync_block = record  # type: ignore[method-assign]
        with trio.fail_after(60):  # mock time: the jumps below total 30.5 s
            async with trio.open_nursery() as nursery:
                await nursery.start(meta.run_writer)
                nursery.start_soon(r.run)
                h, _ = block(10)
                t0 = trio.current_time()
                await meta.resync_put(h, 30.0)
                mock_clock.jump(29)
                await trio.testing.wait_all_tasks_blocked()
                assert handled == []
                mock_clock.jump(1.5)
                await r.progress.wait()
                assert handled and handled[0][0] == h
                assert 30 <= handled[0][1] - t0 < 31
                nursery.cancel_scope.cancel()
        c.close()
    finally:
        meta.close()


async def test_repair_queues_referenced_and_local_blocks(cluster):
    from blocknode.workers.repair import Repair

    with trio.fail_after(10):
        n1 = cluster["n1"]
        missing, mdata = block(3000)
        stray, sdata = block(3000)
        await cluster["n2"].blocks.write(mdata)
        await add_ref(n1.meta, missing, "m")
        await n1.blocks.write(sdata)  # held, never referenced
        await n1.meta.resync_complete(n1.meta.resync_due(now_ms=2**62)[0][0])  # lose the queue entry
        assert n1.meta.counts()["resync_queue"] == 0
        rep = Repair(n1.meta, n1.blocks, n1.ctx, batch=1)
        st = await rep.repair()
        assert st["state"] == "idle" and st["queued"] == 2 and st["error"] is None
        assert n1.meta.state_get("repair")["queued"] == 2
        await resync_of(cluster, "n1").run_once()
        assert await n1.blocks.read(missing) == mdata
        assert n1.blocks.exists(stray)  # no RC record: a grace period first
        cluster.clock.advance(GC_MS / 1000 + 11)
        await resync_of(cluster, "n1").run_once()
        assert not n1.blocks.exists(stray)  # n2 and n3 confirmed nobody references it


async def test_repair_rc_recalculates_from_refs(cluster):
    from blocknode import fastpath
    from blocknode.storage import RcEntry, RefEntry
    from blocknode.workers.repair import Repair

    with trio.fail_after(10):
        m = cluster["n1"].meta
        hs = sorted(block(10)[0] for _ in range(7))
        for x in hs[:4]:
            await add_ref(m, x, "a")
            await add_ref(m, x, "b")
        await incref(m, hs[0])  # drifted: 3 instead of 2
        await incref(m, hs[5])  # an RC with no reference at all
        await cluster["n1"].blocks.apply_refs([RefEntry(hs[6], "gone", True, 5)])
        got = []
        after = None
        while batch := m.referenced_hashes(after, 2, only_nonzero=False):
            got += batch
            after = batch[-1]
        assert got == sorted([*hs[:4], hs[5], hs[6]])
        st = await Repair(m, cluster["n1"].blocks, cluster["n1"].ctx, batch=3).repair(rc=True)
        assert st["rc_recalculated"] == 6
        assert m.rc_get(hs[0]) == RcEntry(fastpath.RC_PRESENT, 2)
        assert m.rc_get(hs[5]).is_zero()


async def test_repair_whose_state_cannot_be_saved_reports_it_and_goes_on(cluster, monkeypatch):
    # Issue 9 A.3: Repair saved its state outside its try: a failing save (a full
    # metadata store) escaped the worker and stopped the node.
    from blocknode.errors import MetadataFull
    from blocknode.workers.repair import Repair

    n1 = cluster["n1"]
    rep = Repair(n1.meta, n1.blocks, n1.ctx)
    real = n1.meta.state_set
    fails = [2]

    async def state_set(name: str, value: object) -> None:
        if fails[0]:
            fails[0] -= 1
            raise MetadataFull("the metadata store is full")
        await real(name, value)

    monkeypatch.setattr(n1.meta, "state_set", state_set)
    st = await rep.repair()  # both saves fail: reported, not raised
    assert st["state"] == "idle" and "full" in st["error"] and rep.supervisor.errors == 2
    st = await rep.repair()
    assert st["state"] == "idle" and st["error"] is None
    assert n1.meta.state_get("repair")["state"] == "idle"
