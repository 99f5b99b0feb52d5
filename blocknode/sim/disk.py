"""`SimDisk`: an in-memory disk behind the `blocknode.fs.FileSystem` seam, honest about
crashes, with write faults.

Each file has its *current* bytes (what a read sees: the page cache) and its
*synced* bytes (what its last ``fsync`` made durable); each directory has its
current entries and its synced entries (as of its last directory ``fsync``). A
creation, rename or unlink changes only the current entries; a file's
``fsync`` does not make its name durable, only the directory's does (POSIX; the
ext4 and XFS journals are kinder, we are not).

`crash` is a machine crash (power loss): for every item not synced the seeded RNG
chooses what the disk kept —

- a directory entry (created, renamed, unlinked since the directory's last
  fsync): kept as it is now, or reverted to its synced state (a rename is two
  entries, the old name and the new one, each chosen on its own: both or
  neither may survive, as after a crash of a non-atomic rename);
- a file's data written since its last fsync: kept, dropped (back to the
  synced bytes: empty for a file never fsynced), or torn (cut at a random
  length).

What was synced is always there (unless a directory above it reverted: a block
file whose fan-out directory was never made durable vanishes with it).
Everything afterwards is synced state again.

Faults (`set_fault`): ``ENOSPC`` fails the calls that allocate (create, write,
mkdir); ``EIO`` and ``EROFS`` fail every call that changes the disk (open for
writing, write, fsync, rename, unlink, mkdir, directory fsync). Reads keep
working under all three. `free_bytes` is 0 while the disk is full.

A power cut in the middle of the node's work (`arm_power_cut`): after a seeded
number of further changes the disk *stops* — that change and every later one
raises EIO and changes nothing — and `on_cut` is called (the simulation cancels
the node there and then, and `crash` follows). What the node did before the cut
is on the disk as a crash leaves it; nothing after it reached the disk.

Extended attributes (`setxattr`, `getxattr`: the block files' checksums) live
with the file: a file's ``fsync`` makes them durable with its data, and a crash
drops the ones set since (always: the worst case for a reader of them, and no
draw from the crash's RNG, so every seed keeps the schedule it had before
attributes existed). A disk made
with ``xattrs=False`` answers ENOTSUP, like a file system without user
attributes. Setting one fails under a fault or after a power cut like any change,
but is not counted toward an armed cut (see `setxattr`).

`remove_tree` (a lost disk) and `flip_bit` (media corruption, the attributes
left as they are) change the synced state directly. Paths outside `root` raise ``ENOENT``. Not thread-safe: the
simulation runs blocking calls inline on one thread.
"""

from __future__ import annotations

import errno
import io
import os
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = ["CrashReport", "SimDisk"]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


class _File:
    __slots__ = ("data", "synced", "synced_xattrs", "xattrs")

    def __init__(self) -> None:
        self.data = bytearray()
        self.synced = b""
        self.xattrs: dict[str, bytes] = {}
        self.synced_xattrs: dict[str, bytes] = {}


class _Dir:
    __slots__ = ("entries", "synced")

    def __init__(self) -> None:
        self.entries: dict[str, _File | _Dir] = {}
        self.synced: dict[str, _File | _Dir] = {}


@dataclass
class _Stat:
    st_size: int


@dataclass
class _Entry:
    """What `SimDisk.scandir` yields (the part of `os.DirEntry` the block files use)."""

    name: str
    _node: _File | _Dir

    def is_dir(self) -> bool:
        return isinstance(self._node, _Dir)

    def is_file(self) -> bool:
        return isinstance(self._node, _File)

    def stat(self) -> _Stat:
        return _Stat(len(self._node.data) if isinstance(self._node, _File) else 0)


