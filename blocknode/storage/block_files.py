"""Block files on the local disks: ``<dir>/hh/hh/<64 hex>`` or ``<64 hex>.zst``, in one
or several data directories.

Write protocol (durable, crash-safe): write ``<name>.tmp``, fsync it, rename it
over the final name, fsync the directory. A crash before the rename leaves only a
``.tmp``, which is invisible to readers and swept at start; after the directory
fsync the block survives a crash of the process or the machine.

A file holds a block's stored form (`blocknode.block.stored_form`): the plain
bytes, or — name ending in ``.zst`` — the block's zstd frame. Every read
checks it; corrupt bytes are never returned. A file is written with the xxh3-128
checksum of its bytes in an extended attribute (`blocknode.storage.checksum`;
set before the file's fsync), and a read whose bytes match it takes them without
hashing them again (`blocknode.block.from_checked`: only the decompression of a
``.zst``). No attribute (an older file, a file system without them: ENOTSUP once
turns them off for the directory) or a mismatch: the full verify
(`blocknode.block.from_stored`: decompress within a bound, then BLAKE2b of the
plaintext) decides, and a good file gets its attribute (re)written (a damaged
attribute never quarantines a good block). A `thorough` read (the scrubber's,
`checksum.thorough_reads`) always hashes and never writes an attribute. A corrupt file is
renamed ``<name>.corrupted`` (quarantine by rename, never delete: an operator
can still look at it) by `read_or_quarantine`, or by a `write` of the same
block, which then stores the good bytes: a copy already on disk counts as
stored only once it is checked (same form: size, then content; another form —
plain vs compressed, another level — decompressed and hashed). The caller
(`LocalBlocks`) serialises both under the block's lock, so a read that saw old
corrupt bytes cannot quarantine the copy a put has just repaired.

Several data directories (`DataDir`: path, capacity, read_only). Blocks are
placed by *partition* (the first `PARTITION_BYTES` bytes of the hash, 65,536
partitions): each partition's directories are ranked by weighted rendezvous
hashing of (directory path, partition) with the capacities as weights, so a
directory gets its share of the partitions and adding or removing one moves
only the partitions it gains or loses. A block is written to its partition's
first writable directory in service (the *primary*; the next one when that
disk is full). A read looks in the primary first, then in every other
directory in service (a block may sit in an old place after a change of the
directories), then in the primary once more (a `relocate` may have moved it
there meanwhile). `relocate` (the `repair rebalance` worker) moves a block to
its primary; a ``read_only`` directory is read, never written, and emptied by
it.

Each directory gets a marker file (`MARKER_NAME`) at its first use; the
directories in use are recorded in the metadata (`init_dirs`). A recorded
directory found without its marker at start (an unmounted disk: the mount
point is there, empty) is taken out of service instead of being written into;
one that no longer exists at all is made again (its blocks are lost). A
directory that fails later (I/O errors, its marker gone) is taken out of
service too; the node keeps running on the others. A full or read-only disk
is not failed: its writes fail (the next directory takes them), its blocks are
still read, and it takes writes again once it can. In
each case the directory is added to `refetch_pending` and `on_failure` is
called, so its blocks get fetched again from the other nodes. `dir_status`
reports, per directory: state, blocks, bytes, free space, errors.

Every method here is blocking. The `a*` methods run them through `run_sync`
(the node context's way to run blocking calls: a worker thread), one hop per
whole operation (a thread round trip costs ~110 µs here, so the check of a copy
already there, the write and both fsyncs share one hop).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import heapq
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from blocknode import block, defects, fastpath
from blocknode.block import VerifiedBlock
from blocknode.config import DataDir
from blocknode.context import RunSync, run_in_thread
from blocknode.errors import BlockCorrupted, BlockNotFound, StoreError
from blocknode.fs import OS_FS, FileSystem
from blocknode.storage import checksum

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
CORRUPTED_SUFFIX = ".corrupted"
ZST_SUFFIX = ".zst"
MARKER_NAME = "blocknode-marker"
MARKER_TEXT = b"blocknode data directory: do not remove (its absence means: not mounted)\n"
PARTITION_BYTES = 2
_HEX = frozenset("0123456789abcdef")
_FATAL_ERRNOS = frozenset(
    {errno.EIO, errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.ENOTCONN,
     getattr(errno, "EUCLEAN", 117), getattr(errno, "EREMOTEIO", 121)})
"""Errors that take a directory out of service: the disk or its file system failed.

