"""The metadata store (`blocknode.storage`): the seed's RcEntry transitions, LWW references,
resync queue, errors, worker state, inline blocks, group commit."""

from __future__ import annotations

import os

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_helpers import add_ref, decref, del_ref, incref

from blocknode import fastpath
from blocknode.context import NodeContext
from blocknode.errors import MetadataFull
from blocknode.notify import Notify
from blocknode.storage import ABSENT, MetadataStore, RcEntry, RefEntry
from blocknode.storage.resync_queue import ERROR_COUNT_MAX, ErrorEntry, encode_error
from tests.fakes import FakeClock

H1 = fastpath.block_hash(b"one")
H2 = fastpath.block_hash(b"two")


def _meta(tmp_path, clock=None, **kw) -> MetadataStore:
    return MetadataStore(str(tmp_path / "meta"), ctx=NodeContext(now_ms=clock or FakeClock(1_000_000)),
                         map_size=1 << 26, **kw)


# ---- RcEntry, exactly as the seed ----

def test_rc_transitions_like_the_seed():
    now, delay = 1000, 600_000
    e = ABSENT
    assert e.is_zero() and e.is_deletable(now) and e.encode() is None
    e = e.increment()
    assert e == RcEntry(fastpath.RC_PRESENT, 1) and e.encode() == (1).to_bytes(8, "big")
    assert not e.is_deletable(now)
    e = e.increment().decrement(now, delay)
    assert e == RcEntry(fastpath.RC_PRESENT, 1)
    e = e.decrement(now, delay)
    assert e == RcEntry(fastpath.RC_DELETABLE, now + delay)
    assert e.encode() == bytes(8) + (now + delay).to_bytes(8, "big")
    assert e.is_zero() and not e.is_deletable(now + delay) and e.is_deletable(now + delay + 1)
    assert e.decrement(now + 5, delay) == e  # decrement of a deletable is unchanged
    assert e.increment() == RcEntry(fastpath.RC_PRESENT, 1)  # incref cancels the deletion
    assert RcEntry.decode(e.encode()) == e


async def test_incref_decref_gc_delay_with_injected_clock(tmp_path):
    clock = FakeClock(1_000_000)
    m = _meta(tmp_path, clock, gc_delay_ms=10_000)
    await incref(m, H1)
    await incref(m, H1)
    assert m.rc_get(H1) == RcEntry(fastpath.RC_PRESENT, 2)
    await decref(m, H1)
    await decref(m, H1)
    e = m.rc_get(H1)
    assert e.state == fastpath.RC_DELETABLE and e.value == clock.t + 10_000
    assert await m.clear_deleted(H1) is False  # not yet
    clock.t += 10_000
    assert await m.clear_deleted(H1) is False  # seed: strictly after
    clock.t += 1
    assert await m.clear_deleted(H1) is True
    assert m.rc_get(H1) == ABSENT


async def test_incref_queues_resync_and_decref_queues_gc_check(tmp_path):
    clock = FakeClock(1_000_000)
    m = _meta(tmp_path, clock, gc_delay_ms=10_000, incref_resync_delay_ms=60_000)
    await incref(m, H1)
    assert m.resync_due(clock.t) == []
    assert m.resync_next_due() == clock.t + 60_000
    await incref(m, H1)  # not from zero: no second entry
    assert m.counts()["resync_queue"] == 1
    await decref(m, H1)
    await decref(m, H1)
    assert m.counts()["resync_queue"] == 2
    due = m.resync_due(clock.t + 10_000 + 10_000)
    assert [h for _, h in due] == [H1]


# ---- references ----

async def test_refs_idempotent_and_out_of_order(tmp_path):
    m = _meta(tmp_path)
    assert await add_ref(m, H1, "a", 100) is True
    assert await add_ref(m, H1, "a", 100) is False  # retried call never double-counts
    assert m.rc_get(H1).count == 1
    assert await del_ref(m, H1, "a", 50) is False  # a stale delete never removes a newer add
    assert m.rc_get(H1).count == 1
    assert await del_ref(m, H1, "a", 200) is True
    assert m.rc_get(H1).state == fastpath.RC_DELETABLE
    assert await add_ref(m, H1, "a", 150) is False  # older add after newer delete: ignored
    assert m.rc_get(H1).count == 0
    assert await add_ref(m, H1, "a", 300) is True
    assert m.rc_get(H1).count == 1
    # tie: the deletion wins, deterministically
    assert await del_ref(m, H1, "a", 300) is True
    assert m.rc_get(H1).count == 0
    assert [(r.ref_id, r.deleted, r.ts_ms) for r in m.refs_of(H1)] == [("a", True, 300)]


