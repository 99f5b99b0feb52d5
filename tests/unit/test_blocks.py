"""Local blocks: inline vs file storage, and what a put queues for resync."""

from __future__ import annotations

import os

from storage_helpers import add_ref

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