@dataclass
class CrashReport:
    """What one `SimDisk.crash` did to the items that were not synced."""

    entries_kept: int = 0
    entries_reverted: int = 0
    data_kept: int = 0
    data_dropped: int = 0
    data_torn: int = 0
    xattrs_dropped: int = 0
    """Files whose attributes set since their last fsync were reverted (not counted in
    `lost`: an attribute is advisory, the data is what counts)."""

    @property
    def lost(self) -> int:
        """Un-synced items the crash undid (reverted entries, dropped or torn data)."""
        return self.entries_reverted + self.data_dropped + self.data_torn


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class SimDisk:
    """An in-memory file system mounted at `root` (an absolute path; see module docstring).

    `capacity`: the bytes `free_bytes` reports as the total. `xattrs=False`: a file
    system without extended attributes (`setxattr`/`getxattr` raise ENOTSUP).
    """

    def __init__(self, root: str, *, capacity: int = 1 << 30, xattrs: bool = True) -> None:
        if not os.path.isabs(root):
            raise ValueError(f"SimDisk root must be an absolute path, not {root!r}")
        self.root = os.path.normpath(root)
        self.capacity = capacity
        self.xattrs = xattrs
        """Whether the file system supports extended attributes."""
        self.fault: int | None = None
        """The errno the faulty calls raise (ENOSPC, EIO, EROFS), or None: a healthy disk."""
        self._top = _Dir()
        self._fds: dict[int, list[Any]] = {}  # fd -> [file, position]
        self._next_fd = 1000
        self._cut_in: int | None = None
        self._on_cut: Callable[[], None] | None = None
        self.cut = False
        """The power was cut: every change raises EIO until `crash`."""

    # ---------------------------------------------------------------- faults, crash
    def set_fault(self, code: int | None) -> None:
        """Make the disk fail with `code` (errno.ENOSPC, EIO or EROFS); None heals it."""
        if code not in (None, errno.ENOSPC, errno.EIO, errno.EROFS):
            raise ValueError(f"SimDisk fault must be ENOSPC, EIO or EROFS, not {code!r}")
        self.fault = code

    def arm_power_cut(self, after: int, on_cut: Callable[[], None]) -> None:
        """Cut the power at the `after`-th change from now (1: the next one); `on_cut` is
        called then, once."""
        if after < 1:
            raise ValueError(f"arm_power_cut: after must be >= 1, not {after}")
        self._cut_in, self._on_cut = after, on_cut

    def disarm(self) -> None:
        """Forget an armed power cut that has not happened."""
        self._cut_in = self._on_cut = None

    def _check(self, path: str, *, allocates: bool = False) -> None:
        if self._cut_in is not None:
            self._cut_in -= 1
            if self._cut_in == 0:
                on_cut, self._cut_in, self._on_cut = self._on_cut, None, None
                self.cut = True
                if on_cut is not None:
                    on_cut()
        if self.cut:
            raise _err(errno.EIO, path)
        f = self.fault
        if f is not None and (f != errno.ENOSPC or allocates):
            raise _err(f, path)

    def crash(self, rng: random.Random) -> CrashReport:
        """A machine crash: every item not synced is kept or lost by `rng` (see module
        docstring); afterwards the whole disk is synced state. Open descriptors are gone."""
        rep = CrashReport()
        self._fds.clear()
        self.cut = False
        self.disarm()
        files: list[_File] = []
        stack = [self._top]
        while stack:
            d = stack.pop()
            for name in sorted(set(d.entries) | set(d.synced)):
                cur, dur = d.entries.get(name), d.synced.get(name)
                if cur is dur:
                    continue
                if rng.random() < 0.5:
                    rep.entries_kept += 1
                    continue
                rep.entries_reverted += 1
                if dur is None:
                    del d.entries[name]
                else:
                    d.entries[name] = dur
            d.synced = dict(d.entries)
            for name in sorted(d.entries, reverse=True):
                child = d.entries[name]
                (stack if isinstance(child, _Dir) else files).append(child)  # type: ignore[arg-type]
        seen: set[int] = set()
        for f in files:
            if id(f) in seen:
                continue
            seen.add(id(f))
            if f.xattrs != f.synced_xattrs:  # always lost: no draw from `rng` (see docstring)
                rep.xattrs_dropped += 1
                f.xattrs = dict(f.synced_xattrs)
            if f.data == f.synced:
                continue
            x = rng.random()
            if x < 1 / 3:
                rep.data_kept += 1
            elif x < 2 / 3:
                rep.data_dropped += 1
                f.data = bytearray(f.synced)
            else:
                rep.data_torn += 1
                del f.data[rng.randrange(len(f.data)) if f.data else 0:]
            f.synced = bytes(f.data)
        return rep

    def unsynced(self) -> int:
        """How many items (directory entries, file contents) a crash now could lose."""
        n = 0
        stack = [self._top]
        while stack:
            d = stack.pop()
            n += sum(1 for k in set(d.entries) | set(d.synced) if d.entries.get(k) is not d.synced.get(k))
            for child in d.entries.values():
                if isinstance(child, _Dir):
                    stack.append(child)
                elif child.data != child.synced or child.xattrs != child.synced_xattrs:
                    n += 1
        return n

    def remove_tree(self, path: str) -> bool:
        """Lose `path` and everything under it, durably (a lost disk); False if absent."""
        parent, name = self._parent(path)
        if parent is None or name not in parent.entries:
            return False
        del parent.entries[name]
        parent.synced.pop(name, None)
        return True

    def files(self, path: str) -> list[str]:
        """Every file under directory `path`, sorted (empty if it is not there)."""
        d = self._node(path)
        out: list[str] = []
        if not isinstance(d, _Dir):
            return out
        stack = [(self._norm(path), d)]
        while stack:
            p, d = stack.pop()
            for name, child in d.entries.items():
                cp = f"{p}/{name}"
                if isinstance(child, _Dir):
                    stack.append((cp, child))
                else:
                    out.append(cp)
        return sorted(out)

    def flip_bit(self, path: str, pos: int, bit: int) -> None:
        """Flip one bit of a file, in its current and its synced bytes (media corruption)."""
        f = self._node(path)
        if not isinstance(f, _File):
            raise _err(errno.ENOENT, path)
        f.data[pos] ^= 1 << bit
        if pos < len(f.synced):
            s = bytearray(f.synced)
            s[pos] ^= 1 << bit
            f.synced = bytes(s)

    # ---------------------------------------------------------------- paths
    def _norm(self, path: str) -> str:
        return os.path.normpath(os.fspath(path))

    def _parts(self, path: str) -> list[str] | None:
        p = self._norm(path)
        if p == self.root:
            return []
        if not p.startswith(self.root + "/"):
            return None
        return p[len(self.root) + 1:].split("/")

    def _node(self, path: str) -> _File | _Dir | None:
        parts = self._parts(path)
        if parts is None:
            return None
        node: _File | _Dir = self._top
        for name in parts:
            if not isinstance(node, _Dir):
                return None
            nxt = node.entries.get(name)
            if nxt is None:
                return None
            node = nxt
        return node

    def _parent(self, path: str) -> tuple[_Dir | None, str]:
        parts = self._parts(path)
        if not parts:
            return None, ""
        parent = self._node(self.root + "/" + "/".join(parts[:-1]) if parts[:-1] else self.root)
        return (parent if isinstance(parent, _Dir) else None), parts[-1]

    def _file(self, path: str) -> _File:
        node = self._node(path)
        if node is None:
            raise _err(errno.ENOENT, path)
        if isinstance(node, _Dir):
            raise _err(errno.EISDIR, path)
        return node

    def _dir(self, path: str) -> _Dir:
        node = self._node(path)
        if node is None:
            raise _err(errno.ENOENT, path)
        if not isinstance(node, _Dir):
            raise _err(errno.ENOTDIR, path)
        return node

    # ---------------------------------------------------------------- FileSystem
    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        writing = bool(flags & _WRITE_FLAGS)
        parent, name = self._parent(path)
        if parent is None:
            raise _err(errno.ENOENT, path)
        node = parent.entries.get(name)
        if writing:
            self._check(path, allocates=node is None)
        if node is None:
            if not flags & os.O_CREAT:
                raise _err(errno.ENOENT, path)
            node = parent.entries[name] = _File()
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise _err(errno.EEXIST, path)
        if isinstance(node, _Dir):
            raise _err(errno.EISDIR, path)
        if writing and flags & os.O_TRUNC:
            node.data = bytearray()
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = [node, 0]
        return fd

    def _fd(self, fd: int) -> list[Any]:
        slot = self._fds.get(fd)
        if slot is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return slot

    def write(self, fd: int, data: Any) -> int:
        slot = self._fd(fd)
        self._check(f"<fd {fd}>", allocates=True)
        f, pos = slot
        b = bytes(data)
        f.data[pos:pos + len(b)] = b
        slot[1] = pos + len(b)
        return len(b)

    def fsync(self, fd: int) -> None:
        f = self._fd(fd)[0]
        self._check(f"<fd {fd}>")
        f.synced = bytes(f.data)
        f.synced_xattrs = dict(f.xattrs)

    def close(self, fd: int) -> None:
        self._fd(fd)
        del self._fds[fd]

    def open_read(self, path: str) -> BinaryIO:
        return io.BytesIO(bytes(self._file(path).data))

    def rename(self, src: str, dst: str) -> None:
        self._check(src)
        sp, sname = self._parent(src)
        dp, dname = self._parent(dst)
        if sp is None or sname not in sp.entries:
            raise _err(errno.ENOENT, src)
        if dp is None:
            raise _err(errno.ENOENT, dst)
        node = sp.entries[sname]
        if isinstance(dp.entries.get(dname), _Dir) and not isinstance(node, _Dir):
            raise _err(errno.EISDIR, dst)
        del sp.entries[sname]
        dp.entries[dname] = node

    replace = rename

    def unlink(self, path: str) -> None:
        self._check(path)
        parent, name = self._parent(path)
        node = parent.entries.get(name) if parent is not None else None
        if node is None:
            raise _err(errno.ENOENT, path)
        if isinstance(node, _Dir):
            raise _err(errno.EISDIR, path)
        del parent.entries[name]  # type: ignore[union-attr]

    def fsync_dir(self, path: str) -> None:
        d = self._dir(path)
        self._check(path)
        d.synced = dict(d.entries)

    def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        parts = self._parts(path)
        if parts is None:
            raise _err(errno.ENOENT, path)
        d = self._top
        made = False
        for i, name in enumerate(parts):
            child = d.entries.get(name)
            if child is None:
                self._check(path, allocates=True)
                child = d.entries[name] = _Dir()
                made = True
            elif not isinstance(child, _Dir):
                raise _err(errno.EEXIST if i == len(parts) - 1 else errno.ENOTDIR, path)
            d = child
        if not made and not exist_ok:
            raise _err(errno.EEXIST, path)

    def exists(self, path: str) -> bool:
        return self._node(path) is not None

    def isdir(self, path: str) -> bool:
        return isinstance(self._node(path), _Dir)

    def isfile(self, path: str) -> bool:
        return isinstance(self._node(path), _File)

    def getsize(self, path: str) -> int:
        return len(self._file(path).data)

    def listdir(self, path: str) -> list[str]:
        return list(self._dir(path).entries)

    def scandir(self, path: str) -> AbstractContextManager[Iterator[Any]]:
        d = self._dir(path)
        return nullcontext(iter([_Entry(n, c) for n, c in d.entries.items()]))

    def free_bytes(self, path: str) -> int:
        self._dir(path)
        if self.fault == errno.ENOSPC:
            return 0
        return max(0, self.capacity - self.used_bytes())

    def setxattr(self, target: int | str, name: str, value: bytes) -> None:
        where = f"<fd {target}>" if isinstance(target, int) else target
        f = self._fd(target)[0] if isinstance(target, int) else self._file(target)
        if not self.xattrs:
            raise _err(errno.ENOTSUP, where)
        # Fails like any change once the power is cut or under a fault, but does not count
        # toward an armed cut: the cut falls on the same data-path change with or without
        # attributes, so every seed keeps its schedule (and the seeds pinned for a defect
        # keep catching it).
        if self.cut:
            raise _err(errno.EIO, where)
        if self.fault is not None:
            raise _err(self.fault, where)
        f.xattrs[name] = bytes(value)

    def getxattr(self, path: str, name: str) -> bytes:
        f = self._file(path)
        if not self.xattrs:
            raise _err(errno.ENOTSUP, path)
        value = f.xattrs.get(name)
        if value is None:
            raise _err(errno.ENODATA, path)
        return value

    def used_bytes(self) -> int:
        """Bytes held by the files (current state)."""
        n = 0
        stack = [self._top]
        while stack:
            d = stack.pop()
            for child in d.entries.values():
                if isinstance(child, _Dir):
                    stack.append(child)
                else:
                    n += len(child.data)
        return n