Not EROFS (found by the simulation, issue 11): a read-only file system still reads,
so its directory stays in service like a full one — writes fail there (and go to
the next directory), its blocks are still served, and writes work again as soon as
it is writable again, with no restart. Out of service, its blocks were unreadable
until a restart although every byte was still there."""
_WRITE_REFUSED = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM})
"""Errors of a disk that refuses a write but is not failing: no marker check."""


def _is_hex(name: str, n: int) -> bool:
    return len(name) == n and _HEX.issuperset(name)


def partition_of(hash: bytes) -> int:
    """The placement partition of a block (its first `PARTITION_BYTES` bytes)."""
    return int.from_bytes(hash[:PARTITION_BYTES], "big")


class Written(enum.Enum):
    """What `BlockFiles.write` did."""

    PRESENT = "present"
    """An intact copy was there already: nothing written."""
    STORED = "stored"
    """The block was not there: written."""
    REPLACED = "replaced"
    """A corrupt copy was there: quarantined, and the block written."""


class Dir:
    """One data directory and its runtime state."""

    def __init__(self, spec: DataDir, index: int) -> None:
        self.path = os.path.abspath(spec.path)
        self.capacity = spec.capacity
        self.read_only = spec.read_only
        self.index = index
        self.weight = float(spec.capacity or 1)
        self.key = self.path.encode()
        self.failed: str | None = None
        """Why the directory is out of service; None while in service."""
        self.marked = False
        """Its marker file was there at start (`init_dirs`): checked again before a new
        fan-out directory is made in it (a disk unmounted while the node runs)."""
        self.errors = 0
        self.last_error: str | None = None
        self.corrupted = 0
        self.xattrs = True
        """Its file system takes the checksum attributes (False once it answered ENOTSUP)."""
        self.blocks = 0
        self.bytes = 0

    @property
    def in_service(self) -> bool:
        return self.failed is None

    def __repr__(self) -> str:
        return f"Dir({self.path!r})"


@dataclass(frozen=True)
class Copy:
    """A block file found on disk."""

    dir: Dir
    path: str
    compressed: bool


@dataclass
class InitReport:
    """What `BlockFiles.init_dirs` found."""

    record: list[str]
    """The directories to record as in use (for the next start's marker check)."""
    failed: list[str]
    """Directories taken out of service (marker missing, not there, unusable)."""
    lost: list[str]
    """Directories that were in use, were gone, and were made again empty."""


class BlockFiles:
    """The block files of one node, in one or several data directories.

    `fsync=False` (config `data_fsync = false`) skips the fsyncs: faster, but a
    machine crash may lose recently acknowledged blocks. `fs`: the file system
    (`blocknode.fs`; the simulation passes its disk). At most `threads`
    blocking operations run at once. `block_size` bounds how far a stored
    frame may decompress (`blocknode.block.stored_cap`).
    """

    def __init__(self, data_dirs: str | Sequence[DataDir | str], *, fsync: bool = True,
                 threads: int = 8, run_sync: RunSync = run_in_thread,
                 block_size: int | None = None, fs: FileSystem = OS_FS) -> None:
        specs = [data_dirs] if isinstance(data_dirs, str) else list(data_dirs)
        if not specs:
            raise ValueError("BlockFiles needs at least one data directory")
        self.dirs = [Dir(DataDir(s) if isinstance(s, str) else s, i) for i, s in enumerate(specs)]
        self.data_dir = self.dirs[0].path
        """The first data directory (the only one in the single-directory form)."""
        self.fsync = fsync
        self.fs = fs
        """The file system the files live on (`blocknode.fs`: the OS, or a simulated disk)."""
        self.limiter = trio.CapacityLimiter(threads)
        self._run_sync = run_sync
        self.cap = block.stored_cap(block_size)
        self._stats_lock = threading.Lock()
        self._rankings: dict[int, tuple[Dir, ...]] = {}
        self.refetch_pending: list[str] = []
        """Directories whose blocks must be fetched again from other nodes (drained by
        the rebalance worker, `blocknode.workers.rebalance`)."""
        self.on_failure: Callable[[str], None] | None = None
        """Called (from the thread that saw it) when a directory is taken out of service."""
        self.checksum_stats = {"fast": 0, "hashed": 0, "repaired": 0}
        """Block file reads taken on their checksum (``fast``), verified with BLAKE2b
        (``hashed``: no attribute, a mismatch, a thorough read), and attributes
        (re)written after a good BLAKE2b (``repaired``)."""

    # ---- directories, placement ----

    def in_service(self) -> list[Dir]:
        """The directories in service, in config order."""
        return [d for d in self.dirs if d.in_service]

    def ranking(self, hash: bytes) -> tuple[Dir, ...]:
        """The writable directories in service for `hash`, best first (weighted rendezvous
        of its partition; the first is its primary)."""
        p = partition_of(hash)
        r = self._rankings.get(p)
        if r is None or any(not d.in_service for d in r):
            r = self._rankings[p] = self._rank(p)
        return r

    def _rank(self, p: int) -> tuple[Dir, ...]:
        pb = p.to_bytes(PARTITION_BYTES, "big")
        scored = []
        for d in self.dirs:
            if d.read_only or not d.in_service:
                continue
            x = int.from_bytes(hashlib.blake2b(d.key + b"\0" + pb, digest_size=8).digest(), "big")
            u = (x + 0.5) / 2.0**64
            scored.append((-d.weight / math.log(u), d.index, d))
        scored.sort(key=lambda t: (-t[0], t[1]))
        return tuple(d for _, _, d in scored)

    def primary(self, hash: bytes) -> Dir | None:
        """Where `hash` belongs under the current directories (None: none writable)."""
        r = self.ranking(hash)
        return r[0] if r else None

    def _read_order(self, hash: bytes) -> list[Dir]:
        first = self.primary(hash)
        rest = [d for d in self.dirs if d.in_service and d is not first]
        return ([first] if first is not None else []) + rest

    def _name(self, d: Dir, hash: bytes, compressed: bool) -> str:
        path = fastpath.block_path(d.path, hash)
        return path + ZST_SUFFIX if compressed else path

    # ---- marker files, failures ----

    def init_dirs(self, recorded: Sequence[str]) -> InitReport:
        """At start (blocking): check every directory's marker file against the
        directories `recorded` as in use before; write the markers of new ones.

        A recorded directory without its marker is out of service (its disk is
        probably not mounted); a recorded one that is gone is made again; a new
        one gets its marker. Recorded directories no longer configured, and
        every failed or lost one, go to `refetch_pending`.
        """
        known = set(recorded)
        record: list[str] = []
        failed: list[str] = []
        lost: list[str] = []
        for d in self.dirs:
            marker = os.path.join(d.path, MARKER_NAME)
            if self.fs.isfile(marker):
                d.marked = True
                record.append(d.path)
                continue
            exists = self.fs.isdir(d.path)
            if d.path in known and exists:
                self._fail(d, f"its marker file {MARKER_NAME} is missing: the disk is probably not "
                              "mounted (if the directory was emptied on purpose, remove it or create "
                              "the marker file, and restart)", notify=False)
                record.append(d.path)
                failed.append(d.path)
                continue
            if not exists and d.read_only:
                self._fail(d, "the read-only directory does not exist", notify=False)
                failed.append(d.path)
                continue
            if d.path in known:
                log.warning("data directory %s was in use but no longer exists: made again, empty; "
                            "its blocks will be fetched from the other nodes", d.path)
                lost.append(d.path)
            try:
                made = not exists
                self.fs.makedirs(d.path, mode=0o700, exist_ok=True)  # private: blocks are user data
                if made and self.fsync:
                    self.fs.fsync_dir(os.path.dirname(d.path))
                self._write_marker(d.path)
                d.marked = True
            except OSError as exc:
                if d.read_only:
                    record.append(d.path)  # an old read-only disk: read it as it is
                    continue
                self._fail(d, f"cannot initialise it: {exc.strerror or exc}", notify=False)
                failed.append(d.path)
                continue
            record.append(d.path)
        configured = {d.path for d in self.dirs}
        gone = [p for p in recorded if p not in configured]
        for p in gone:
            log.warning("data directory %s is no longer configured: any block it held will be "
                        "fetched from the other nodes (keep it as read_only = true and run "
                        "`repair rebalance` to move its blocks instead)", p)
        self.refetch_pending.extend(failed + lost + gone)
        self._rankings.clear()
        if not any(not d.read_only and d.in_service for d in self.dirs):
            log.error("no writable data directory is in service: block files cannot be stored")
        return InitReport(record, failed, lost)

    def _write_marker(self, path: str) -> None:
        marker = os.path.join(path, MARKER_NAME)
        tmp = marker + TMP_SUFFIX
        fd = self.fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._write_all(fd, MARKER_TEXT)
            if self.fsync:
                self.fs.fsync(fd)
        finally:
            self.fs.close(fd)
        self.fs.rename(tmp, marker)
        if self.fsync:
            self.fs.fsync_dir(path)

    def _fail(self, d: Dir, reason: str, *, notify: bool = True) -> None:
        if d.failed is not None:
            return
        d.failed = reason
        self._rankings.clear()
        log.error("data directory %s is out of service: %s", d.path, reason)
        if notify:
            self.refetch_pending.append(d.path)
            if self.on_failure is not None:
                self.on_failure(d.path)

    def fail_dir(self, path: str, reason: str) -> None:
        """Take the directory at `path` out of service (an operator or a test)."""
        for d in self.dirs:
            if d.path == os.path.abspath(path):
                self._fail(d, reason)

    def _io_error(self, d: Dir, op: str, hash: bytes | None, exc: OSError) -> StoreError:
        """Count an I/O error of `d`; take `d` out of service when the disk failed."""
        with self._stats_lock:
            d.errors += 1
            d.last_error = f"{op}: {exc.strerror or exc}"
        if exc.errno in _FATAL_ERRNOS:
            self._fail(d, f"I/O error ({op}: {exc.strerror or exc})")
        elif exc.errno not in _WRITE_REFUSED and not self.fs.isfile(
                os.path.join(d.path, MARKER_NAME)):
            self._fail(d, f"its marker file {MARKER_NAME} is gone ({op}: {exc.strerror or exc})")
        return _store_error(op, hash, exc)

    # ---- stats ----

    def _count(self, d: Dir, blocks: int, nbytes: int) -> None:
        with self._stats_lock:
            d.blocks += blocks
            d.bytes += nbytes

    def count(self) -> int:
        """Block files held (the sum over the directories in service)."""
        return sum(d.blocks for d in self.dirs if d.in_service)

    def dir_status(self) -> list[dict[str, Any]]:
        """Per directory: path, state, capacity, read_only, blocks, bytes, free, errors."""
        out = []
        for d in self.dirs:
            free: int | None = None
            if d.in_service:
                try:
                    free = self.fs.free_bytes(d.path)
                except OSError:
                    pass
            out.append({
                "path": d.path, "state": "ok" if d.in_service else "failed",
                "failure": d.failed, "capacity": d.capacity, "read_only": d.read_only,
                "blocks": d.blocks, "bytes": d.bytes, "free": free, "errors": d.errors,
                "corrupted": d.corrupted, "last_error": d.last_error,
            })
        return out

    # ---- paths ----

    def copies(self, hash: bytes) -> list[Copy]:
        """Every file of `hash` in the directories in service (primary first)."""
        out = []
        for d in self._read_order(hash):
            for compressed in (False, True):
                path = self._name(d, hash, compressed)
                if self.fs.exists(path):
                    out.append(Copy(d, path, compressed))
        return out

    def path(self, hash: bytes) -> str:
        """The file of a block: the first copy found, else where it would be written."""
        found = self.copies(hash)
        if found:
            return found[0].path
        d = self.primary(hash) or self.dirs[0]
        return fastpath.block_path(d.path, hash)

    # ---- blocking operations ----

    def write(self, blk: VerifiedBlock) -> Written:
        """Store a block durably in its stored form (call under the block's lock).

        An intact copy already there (in any directory, in any form) makes it a
        no-op; a corrupt one is quarantined and the block written to its primary.
        """
        form, compressed = block.stored_form(blk)
        return self._write_form(blk.hash, form, compressed, len(blk))

    def _write_form(self, hash: bytes, form: bytes | memoryview, compressed: bool,
                    plain_len: int) -> Written:
        # `write`, for the stored form of a block already verified against `hash`.
        outcome = Written.STORED
        for c in self.copies(hash):
            if defects.ACTIVE and defects.on("c10-reput-unverified"):
                return Written.PRESENT  # re-introduced defect: any copy counts, unchecked
            intact = self._copy_is_intact(c, hash, form, compressed, plain_len)
            if intact is None:
                continue
            if intact:
                return Written.PRESENT
            log.warning("block %s: the copy in %s is corrupt; quarantined and replaced by the "
                        "verified bytes being put", fastpath.hash_to_hex(hash), c.dir.path)
            self._quarantine_copy(c, hash)
            outcome = Written.REPLACED
        self._write_new(hash, form, compressed)
        return outcome

    def _write_new(self, hash: bytes, form: bytes | memoryview, compressed: bool) -> Dir:
        # Into the primary; the next directory when a disk is full or fails.
        last: StoreError | None = None
        for d in self.ranking(hash):
            if not d.in_service:
                continue
            try:
                self._write_file(d, hash, form, compressed)
            except OSError as exc:
                last = self._io_error(d, "write", hash, exc)
                continue
            self._count(d, 1, len(form))
            return d
        if last is not None:
            raise last
        raise StoreError(f"cannot write block {fastpath.hash_to_hex(hash)}: no writable data "
                         "directory is in service (see `status`)")

    def _write_file(self, d: Dir, hash: bytes, form: bytes | memoryview, compressed: bool) -> None:
        final = self._name(d, hash, compressed)
        directory = os.path.dirname(final)
        self._ensure_dir(d, directory)
        tmp = final + TMP_SUFFIX
        fd = self.fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._write_all(fd, form)
            self._set_checksum(d, fd, form)  # before the fsync, which makes it durable too
            if self.fsync:
                self.fs.fsync(fd)
        finally:
            self.fs.close(fd)
        self.fs.rename(tmp, final)
        if self.fsync:
            self.fs.fsync_dir(directory)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.fs.write(fd, view)
            view = view[n:]

    def _copy_is_intact(self, c: Copy, hash: bytes, form: bytes | memoryview, compressed: bool,
                        plain_len: int) -> bool | None:
        # None: the copy is gone. The same form: size first (a file of the wrong size is not
        # read), then content. Another form (plain vs compressed, another level): verified.
        try:
            with self.fs.open_read(c.path) as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                if not c.compressed and size != plain_len:
                    return False  # a plain copy has the plaintext's size
                raw = None
                if c.compressed == compressed and size == len(form):
                    raw = f.read()
                    if block.same_copy(raw, form):
                        return True
                    if not compressed:
                        return False  # a plain block has one valid form
                if raw is None:
                    raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io_error(c.dir, "check", hash, exc) from exc
        try:
            block.from_stored(raw, hash, compressed=c.compressed, cap=self.cap)
        except BlockCorrupted:
            return False
        return True

    def _ensure_dir(self, d: Dir, directory: str) -> None:
        if self.fs.isdir(directory):
            return
        parent = os.path.dirname(directory)
        new_parent = not self.fs.isdir(parent)
        if new_parent and d.marked and not self.fs.isfile(os.path.join(d.path, MARKER_NAME)):
            # Never write into a mount point whose disk went away.
            raise OSError(errno.ENODEV, f"marker file {MARKER_NAME} missing: not mounted?", d.path)
        if new_parent:
            # makedirs gives `mode` to the last directory only: make each level private.
            self.fs.makedirs(d.path, mode=0o700, exist_ok=True)
            self.fs.makedirs(parent, mode=0o700, exist_ok=True)
        self.fs.makedirs(directory, mode=0o700, exist_ok=True)
        if self.fsync:
            # New directory entries must be durable too, or the block is unreachable.
            self.fs.fsync_dir(parent)
            if new_parent:
                self.fs.fsync_dir(d.path)

    # ---- checksums (blocknode.storage.checksum) ----

    def _xattrs_unsupported(self, d: Dir, exc: OSError) -> None:
        if d.xattrs:
            d.xattrs = False
            log.info("data directory %s: no extended attributes (%s); its block files are "
                     "read with a full BLAKE2b verify", d.path, exc.strerror or exc)

    def _set_checksum(self, d: Dir, target: int | str, form: Any) -> bool:
        # Best effort: a file without its attribute is still read correctly (BLAKE2b).
        if not d.xattrs:
            return False
        try:
            self.fs.setxattr(target, checksum.XATTR_NAME, checksum.digest(form))
        except OSError as exc:
            if exc.errno in checksum.UNSUPPORTED_ERRNOS:
                self._xattrs_unsupported(d, exc)
            else:
                log.debug("cannot set the checksum of %s: %s", target, exc)
            return False
        return True

    def _recorded_checksum(self, d: Dir, path: str) -> bytes | None:
        if not d.xattrs:
            return None
        try:
            return self.fs.getxattr(path, checksum.XATTR_NAME)
        except OSError as exc:  # ENODATA: none recorded (an older file); gone; ...
            if exc.errno in checksum.UNSUPPORTED_ERRNOS:
                self._xattrs_unsupported(d, exc)
            return None

    def _check_copy(self, c: Copy, hash: bytes, raw: bytes, thorough: bool) -> VerifiedBlock:
        # The bytes of a copy as a block: on their checksum, else by the full verify.
        d = c.dir
        recorded = None if thorough else self._recorded_checksum(d, c.path)
        if recorded is not None and checksum.matches(raw, recorded):
            with self._stats_lock:
                self.checksum_stats["fast"] += 1
            return block.from_checked(raw, hash, compressed=c.compressed, cap=self.cap)
        with self._stats_lock:
            self.checksum_stats["hashed"] += 1
        blk = block.from_stored(raw, hash, compressed=c.compressed, cap=self.cap)
        if not thorough and d.xattrs and not d.read_only:
            # A good file without its checksum (older) or with a damaged one: (re)write it.
            # Not fsync'd: a lost attribute costs one BLAKE2b more, nothing else.
            if self._set_checksum(d, c.path, raw):
                with self._stats_lock:
                    self.checksum_stats["repaired"] += 1
                if recorded is not None:
                    log.warning("block %s: the checksum attribute of %s did not match its "
                                "intact bytes; rewritten", fastpath.hash_to_hex(hash), c.path)
        return blk

    def _read_copy(self, c: Copy, hash: bytes, thorough: bool = False) -> VerifiedBlock | None:
        # None: gone (or its directory failed). BlockCorrupted when it does not verify.
        try:
            with self.fs.open_read(c.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            err = self._io_error(c.dir, "read", hash, exc)
            if c.dir.in_service:
                raise err from exc
            return None
        return self._check_copy(c, hash, raw, thorough)

    def _find_and_read(self, hash: bytes, *, quarantine: bool, thorough: bool) -> VerifiedBlock:
        order = self._read_order(hash)
        if len(order) > 1 and self.primary(hash) is not None:
            # Not found anywhere: a relocation may have moved it to its primary while this
            # read looked elsewhere; look there once more.
            order.append(order[0])
        corrupt = False
        for d in order:
            for compressed in (False, True):
                c = Copy(d, self._name(d, hash, compressed), compressed)
                try:
                    blk = self._read_copy(c, hash, thorough)
                except BlockCorrupted:
                    corrupt = True
                    if quarantine:
                        self._quarantine_copy(c, hash)
                    continue
                if blk is not None:
                    return blk
        if corrupt:
            raise BlockCorrupted(fastpath.hash_to_hex(hash))
        raise BlockNotFound(fastpath.hash_to_hex(hash))

    def read(self, hash: bytes, *, thorough: bool | None = None) -> VerifiedBlock:
        """Read and check a block; `BlockNotFound` or `BlockCorrupted` (no intact copy;
        the corrupt one is left as it is).

        `thorough`: verify with BLAKE2b whatever the checksum attribute says, and
        write no attribute (None: inside `checksum.thorough_reads`, as the
        scrubber reads)."""
        return self._find_and_read(hash, quarantine=False, thorough=self._thorough(thorough))

    def read_or_quarantine(self, hash: bytes, *, thorough: bool | None = None) -> VerifiedBlock:
        """`read`; every corrupt copy met is quarantined, and `BlockCorrupted` raised when
        no intact copy is left (call under the block's lock)."""
        return self._find_and_read(hash, quarantine=True, thorough=self._thorough(thorough))

    @staticmethod
    def _thorough(thorough: bool | None) -> bool:
        return checksum.is_thorough() if thorough is None else thorough

    def exists(self, hash: bytes) -> bool:
        """True when a block file is present (its content is not checked)."""
        for d in self._read_order(hash):
            path = fastpath.block_path(d.path, hash)
            if self.fs.exists(path) or self.fs.exists(path + ZST_SUFFIX):
                return True
        return False

    def quarantine(self, hash: bytes) -> bool:
        """Rename every file of a block to ``.corrupted``; False when none was there."""
        done = False
        for c in self.copies(hash):
            done = self._quarantine_copy(c, hash) or done
        return done

    def _quarantine_copy(self, c: Copy, hash: bytes) -> bool:
        done = self._remove(c, hash, "quarantine",
                            lambda: self.fs.replace(c.path, c.path + CORRUPTED_SUFFIX))
        if done:
            with self._stats_lock:
                c.dir.corrupted += 1
        return done

    def delete(self, hash: bytes) -> bool:
        """Remove every file of a block; False when none was there."""
        done = False
        for c in self.copies(hash):
            done = self._remove(c, hash, "delete", lambda c=c: self.fs.unlink(c.path)) or done
        return done

    def _remove(self, c: Copy, hash: bytes, op: str, action: Callable[[], None]) -> bool:
        # Takes the block's name out of its directory, durably (the directory is fsync'd).
        try:
            size = self.fs.getsize(c.path)
            action()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._io_error(c.dir, op, hash, exc) from exc
        self._count(c.dir, -1, -size)
        if self.fsync:
            self.fs.fsync_dir(os.path.dirname(c.path))
        return True

    def relocate(self, hash: bytes) -> bool:
        """Move a block to its primary directory (call under the block's lock); True when
        a file was moved or a misplaced duplicate removed.

        The copy is written (verified, in its stored form) before the misplaced one
        is removed, so a read always finds one; a corrupt copy is quarantined.
        """
        target = self.primary(hash)
        if target is None:
            return False
        found = self.copies(hash)
        misplaced = [c for c in found if c.dir is not target]
        if not misplaced:
            return False
        placed = False
        for c in found:
            if c.dir is target:
                try:
                    placed = self._read_copy(c, hash) is not None or placed
                except BlockCorrupted:
                    self._quarantine_copy(c, hash)
        keep: list[Copy] = []
        for c in misplaced:
            if placed:
                keep.append(c)
                continue
            try:
                blk = self._read_copy(c, hash)
            except BlockCorrupted:
                self._quarantine_copy(c, hash)
                continue
            if blk is None:
                continue
            form = blk.zst if c.compressed and blk.zst is not None else bytes(blk)
            try:
                self._write_file(target, hash, form, c.compressed)
            except OSError as exc:
                raise self._io_error(target, "write", hash, exc) from exc
            self._count(target, 1, len(form))
            placed = True
            keep.append(c)
        if not placed:
            return False
        for c in keep:
            try:
                self._remove(c, hash, "delete", lambda c=c: self.fs.unlink(c.path))
            except StoreError as exc:
                # e.g. a read-only file system: the copy stays, reads still find one
                log.warning("rebalance: cannot remove the old copy %s: %s", c.path, exc)
        return True

    def walk(self, start_after: bytes | None = None) -> Iterator[bytes]:
        """Yield every block hash on disk (the directories in service), in hash order.

        Only ``hh/hh/<64 hex>[.zst]`` entries whose prefixes match count; ``.tmp``,
        ``.corrupted`` and anything else are ignored. With `start_after`, hashes
        <= it are skipped (scrub resumes from its position this way).
        """
        last = None
        for h in heapq.merge(*(self.walk_dir(d, start_after) for d in self.in_service())):
            if h != last:
                yield h
                last = h

    def walk_dir(self, d: Dir, start_after: bytes | None = None) -> Iterator[bytes]:
        """Every block hash in one directory, in hash order (see `walk`)."""
        for h, _ in self._walk_entries(d, start_after):
            yield h

    def _walk_entries(self, d: Dir, start_after: bytes | None,
                      sizes: bool = False) -> Iterator[tuple[bytes, int]]:
        first = start_after.hex() if start_after is not None else None
        for d1 in self._sorted_hex_dirs(d, d.path):
            if first is not None and d1 < first[0:2]:
                continue
            p1 = os.path.join(d.path, d1)
            for d2 in self._sorted_hex_dirs(d, p1):
                if first is not None and d1 + d2 < first[0:4]:
                    continue
                p2 = os.path.join(p1, d2)
                try:
                    with self.fs.scandir(p2) as it:
                        entries = sorted((e.name, e) for e in it)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._io_error(d, "list", None, exc)
                    continue
                prev = None
                for name, entry in entries:
                    hx = name[:-len(ZST_SUFFIX)] if name.endswith(ZST_SUFFIX) else name
                    if not _is_hex(hx, 64) or hx[0:4] != d1 + d2:
                        continue
                    if first is not None and hx <= first:
                        continue
                    size = 0
                    if sizes:
                        try:
                            size = entry.stat().st_size
                        except OSError:
                            continue
                    if hx == prev:  # both forms of one block: one block
                        continue
                    prev = hx
                    yield bytes.fromhex(hx), size

    def _sorted_hex_dirs(self, d: Dir, path: str) -> list[str]:
        try:
            with self.fs.scandir(path) as it:
                return sorted(e.name for e in it if _is_hex(e.name, 2) and e.is_dir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._io_error(d, "list", None, exc)
            return []

    def sweep_tmp(self) -> int:
        """Delete stale ``.tmp`` files left by a crash mid-write; returns how many."""
        removed = 0
        for d in self.in_service():
            for d1 in self._sorted_hex_dirs(d, d.path):
                p1 = os.path.join(d.path, d1)
                for d2 in self._sorted_hex_dirs(d, p1):
                    p2 = os.path.join(p1, d2)
                    try:
                        names = self.fs.listdir(p2)
                    except OSError:
                        continue
                    for name in names:
                        if name.endswith(TMP_SUFFIX):
                            try:
                                self.fs.unlink(os.path.join(p2, name))
                                removed += 1
                            except FileNotFoundError:
                                pass
                            except OSError as exc:
                                self._io_error(d, "sweep", None, exc)
        return removed

    def scan(self) -> int:
        """Count the blocks and bytes of every directory in service (blocking; at start);
        returns the total block count."""
        for d in self.in_service():
            n = size = 0
            for _, s in self._walk_entries(d, None, sizes=True):
                n += 1
                size += s
            with self._stats_lock:
                d.blocks, d.bytes = n, size
        return self.count()

    # ---- async wrappers (run_sync: worker threads) ----

    async def awrite(self, blk: VerifiedBlock) -> Written:
        """`write` off the event loop."""
        return await self._run_sync(self.write, blk, limiter=self.limiter)

    async def averify_write(self, data: bytes | memoryview, hash: bytes) -> Written:
        """The plain bytes of a block from the wire (any buffer, not copied): checked
        against `hash`, then written like `write`, in one worker-thread hop (call under
        the block's lock); `HashMismatch` before anything is written."""
        def work() -> Written:
            block.check_hash(data, hash)
            return self._write_form(hash, data, False, len(data))

        return await self._run_sync(work, limiter=self.limiter)

    async def aread(self, hash: bytes, *, thorough: bool | None = None) -> VerifiedBlock:
        """`read` off the event loop (`thorough` None: decided here, by
        `checksum.thorough_reads` around the caller)."""
        t = self._thorough(thorough)
        return await self._run_sync(lambda: self.read(hash, thorough=t), limiter=self.limiter)

    async def aexists(self, hash: bytes) -> bool:
        """`exists` off the event loop (a stat may touch the disk)."""
        return await self._run_sync(self.exists, hash, limiter=self.limiter)

    async def adelete(self, hash: bytes) -> bool:
        """`delete` off the event loop."""
        return await self._run_sync(self.delete, hash, limiter=self.limiter)

    async def aread_or_quarantine(self, hash: bytes, *,
                                  thorough: bool | None = None) -> VerifiedBlock:
        """`read_or_quarantine` off the event loop (`thorough`: as in `aread`)."""
        t = self._thorough(thorough)
        return await self._run_sync(lambda: self.read_or_quarantine(hash, thorough=t),
                                    limiter=self.limiter)

    async def arelocate(self, hash: bytes) -> bool:
        """`relocate` off the event loop."""
        return await self._run_sync(self.relocate, hash, limiter=self.limiter)


def _store_error(op: str, hash: bytes | None, exc: OSError) -> StoreError:
    what = f"block {fastpath.hash_to_hex(hash)}" if hash is not None else "blocks"
    if exc.errno == errno.ENOSPC:
        return StoreError(f"cannot {op} {what}: the disk is full ({exc.filename})")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(f"cannot {op} {what}: no permission or read-only disk ({exc})")
    return StoreError(f"cannot {op} {what}: {exc}")
