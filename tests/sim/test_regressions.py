"""Bugs the simulation found: each with its seed, and a direct test of the fix."""

from __future__ import annotations

import os

from blocknode import fastpath
from blocknode.block import hashed
from blocknode.sim.run import SimConfig, run_seed
from blocknode.storage import BlockFiles, LocalBlocks, MetadataStore, RefEntry


def _blocks(tmp_path) -> LocalBlocks:
    meta = MetadataStore(str(tmp_path / "meta"), map_size=1 << 26, sync=False,
                         gc_delay_ms=60_000)
    return LocalBlocks(BlockFiles(str(tmp_path / "data"), fsync=False), meta, 1024)


def test_seed_121_a_late_put_after_its_unref_is_collected() -> None:
    """Seed 121: a put stalled by a one-way partition reached a replica after the deletion of
    its reference had; the block was stored with no RC record and never collected."""
    r = run_seed(SimConfig(seed=121))
    assert not r.violations, r.violations


async def test_a_put_losing_to_a_newer_deletion_leaves_a_collectable_block(tmp_path):
    b = _blocks(tmp_path)
    for blk in (hashed(os.urandom(100)), hashed(os.urandom(5000))):  # inline and file
        h = blk.hash
        await b.meta.env.submit(lambda txn, h=h: b.meta.refs.tx_apply(
            txn, RefEntry(h, "r", True, 2000)))  # the deletion arrives first
        assert b.meta.rc_get(h).is_absent()
        await b.write(blk, ref=RefEntry(h, "r", False, 1000))  # then the older put
        rc = b.meta.rc_get(h)
        assert rc.state == fastpath.RC_DELETABLE  # the GC delay runs, its check is queued
        assert any(qh == h for _, qh in b.meta.resync_due(now_ms=rc.value + 10**6, limit=100))


async def test_a_deleted_version_stored_with_its_block_is_collectable(tmp_path):
    b = _blocks(tmp_path)
    blk = hashed(os.urandom(5000))
    await b.write(blk, ref=RefEntry(blk.hash, "r", True, 1000))
    assert b.meta.rc_get(blk.hash).state == fastpath.RC_DELETABLE
