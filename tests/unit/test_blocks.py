"""Local blocks: inline vs file storage, and what a put queues for resync."""

from __future__ import annotations

import os

from storage_helpers import add_ref

from blocknode import fastpath
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore, RefEntry


def _blocks(tmp_path) -> LocalBlocks:
    meta = MetadataStore(str(tmp_path / "meta"), map_size=1 << 26, sync=False)
    return LocalBlocks(BlockFiles(str(tmp_path / "data"), fsync=False), meta, 4096)


async def test_small_blocks_inline_large_ones_as_files(tmp_path):
    b = _blocks(tmp_path)
    small, large = os.urandom(4096), os.urandom(4097)
    hs, hl = fastpath.block_hash(small), fastpath.block_hash(large)
    assert await b.write(hs, small) and await b.write(hl, large)
    assert b.meta.inline.get(hs) == small and not b.files.exists(hs)
    assert b.files.exists(hl) and b.meta.inline.get(hl) is None
    assert await b.read(hs) == small and await b.read(hl) == large
    assert list(b.walk()) == sorted([hs, hl]) and b.count() == 2


async def test_a_put_with_its_reference_queues_no_arrival_check(tmp_path):
    b = _blocks(tmp_path)
    for data in (os.urandom(100), os.urandom(10_000)):  # inline and file
        h = fastpath.block_hash(data)
        await b.write(h, data, ref=RefEntry(h, "r", False, 1))
        assert b.meta.rc_get(h).count == 1
    await b.write_inline_many([(fastpath.block_hash(d), d, RefEntry(fastpath.block_hash(d), "r", False, 1))
                               for d in (b"x", b"y")])
    assert b.meta.counts()["resync_queue"] == 0
    # a reference without the block: the block must arrive, so a check is queued
    await add_ref(b.meta, fastpath.block_hash(b"elsewhere"), "r", 1)
    assert b.meta.counts()["resync_queue"] == 1
