"""Local blocks: inline vs file storage, and what a put queues for resync."""

from __future__ import annotations

import os

import pytest
import trio
from bg_helpers import FakeCluster
from storage_helpers import add_ref, del_ref

from blocknode import fastpath
from blocknode.block import hashed
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore, RefEntry


def _blocks(tmp_path) -> LocalBlocks:
    meta = MetadataStore(str(tmp_path / "meta"), map_size=1 << 26, sync=False)
    return LocalBlocks(BlockFiles(str(tmp_path / "data"), fsync=False), meta, 4096)


async def test_small_blocks_inline_large_ones_as_files(tmp_path):
    b = _blocks(tmp_path)
    small, large = hashed(os.urandom(4096)), hashed(os.urandom(4097))
    hs, hl = small.hash, large.hash
    assert await b.write(small) and await b.write(large)
    assert b.meta.inline.get(hs) == small and not b.files.exists(hs)
    assert b.files.exists(hl) and b.meta.inline.get(hl) is None
    assert await b.read(hs) == small and await b.read(hl) == large
    assert list(b.walk()) == sorted([hs, hl]) and b.count() == 2


async def test_a_put_with_its_reference_queues_no_arrival_check(tmp_path):
    b = _blocks(tmp_path)
    for blk in (hashed(os.urandom(100)), hashed(os.urandom(10_000))):  # inline and file
        await b.write(blk, ref=RefEntry(blk.hash, "r", False, 1))
        assert b.meta.rc_get(blk.hash).count == 1
    await b.write_inline_many([(blk, RefEntry(blk.hash, "r", False, 1))
                               for blk in (hashed(b"x"), hashed(b"y"))])
    assert b.meta.counts()["resync_queue"] == 0
    # a reference without the block: the block must arrive, so a check is queued
    await add_ref(b.meta, fastpath.block_hash(b"elsewhere"), "r", 1)
    assert b.meta.counts()["resync_queue"] == 1


