"""The file-system seam of the block files: every call `BlockFiles` makes on its data
directories goes through a `FileSystem`.

`OS_FS` (the default, `OsFileSystem`) is the operating system itself: each method
calls the `os` function of its name (one Python call more per system call: well
under a microsecond, against several for the system call itself). The simulation passes its own
(`blocknode.sim.disk.SimDisk`: an in-memory disk that loses what was not fsynced
on a crash, and fails writes with ENOSPC, EIO or EROFS) through
`blocknode.context.NodeContext.fs`.

The calls follow `os` (same arguments, same errors: `OSError` with its errno),
except `open_read` (a binary file object, like ``open(path, "rb")``), `fsync_dir`
(open the directory, fsync it, close it) and `free_bytes` (``statvfs``: bytes
free for an unprivileged user).

Extended attributes (`setxattr` on an open descriptor or a path, `getxattr` by path: the
block files' checksums, `blocknode.storage.checksum`): a file system without them
raises ``OSError(ENOTSUP)``, a valid answer (the caller stops asking); a file
without the attribute raises ``OSError(ENODATA)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Protocol

__all__ = ["OS_FS", "FileSystem", "OsFileSystem"]


class FileSystem(Protocol):
    """What `BlockFiles` needs of a file system (see the module docstring)."""

    def open(self, path: str, flags: int, mode: int = 0o777) -> int: ...
    def write(self, fd: int, data: Any) -> int: ...
    def fsync(self, fd: int) -> None: ...
    def close(self, fd: int) -> None: ...
    def open_read(self, path: str) -> BinaryIO: ...
    def rename(self, src: str, dst: str) -> None: ...
    def replace(self, src: str, dst: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def fsync_dir(self, path: str) -> None: ...
    def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None: ...
    def exists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def isfile(self, path: str) -> bool: ...
    def getsize(self, path: str) -> int: ...
    def listdir(self, path: str) -> list[str]: ...
    def scandir(self, path: str) -> AbstractContextManager[Iterator[Any]]: ...
    def free_bytes(self, path: str) -> int: ...
    def setxattr(self, target: int | str, name: str, value: bytes) -> None: ...
    def getxattr(self, path: str, name: str) -> bytes: ...


class OsFileSystem:
    """The real `FileSystem`: each method calls the `os` function of its name.

    Looked up at call time (``os.open``, not a copy of it), so a test that
    monkeypatches `os` to inject a fault still reaches the block files.
    """

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: Any) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it (a `with` block)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        os.makedirs(path, mode=mode, exist_ok=exist_ok)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def getsize(self, path: str) -> int:
        return os.stat(path).st_size

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def scandir(self, path: str) -> AbstractContextManager[Iterator[Any]]:
        return os.scandir(path)

    def free_bytes(self, path: str) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def setxattr(self, target: int | str, name: str, value: bytes) -> None:
        os.setxattr(target, name, value)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(path, name)


OS_FS: FileSystem = OsFileSystem()
"""The operating system's file system (the default everywhere)."""
