"""Block files on the local disk: ``data_dir/hh/hh/<64 hex>``.

Write protocol (durable, crash-safe): write ``<name>.tmp``, fsync it, rename it
over the final name, fsync the directory. A crash before the rename leaves only a
``.tmp``, which is invisible to readers and swept at start; after the directory
fsync the block survives a crash of the process or the machine.

A file holds a block's file form (`blocknode.block.file_bytes`) and every read
verifies it (`blocknode.block.from_file_bytes`); corrupt bytes are never
returned. A corrupt file is renamed ``<name>.corrupted`` (quarantine by rename,
never delete: an operator can still look at it) by `read_or_quarantine`, or by
a `write` of the same block, which then stores the good bytes: a copy already
on disk counts as stored only once it is checked (size, then content). The
caller (`LocalBlocks`) serialises both under the block's lock, so a read that
saw old corrupt bytes cannot quarantine the copy a put has just repaired.

Every method here is blocking. The `a*` methods run them through `run_sync`
(the node context's way to run blocking calls: a worker thread), one hop per
whole operation (a thread round trip costs ~110 µs here, so the check of a copy
already there, the write and both fsyncs share one hop).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from collections.abc import Callable, Iterator

import trio

from blocknode import block, fastpath
from blocknode.block import VerifiedBlock
from blocknode.context import RunSync, run_in_thread
from blocknode.errors import BlockCorrupted, BlockNotFound, StoreError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
CORRUPTED_SUFFIX = ".corrupted"
_HEX = frozenset("0123456789abcdef")


def _is_hex(name: str, n: int) -> bool:
    return len(name) == n and _HEX.issuperset(name)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Written(enum.Enum):
    """What `BlockFiles.write` did."""

    PRESENT = "present"
    """An intact copy was there already: nothing written."""
    STORED = "stored"
    """The block was not there: written."""
    REPLACED = "replaced"
    """A corrupt copy was there: quarantined, and the block written."""


class BlockFiles:
    """The block files of one node.

    `fsync=False` (config `data_fsync = false`) skips the fsyncs: faster, but a
    machine crash may lose recently acknowledged blocks. At most `threads`
    blocking operations run at once.
    """

    def __init__(self, data_dir: str, *, fsync: bool = True, threads: int = 8,
                 run_sync: RunSync = run_in_thread) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.fsync = fsync
        self.limiter = trio.CapacityLimiter(threads)
        self._run_sync = run_sync
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)  # private: blocks are user data

    # ---- paths ----

    def path(self, hash: bytes) -> str:
        """The final file path of a block."""
        return fastpath.block_path(self.data_dir, hash)

    # ---- blocking operations ----

    def write(self, blk: VerifiedBlock) -> Written:
        """Store a block durably (call under the block's lock).

        An intact copy already there makes it a no-op; a corrupt one is
        quarantined and replaced.
        """
        hash = blk.hash
        data = block.file_bytes(blk)
        final = self.path(hash)
        outcome = Written.STORED
        intact = self._copy_is_intact(final, hash, data)
        if intact is not None:
            if intact:
                return Written.PRESENT
            log.warning("block %s: the copy here is corrupt; quarantined and replaced by the "
                        "verified bytes being put", fastpath.hash_to_hex(hash))
            self.quarantine(hash)
            outcome = Written.REPLACED
        directory = os.path.dirname(final)
        try:
            self._ensure_dir(directory)
            tmp = final + TMP_SUFFIX
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            if self.fsync:
                _fsync_dir(directory)
        except OSError as exc:
            raise _store_error("write", hash, exc) from exc
        return outcome

    def _copy_is_intact(self, final: str, hash: bytes, form: bytes) -> bool | None:
        # None: no copy here. Size first (a file of the wrong size is not read), then content.
        try:
            with open(final, "rb") as f:
                if os.fstat(f.fileno()).st_size != len(form):
                    return False
                return block.same_copy(f.read(), form)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error("check", hash, exc) from exc

    def _ensure_dir(self, directory: str) -> None:
        if os.path.isdir(directory):
            return
        parent = os.path.dirname(directory)
        new_parent = not os.path.isdir(parent)
        if new_parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if self.fsync:
            # New directory entries must be durable too, or the block is unreachable.
            _fsync_dir(parent)
            if new_parent:
                _fsync_dir(self.data_dir)

    def read(self, hash: bytes) -> VerifiedBlock:
        """Read and verify a block; `BlockNotFound` or `BlockCorrupted` (the file is left as it is)."""
        path = self.path(hash)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlockNotFound(fastpath.hash_to_hex(hash)) from None
        except OSError as exc:
            raise _store_error("read", hash, exc) from exc
        return block.from_file_bytes(data, hash)

    def read_or_quarantine(self, hash: bytes) -> VerifiedBlock:
        """`read`; a corrupt file is quarantined before `BlockCorrupted` is raised
        (call under the block's lock)."""
        try:
            return self.read(hash)
        except BlockCorrupted:
            self.quarantine(hash)
            raise

    def exists(self, hash: bytes) -> bool:
        """True when the block file is present (its content is not checked)."""
        return os.path.exists(self.path(hash))

    def quarantine(self, hash: bytes) -> bool:
        """Rename a block to ``.corrupted``; False when it was not there."""
        path = self.path(hash)
        return self._remove_entry("quarantine", hash, lambda: os.replace(path, path + CORRUPTED_SUFFIX))

    def delete(self, hash: bytes) -> bool:
        """Remove a block file; False when it was not there."""
        path = self.path(hash)
        return self._remove_entry("delete", hash, lambda: os.unlink(path))

    def _remove_entry(self, op: str, hash: bytes, action: Callable[[], None]) -> bool:
        # Takes the block's name out of its directory, durably (the directory is fsync'd).
        try:
            action()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _store_error(op, hash, exc) from exc
        if self.fsync:
            _fsync_dir(os.path.dirname(self.path(hash)))
        return True

    def walk(self, start_after: bytes | None = None) -> Iterator[bytes]:
        """Yield every block hash on disk, in hash order.

        Only ``hh/hh/<64 hex>`` entries whose prefixes match count; ``.tmp``,
        ``.corrupted`` and anything else are ignored. With `start_after`, hashes
        <= it are skipped (scrub resumes from its position this way).
        """
        first = start_after.hex() if start_after is not None else None
        for d1 in _sorted_hex_dirs(self.data_dir):
            if first is not None and d1 < first[0:2]:
                continue
            p1 = os.path.join(self.data_dir, d1)
            for d2 in _sorted_hex_dirs(p1):
                if first is not None and d1 + d2 < first[0:4]:
                    continue
                p2 = os.path.join(p1, d2)
                try:
                    names = sorted(os.listdir(p2))
                except OSError:
                    continue
                for name in names:
                    if not _is_hex(name, 64) or name[0:4] != d1 + d2:
                        continue
                    if first is not None and name <= first:
                        continue
                    yield bytes.fromhex(name)

    def sweep_tmp(self) -> int:
        """Delete stale ``.tmp`` files left by a crash mid-write; returns how many."""
        removed = 0
        for d1 in _sorted_hex_dirs(self.data_dir):
            p1 = os.path.join(self.data_dir, d1)
            for d2 in _sorted_hex_dirs(p1):
                p2 = os.path.join(p1, d2)
                for name in os.listdir(p2):
                    if name.endswith(TMP_SUFFIX):
                        try:
                            os.unlink(os.path.join(p2, name))
                            removed += 1
                        except FileNotFoundError:
                            pass
        return removed

    # ---- async wrappers (run_sync: worker threads) ----

    async def awrite(self, blk: VerifiedBlock) -> Written:
        """`write` off the event loop."""
        return await self._run_sync(self.write, blk, limiter=self.limiter)

    async def aread(self, hash: bytes) -> VerifiedBlock:
        """`read` off the event loop."""
        return await self._run_sync(self.read, hash, limiter=self.limiter)

    async def aexists(self, hash: bytes) -> bool:
        """`exists` off the event loop (a stat may touch the disk)."""
        return await self._run_sync(self.exists, hash, limiter=self.limiter)

    async def adelete(self, hash: bytes) -> bool:
        """`delete` off the event loop."""
        return await self._run_sync(self.delete, hash, limiter=self.limiter)

    async def aread_or_quarantine(self, hash: bytes) -> VerifiedBlock:
        """`read_or_quarantine` off the event loop."""
        return await self._run_sync(self.read_or_quarantine, hash, limiter=self.limiter)


def _sorted_hex_dirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if _is_hex(e.name, 2) and e.is_dir())
    except FileNotFoundError:
        return []


def _store_error(op: str, hash: bytes, exc: OSError) -> StoreError:
    h = fastpath.hash_to_hex(hash)
    if exc.errno == errno.ENOSPC:
        return StoreError(f"cannot {op} block {h}: the disk is full ({exc.filename})")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(f"cannot {op} block {h}: no permission or read-only disk ({exc})")
    return StoreError(f"cannot {op} block {h}: {exc}")