def _flip_bit(path: str, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


async def test_reput_over_a_corrupt_file_replaces_it(tmp_path):
    # issue 9 C.10: a re-put answered "already stored" over a corrupt copy, so a corrupt
    # copy counted toward the write quorum and the next get failed.
    b = _blocks(tmp_path)
    blk = hashed(os.urandom(10_000))
    assert await b.write(blk) is True
    path = b.files.path(blk.hash)
    _flip_bit(path)
    assert await b.write(blk, ref=RefEntry(blk.hash, "r", False, 1)) is True  # stored again
    assert await b.read(blk.hash) == blk
    assert os.path.exists(path + ".corrupted")  # the bad copy kept for the operator
    assert b.count() == 1 and b.meta.rc_get(blk.hash).count == 1
    with open(path, "r+b") as f:  # a truncated copy: caught by its size alone
        f.truncate(5000)
    assert await b.write(blk) is True
    assert await b.read(blk.hash) == blk
    assert await b.write(blk) is False  # an intact copy is left alone


async def test_reput_over_a_corrupt_inline_block_replaces_it(tmp_path):
    b = _blocks(tmp_path)
    blk = hashed(os.urandom(1000))
    assert await b.write(blk) is True
    bad = bytes(blk[:-1]) + bytes([blk[-1] ^ 1])
    b.meta.env.write_now(lambda txn: b.meta.inline.tx_put(txn, blk.hash, bad, overwrite=True))
    assert await b.write(blk) is True
    assert b.meta.inline.get(blk.hash) == blk
    assert await b.write(blk) is False
    b.meta.env.write_now(lambda txn: b.meta.inline.tx_put(txn, blk.hash, bad, overwrite=True))
    assert await b.write_inline_many([(blk, RefEntry(blk.hash, "r", False, 1))]) == 1
    assert await b.read(blk.hash) == blk


async def test_a_read_never_quarantines_a_copy_a_put_has_just_repaired(tmp_path):
    # A read that found the old corrupt bytes re-checks under the block's lock: the
    # put that replaced them meanwhile keeps its good copy.
    b = _blocks(tmp_path)
    blk = hashed(os.urandom(10_000))
    await b.write(blk)
    _flip_bit(b.files.path(blk.hash))
    real_aread = b.files.aread

    async def read_then_repair(h: bytes):
        try:
            return await real_aread(h)
        finally:
            await b.write(blk)  # a put lands between the read and its verdict

    b.files.aread = read_then_repair  # type: ignore[method-assign]
    assert await b.read(blk.hash) == blk
    b.files.aread = real_aread  # type: ignore[method-assign]
    assert await b.read(blk.hash) == blk


async def test_put_again_over_a_corrupt_copy_then_get(tmp_path):
    # The scenario through the coordinator: put, flip a bit, put again, get.
    c = FakeCluster(str(tmp_path), n=1, rf=1, inline_threshold=1024)
    try:
        m, meta = c["n1"].manager, c["n1"].meta
        for data in (os.urandom(100), os.urandom(5000)):  # inline and file
            h = await m.put(data, "obj")
            if c["n1"].files.exists(h):
                _flip_bit(c["n1"].files.path(h), 10)
            else:
                bad = b"x" + data[1:]
                meta.env.write_now(lambda txn, h=h, bad=bad: meta.inline.tx_put(txn, h, bad, overwrite=True))
            assert await m.put(data, "obj") == h
            assert await m.get(h) == data
    finally:
        c.close()


async def test_a_reference_never_lands_between_the_deletion_check_and_the_unlink(tmp_path):
    # issue 9 C.11: delete_if_deletable checked the RC under the block's lock, then
    # unlinked; add_ref committed without the lock, in between, and ended live with no
    # copy. References are now applied under the lock: one arriving mid-deletion waits,
    # and lands on a block that is gone (so it queues the fetch of a copy).
    c = FakeCluster(str(tmp_path), n=1, rf=1, gc_delay_ms=1000)
    try:
        with trio.fail_after(10):
            n1 = c["n1"]
            blk = hashed(os.urandom(5000))
            h = blk.hash
            await n1.blocks.write(blk, ref=RefEntry(h, "old", False, c.clock.t))
            c.clock.advance(1)
            await del_ref(n1.meta, h, "old")
            c.clock.advance(2)
            checked: list[bool] = []
            ref_done = trio.Event()
            real_adelete = n1.files.adelete

            async def add_ref_from_a_peer() -> None:
                fields = {"hash": h, "ref_id": "new", "ts": c.clock.t}
                await n1.manager.handle_add_ref("n2", fields, None)
                ref_done.set()

            async with trio.open_nursery() as nursery:
                async def adelete_while_a_reference_arrives(x: bytes) -> bool:
                    nursery.start_soon(add_ref_from_a_peer)
                    with trio.move_on_after(0.5):
                        await ref_done.wait()
                    # the RC this deletion checked still holds while the file goes
                    checked.append(n1.meta.rc_get(x).is_deletable(c.clock.t))
                    return await real_adelete(x)

                n1.files.adelete = adelete_while_a_reference_arrives  # type: ignore[method-assign]
                assert await n1.blocks.delete_if_deletable(h) is True
            assert checked == [True]
            assert n1.meta.rc_get(h).count == 1 and not n1.blocks.exists(h)
            due = [x for _, x in n1.meta.resync_due(now_ms=2**62)]
            assert h in due  # the node will fetch the block its new reference needs
    finally:
        c.close()


async def test_a_file_block_from_a_peer_is_verified_and_written_in_one_thread_hop(tmp_path):
    from blocknode import block as block_mod
    from blocknode.errors import HashMismatch, RemoteError

    c = FakeCluster(str(tmp_path), n=2, rf=2, inline_threshold=4096)
    try:
        n2 = c["n2"]
        hops: list[str] = []
        real = n2.files._run_sync

        async def counting(fn, *args, **kw):
            hops.append(getattr(fn, "__qualname__", repr(fn)))
            return await real(fn, *args, **kw)

        n2.files._run_sync = counting
        data = os.urandom(block_mod.HASH_IN_THREAD_MIN + 1000)
        h = fastpath.block_hash(data)
        # bytes that do not hash to the name: refused, nothing stored, no reference
        with pytest.raises(RemoteError, match="does not hash"):
            await c["n1"].net.call("n2", "put_block", {"hash": h, "ref_id": "r", "ts": 1},
                                   data[:-1] + b"\0", timeout=5)
        assert n2.blocks.count() == 0 and n2.meta.refs_of(h) == []
        hops.clear()
        reply, _ = await c["n1"].net.call("n2", "put_block", {"hash": h, "ref_id": "r", "ts": 1},
                                          data, timeout=5)
        assert reply["stored"] is True
        assert len(hops) == 1 and "averify_write" in hops[0]  # hash and write: one hop
        assert n2.files.read(h) == data and [r.ref_id for r in n2.meta.refs_of(h)] == ["r"]
        reply, _ = await c["n1"].net.call("n2", "put_block", {"hash": h}, data, timeout=5)
        assert reply["stored"] is False  # already there
        # a view of a receive buffer (what Node.dispatch hands over for put_block): not copied
        data2 = os.urandom(len(data))
        h2 = fastpath.block_hash(data2)
        buf = bytearray(b"head" + data2)
        reply, _ = await n2.manager.handle_put_block("n1", {"hash": h2}, memoryview(buf)[4:])
        assert reply["stored"] is True and n2.files.read(h2) == data2
        buf[10] ^= 1
        with pytest.raises(HashMismatch):
            await n2.manager.handle_put_block("n1", {"hash": fastpath.block_hash(bytes(buf))},
                                              memoryview(buf)[4:])
    finally:
        c.close()
