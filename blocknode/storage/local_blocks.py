"""`LocalBlocks`: the blocks this node holds, small ones inline in LMDB, the rest as files.

Blocks of at most `inline_threshold` bytes live in the metadata store's `blocks`
table (`InlineTable`): they are committed in the same group commit as their
reference, so a 4 KiB put costs a share of one LMDB commit instead of a file
fsync plus a directory fsync (see README, "Small blocks"). Larger blocks are
files (`BlockFiles`), in one or several data directories. Each is kept in its
stored form (`blocknode.block.stored_form`: plain, or its zstd frame when the
coordinating node compressed it); which form is said beside the bytes (the
``blocks`` / ``blocks_zst`` table, the ``.zst`` file name). Every read is
verified against the hash (a compressed block is decompressed first, within a
bound).

A copy already held counts as stored only once it is checked (size, then
content; a copy in another form is decompressed and hashed): a put over a
corrupt copy replaces it, so a corrupt copy never counts toward a write quorum.

Writes, quarantines and deletes of one block file, and every change that can
make a block live again (a live reference, an RC recalculation), are
serialised by a striped lock (the seed's `mutation_lock`, per stripe rather
than global); so is moving a file to another data directory (`relocate`). So a delete that checked "still deletable" cannot race a put, or
a reference from a peer or from anti-entropy: a reference either lands before
the check (the copy stays) or after the file is gone (its arrival check then
fetches a copy). A read that saw corrupt bytes re-checks under the lock before
it quarantines (a put may have repaired the copy meanwhile). Inline blocks get
the same guarantees from LMDB: each check-and-change is one transaction.

References are applied here (`apply_refs`), not on `MetadataStore`, so that
nothing outside the storage package can apply one without the lock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from blocknode import block, defects
from blocknode.block import VerifiedBlock
from blocknode.errors import BlockCorrupted
from blocknode.storage.block_files import BlockFiles, Written
from blocknode.storage.env import Txn
from blocknode.storage.metadata import MetadataStore
from blocknode.storage.refs import RcEntry, RefEntry

log = logging.getLogger(__name__)

_STRIPES = 256
DATA_DIRS_KEY = "data_dirs"
"""`state` table key: the data directories in use (their markers are checked at start)."""


class LocalBlocks:
    """Unified access to the local blocks, inline and on disk."""

    def __init__(self, files: BlockFiles, meta: MetadataStore, inline_threshold: int) -> None:
        self.files = files
        self.meta = meta
        self.inline_threshold = inline_threshold
        # Created on first use: 256 trio.Locks cost milliseconds at every start (the
        # simulation starts thousands of nodes); a stripe's lock never goes away once made.
        self._locks: list[trio.Lock | None] = [None] * _STRIPES
        self.inline_corrupted = 0  # corrupt inline entries dropped (metrics)

    def lock(self, hash: bytes) -> trio.Lock:
        """The lock that serialises mutations of `hash`."""
        return self._stripe_lock(_stripe(hash))

    def _stripe_lock(self, s: int) -> trio.Lock:
        lk = self._locks[s]
        if lk is None:
            lk = self._locks[s] = trio.Lock()
        return lk

    @asynccontextmanager
    async def _locked(self, hashes: Iterable[bytes]) -> AsyncIterator[None]:
        # The locks of several blocks, taken in stripe order (no deadlock between two
        # callers). The body is shielded: a commit submitted under the locks is waited
        # for under them, even by a cancelled caller, or it could land after they are gone.
        async with AsyncExitStack() as stack:
            for s in sorted({_stripe(h) for h in hashes}):
                await stack.enter_async_context(self._stripe_lock(s))
            with trio.CancelScope(shield=True):
                yield

    # ------------------------------------------------------------ references

    async def apply_refs(self, refs: list[RefEntry]) -> int:
        """Merge reference versions (last writer wins) in one commit; how many changed.

        Live references are applied under their blocks' locks (see module docstring).
        """
        if not refs:
            return 0
        if defects.on("c11-ref-without-lock"):  # re-introduced defect: no lock
            return await self.meta.env.submit(lambda txn: self.meta.refs.tx_apply_many(txn, refs))
        async with self._locked(r.hash for r in refs if not r.deleted):
            return await self.meta.env.submit(lambda txn: self.meta.refs.tx_apply_many(txn, refs))

    async def apply_ref(self, ref: RefEntry) -> bool:
        """Merge one reference version; True if the stored version changed."""
        return await self.apply_refs([ref]) > 0

    async def recalculate_rc(self, hash: bytes) -> RcEntry:
        """Recompute the RC of one block from its references (under its lock)."""
        async with self._locked([hash]):
            return await self.meta.env.submit(lambda txn: self.meta.refs.tx_recalculate(txn, hash))

    async def recalculate_rc_many(self, hashes: list[bytes]) -> None:
        """Recompute the RC of many blocks in one commit (under their locks)."""
        def fn(txn: Txn) -> None:
            for h in hashes:
                self.meta.refs.tx_recalculate(txn, h)

        async with self._locked(hashes):
            await self.meta.env.submit(fn)

    # ------------------------------------------------------------ blocks

    def is_inline_size(self, size: int) -> bool:
        """True when a block of `size` bytes is stored inline."""
        return size <= self.inline_threshold

    async def write(self, blk: VerifiedBlock, *, ref: RefEntry | None = None) -> bool:
        """Store a block, and apply `ref` with it; True if newly stored.

        Inline blocks and their reference commit in one transaction. For a file
        block, the file is durable before the reference is committed: a reference
        never points at a block this node has not got.
        """
        hash = blk.hash
        if self.is_inline_size(len(blk)):
            # No lock needed: the block and its reference commit in one transaction,
            # and `delete_if_deletable` checks and deletes an inline block in one too.
            def txn_fn(txn: Txn) -> bool:
                stored = self._tx_put_inline(txn, blk)
                if ref is not None:
                    self.meta.refs.tx_apply(txn, ref, block_present=True)
                return stored

            return await self.meta.env.submit(txn_fn)
        async with self.lock(hash):
            # Shielded: once the file is written, its reference must be committed too, or a
            # cancelled put would leave a block that nothing references or queues for GC.
            with trio.CancelScope(shield=True):
                written = await self.files.awrite(blk)
                if ref is not None:
                    await self.meta.env.submit(
                        lambda txn: self.meta.refs.tx_apply(txn, ref, block_present=True))
            return written is not Written.PRESENT

    async def write_from_wire(self, data: bytes | memoryview, hash: bytes, *,
                              ref: RefEntry | None = None) -> bool:
        """`write` for the plain bytes of a file-size block from a peer: verified against
        `hash` and written in one worker-thread hop (`BlockFiles.averify_write`), under the
        block's lock; `HashMismatch` (nothing stored) when they do not hash to `hash`."""
        if self.is_inline_size(len(data)):
            raise ValueError("write_from_wire takes file-size blocks only")
        async with self.lock(hash):
            with trio.CancelScope(shield=True):  # as in `write`: file and reference together
                written = await self.files.averify_write(data, hash)
                if ref is not None:
                    await self.meta.env.submit(
                        lambda txn: self.meta.refs.tx_apply(txn, ref, block_present=True))
            return written is not Written.PRESENT

    def _tx_put_inline(self, txn: Txn, blk: VerifiedBlock) -> bool:
        # Store a small block unless an intact copy is there (in either form); a corrupt
        # copy is replaced.
        form, compressed = block.stored_form(blk)
        existing = self.meta.inline.tx_get(txn, blk.hash)
        if existing is not None:
            if defects.ACTIVE and defects.on("c10-reput-unverified"):
                return False  # re-introduced defect: any copy counts, unchecked
            raw, was_compressed = existing
            if was_compressed == compressed and block.same_copy(raw, form):
                return False
            if was_compressed or compressed:  # another form, or another compression of it
                try:
                    block.from_inline_bytes(raw, blk.hash, compressed=was_compressed,
                                            cap=self.files.cap)
                    return False
                except BlockCorrupted:
                    pass
        self.meta.inline.tx_put(txn, blk.hash, form, compressed=compressed, overwrite=True)
        return True

    async def write_inline_many(self, items: list[tuple[VerifiedBlock, RefEntry]]) -> int:
        """Store small blocks with their references in one commit; returns how many were new."""
        for blk, _ in items:
            if not self.is_inline_size(len(blk)):
                raise ValueError("write_inline_many takes inline-size blocks only")

        def txn_fn(txn: Txn) -> int:
            stored = 0
            for blk, ref in items:
                stored += self._tx_put_inline(txn, blk)
                self.meta.refs.tx_apply(txn, ref, block_present=True)
            return stored

        return await self.meta.env.submit(txn_fn)

    async def read(self, hash: bytes) -> VerifiedBlock:
        """The verified bytes of a block; `BlockNotFound`, or `BlockCorrupted` once the
        corrupt copy is out of service (file renamed `.corrupted`, inline entry dropped)."""
        found = self.meta.inline.get_form(hash)
        if found is not None:
            # Small: decompressed and hashed on the event loop (a thread hop would cost more).
            try:
                return block.from_inline_bytes(found[0], hash, compressed=found[1],
                                               cap=self.files.cap)
            except BlockCorrupted:
                repaired = await self.meta.env.submit(lambda txn: self._tx_drop_corrupt(txn, hash))
                if repaired is None:
                    self.inline_corrupted += 1
                    raise
                return repaired
        try:
            return await self.files.aread(hash)
        except BlockCorrupted:
            pass
        async with self.lock(hash):
            return await self.files.aread_or_quarantine(hash)

    def _tx_drop_corrupt(self, txn: Txn, hash: bytes) -> VerifiedBlock | None:
        # Drop an inline entry that is still corrupt; the block if a put repaired it meanwhile.
        found = self.meta.inline.tx_get(txn, hash)
        if found is None:
            return None
        try:
            return block.from_inline_bytes(found[0], hash, compressed=found[1], cap=self.files.cap)
        except BlockCorrupted:
            self.meta.inline.tx_delete(txn, hash)
            return None

    def exists(self, hash: bytes) -> bool:
        """True when the block is held here (content not checked; blocking: a stat)."""
        return self.meta.inline.exists(hash) or self.files.exists(hash)

    async def aexists(self, hash: bytes) -> bool:
        """`exists` for async code: the file check (a stat, which may touch the disk)
        runs in a worker thread; the inline check is an mmap read."""
        if self.meta.inline.exists(hash):
            return True
        return await self.files.aexists(hash)

    async def delete_if_deletable(self, hash: bytes) -> bool:
        """Delete the block if its RC is still deletable; True if something was deleted.

        The check and the deletion are atomic with respect to puts and live
        references of the same block: one LMDB transaction for an inline block,
        the block's lock for a file.
        """
        def inline_fn(txn: Txn) -> bool:
            if not self.meta.refs.tx_rc_get(txn, hash).is_deletable(self.meta.now_ms()):
                return False
            return self.meta.inline.tx_delete(txn, hash)

        removed = self.meta.inline.exists(hash) and await self.meta.env.submit(inline_fn)
        async with self.lock(hash):
            if not self.meta.rc_get(hash).is_deletable(self.meta.now_ms()):
                return removed
            if await self.files.adelete(hash):
                return True
            return removed

    async def relocate(self, hash: bytes) -> bool:
        """Move a block file to its primary data directory (under its lock); True when
        something moved (`BlockFiles.relocate`)."""
        async with self.lock(hash):
            return await self.files.arelocate(hash)

    def walk(self, start_after: bytes | None = None) -> Iterator[bytes]:
        """Every block hash held here, in hash order (blocking: run in a thread)."""
        last = None
        for h in heapq.merge(self.files.walk(start_after), self.meta.inline.iter_hashes(start_after)):
            if h != last:
                yield h
                last = h

    def startup(self) -> int:
        """At node start (blocking, before the metadata writer runs): check the data
        directories' markers against those recorded in use (`BlockFiles.init_dirs`;
        a directory that fails is out of service, and its blocks are queued for a
        fetch by the rebalance worker), record them, sweep stray ``.tmp`` files
        and count the block files; returns the count.

        Warns loudly when the metadata store is empty while block files are held:
        the metadata was probably lost (or the data dir belongs to another node).
        """
        recorded = self.meta.state_get(DATA_DIRS_KEY) or []
        report = self.files.init_dirs(recorded)
        if report.record != recorded:
            self.meta.state.set_now(DATA_DIRS_KEY, report.record)
        self.files.sweep_tmp()
        file_count = self.files.scan()
        if file_count and self.meta.is_empty():
            log.warning(
                "WARNING: the metadata store %s is empty, but the data dir %s holds %d block "
                "files. If the metadata was lost, these blocks are kept: references come back "
                "from the other nodes (anti-entropy), a block with no reference record gets a "
                "grace period of gc_delay, and none is deleted unless another write node "
                "confirms it is unreferenced. Check metadata_dir and data_dir in the config.",
                self.meta.path, ", ".join(d.path for d in self.files.dirs), file_count)
            # Each block file is checked by resync (no RC: the grace period starts, then
            # the usual GC check): without this, a block whose references were all
            # deleted before the loss (their tombstones come back, but queue nothing)
            # would stay forever.
            batch: list[bytes] = []
            for h in itertools.chain(self.files.walk(), [None]):
                if h is not None:
                    batch.append(h)
                if batch and (h is None or len(batch) >= 4096):
                    self.meta.env.write_now(
                        lambda txn, b=tuple(batch): [self.meta.queue.tx_put(txn, x, 0) for x in b])
                    batch = []
        return file_count

    def count(self) -> int:
        """How many blocks are held here: files (kept up to date) + inline blocks."""
        return self.files.count() + self.meta.inline.count()


def _stripe(hash: bytes) -> int:
    return hash[1] if len(hash) > 1 else 0


__all__ = ["LocalBlocks"]