ops = st.lists(
    st.tuples(
        st.sampled_from([H1, H2]),
        st.sampled_from(["r1", "r2", "r3"]),
        st.booleans(),
        st.integers(min_value=0, max_value=20),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_rc_equals_live_refs_after_any_sequence(tmp_path_factory, seq):
    m = MetadataStore(str(tmp_path_factory.mktemp("m")), ctx=NodeContext(now_ms=FakeClock(1_000_000)),
                      map_size=1 << 24)
    try:
        for h, rid, deleted, ts in seq:
            ref = RefEntry(h, rid, deleted, ts)
            m.env.write_now(lambda txn, r=ref: m.refs.tx_apply(txn, r))
        # and the final state equals the LWW winner of each (hash, ref), whatever the order
        winners: dict = {}
        for h, rid, deleted, ts in seq:
            r = RefEntry(h, rid, deleted, ts)
            if r.wins_over(winners.get((h, rid))):
                winners[(h, rid)] = r
        for h in (H1, H2):
            live = [r for r in m.refs_of(h) if not r.deleted]
            assert m.rc_get(h).count == len(live)
            expected_live = sum(1 for (hh, _), r in winners.items() if hh == h and not r.deleted)
            assert len(live) == expected_live
            assert m.env.write_now(lambda txn, h=h: m.refs.tx_recalculate(txn, h)).count == len(live)
    finally:
        m.close()


# ---- resync queue ----

async def test_resync_queue_order_and_never_lost(tmp_path):
    clock = FakeClock(1_000_000)
    m = _meta(tmp_path, clock)
    await m.resync_put(H2, 5)
    await m.resync_put(H1, 1)
    assert m.resync_due(clock.t) == []
    clock.t += 10_000
    due = m.resync_due()
    assert [h for _, h in due] == [H1, H2]
    # looking at an entry does not remove it: a crash now loses nothing
    m.close()
    m = _meta(tmp_path, clock)
    due = m.resync_due()
    assert [h for _, h in due] == [H1, H2]
    key, _ = due[0]
    new_key = await m.resync_requeue(key, 60)
    assert fastpath.queue_key_decode(new_key) == (clock.t + 60_000, H1)
    await m.resync_complete(due[1][0])
    assert m.counts()["resync_queue"] == 1
    assert m.resync_next_due() == clock.t + 60_000


async def test_resync_put_wakes_waiters(tmp_path):
    m = _meta(tmp_path)
    woke = trio.Event()

    async def waiter():
        await m.resync_notify.wait()
        woke.set()

    async with trio.open_nursery() as n:
        await n.start(m.run_writer)
        n.start_soon(waiter)
        await trio.sleep(0)
        await m.resync_put(H1, 0)
        with trio.fail_after(2):
            await woke.wait()
        n.cancel_scope.cancel()


def test_notify_wait_returns_at_once_when_notified_since_the_snapshot():
    # issue 9 C.12: a notify between "check" and "wait" must not be lost.
    n = Notify()

    async def main() -> None:
        seen = n.snapshot()
        n.notify()  # lands after the check, before the wait
        with trio.fail_after(1):
            await n.wait(seen)
        seen = n.snapshot()
        with trio.move_on_after(0.05) as scope:
            await n.wait(seen)  # nothing new: waits
        assert scope.cancelled_caught

    trio.run(main)


# ---- errors and state ----

async def test_error_backoff_doubles_and_caps(tmp_path):
    clock = FakeClock(1_000_000)
    m = _meta(tmp_path, clock)
    delays = []
    for _ in range(9):
        e = await m.error_record(H1, "peer down")
        delays.append((e.next_try_ms - clock.t) // 1000)
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert m.error_get(H1).count == 9
    assert [e.hash for e in m.errors_list()] == [H1]
    await m.error_clear(H1)
    assert m.error_get(H1) is None


async def test_backoff_survives_any_number_of_failures(tmp_path):
    # issue 9 A.1: the 1025th failure of one block overflowed 2 ** (count - 1) as a float.
    clock = FakeClock(1_000_000)
    m = _meta(tmp_path, clock, sync=False)
    for _ in range(1030):
        e = await m.error_record(H1, "lost everywhere")
    assert e.count == 1030 and e.next_try_ms - clock.t == 3_600_000
    # the stored count stops growing at its cap
    at_cap = ErrorEntry(H1, ERROR_COUNT_MAX, 0, 0, "x")
    m.env.write_now(lambda txn: txn.put(H1, encode_error(at_cap), db=m.queue.errors_db))
    assert (await m.error_record(H1, "again")).count == ERROR_COUNT_MAX
    # an unreadable record does not stop the next failure from being recorded
    for raw in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb(["a", None, 3, "m"])):
        m.env.write_now(lambda txn, r=raw: txn.put(H2, r, db=m.queue.errors_db))
        e = await m.error_record(H2, "after a bad record")
        assert e.count == 1 and e.next_try_ms - clock.t == 60_000


async def test_state_persisted(tmp_path):
    m = _meta(tmp_path)
    await m.state_set("resync.workers", {"n": 3, "tranquility": 1.5})
    m.close()
    m = _meta(tmp_path)
    assert m.state_get("resync.workers") == {"n": 3, "tranquility": 1.5}
    assert m.state_get("nothing", 7) == 7


# ---- group commit ----

async def test_group_commit_batches_and_isolates_a_failing_op(tmp_path):
    m = _meta(tmp_path)
    results: dict = {}

    async def add(i):
        h = fastpath.block_hash(str(i).encode())
        results[i] = await add_ref(m, h, "r", 1)

    async def bad():
        def boom(txn):
            raise ValueError("bad op")
        with pytest.raises(ValueError, match="bad op"):
            await m.env.submit(boom)

    async with trio.open_nursery() as n:
        await n.start(m.run_writer)
        async with trio.open_nursery() as inner:
            for i in range(200):
                inner.start_soon(add, i)
            inner.start_soon(bad)
        n.cancel_scope.cancel()
    assert all(results[i] is True for i in range(200))
    assert m.counts()["rc_entries"] == 200


async def test_inline_blocks(tmp_path):
    m = _meta(tmp_path)
    data = os.urandom(4096)
    h = fastpath.block_hash(data)
    put = m.inline.tx_put
    assert await m.env.submit(lambda txn: put(txn, h, data)) is True
    assert await m.env.submit(lambda txn: put(txn, h, data)) is False
    assert m.inline.get(h) == data and m.inline.exists(h)
    assert list(m.inline.iter_hashes()) == [h] and m.inline.count() == 1
    assert await m.env.submit(lambda txn: m.inline.tx_delete(txn, h)) is True
    assert m.inline.get(h) is None


def test_full_map_says_so(tmp_path):
    m = MetadataStore(str(tmp_path / "small"), map_size=64 * 1024)
    with pytest.raises(MetadataFull, match="lmdb_map_size"):
        for _ in range(1000):
            data = os.urandom(2000)
            m.env.write_now(lambda txn, d=data: m.inline.tx_put(txn, fastpath.block_hash(d), d))


async def test_ref_digests_are_the_wire_format_of_before(tmp_path):
    # Peers compare these digests: the bytes hashed must never change.
    import hashlib

    m = _meta(tmp_path)
    for i in range(20):
        h = fastpath.block_hash(str(i).encode())
        await add_ref(m, h, f"ref-{i}", 100 + i)
        if i % 3 == 0:
            await del_ref(m, h, f"ref-{i}", 200 + i)
    prefixes = [b"", bytes([H1[0]]), fastpath.block_hash(b"7")[:2], b"\x00\x00"]
    expected = []
    for p in prefixes:
        d = hashlib.blake2b(digest_size=16)
        for r in m.iter_refs(p):
            rid = r.ref_id.encode()
            d.update(r.hash + len(rid).to_bytes(1, "big") + rid
                     + bytes([r.deleted]) + r.ts_ms.to_bytes(8, "big"))
        expected.append(d.digest())
    assert m.ref_digests(prefixes) == expected
