"""Block files on the local disk: ``data_dir/hh/hh/<64 hex>``.

Write protocol (durable, crash-safe): write ``<name>.tmp``, fsync it, rename it
over the final name, fsync the directory. A crash before the rename leaves only a
``.tmp``, which is invisible to readers and swept at start; after the directory
fsync the block survives a crash of the process or the machine.

A file holds a block's file form (`blocknode.block.file_bytes`) and every read
verifies it (`blocknode.block.from_file_bytes`).
A block whose bytes no longer match its hash is renamed ``<name>.corrupted``
(quarantine by rename, never delete: an operator can still look at it) and
reported as `BlockCorrupted`; it is never returned.

Every method here is blocking. The `a*` methods run them through `run_sync`
(the node context's way to run blocking calls: a worker thread), one hop per
whole operation (a thread round trip costs ~110 µs here, so the hash, write and
both fsyncs share one hop).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import trio

from blocknode import block, fastpath
from blocknode.block import VerifiedBlock
from blocknode.context import RunSync, run_in_thread
from blocknode.errors import BlockCorrupted, BlockNotFound, StoreError

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
        os.makedirs(self.data_dir, exist_ok=True)

    # ---- paths ----

    def path(self, hash: bytes) -> str:
        """The final file path of a block."""
        return fastpath.block_path(self.data_dir, hash)

    # ---- blocking operations ----

    def write(self, blk: VerifiedBlock) -> bool:
        """Store a block durably. Returns False when it was already present (a no-op)."""
        hash = blk.hash
        data = block.file_bytes(blk)
        final = self.path(hash)
        if os.path.exists(final):
            return False
        directory = os.path.dirname(final)
        try:
            self._ensure_dir(directory)
            tmp = final + TMP_SUFFIX
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
        return True

    def _ensure_dir(self, directory: str) -> None:
        if os.path.isdir(directory):
            return
        parent = os.path.dirname(directory)
        new_parent = not os.path.isdir(parent)
        os.makedirs(directory, exist_ok=True)
        if self.fsync:
            # New directory entries must be durable too, or the block is unreachable.
            _fsync_dir(parent)
            if new_parent:
                _fsync_dir(self.data_dir)

    def read(self, hash: bytes) -> VerifiedBlock:
        """Read and verify a block; `BlockNotFound`, or `BlockCorrupted` after quarantine."""
        path = self.path(hash)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlockNotFound(fastpath.hash_to_hex(hash)) from None
        except OSError as exc:
            raise _store_error("read", hash, exc) from exc
        try:
            return block.from_file_bytes(data, hash)
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

    async def awrite(self, blk: VerifiedBlock) -> bool:
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

    async def aquarantine(self, hash: bytes) -> bool:
        """`quarantine` off the event loop."""
        return await self._run_sync(self.quarantine, hash, limiter=self.limiter)


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
