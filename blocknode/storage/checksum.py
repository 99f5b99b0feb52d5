"""The read-side checksum of a block file: xxh3-128 of its bytes, kept in an extended
attribute of the file (issue 15).

A block file's bytes were verified against their BLAKE2b hash before they were
written; what a replica must still catch when it reads them back is what the
disk did to them (bit rot, a torn write, a damaged file), not an adversary. So
`BlockFiles` records `digest` of the stored bytes (the plain block or its zstd
frame, exactly what the file holds) in the attribute `XATTR_NAME` of the
``.tmp`` file before its fsync (the fsync covers it), and a read compares the
bytes it got with it: ≈ 0.03 ms per MiB instead of ≈ 2 ms for BLAKE2b-512 on
this machine (measured in `bench/RESULTS.md`, "Reads checked by checksum").

The attribute is advisory, never authoritative: a file without it (written
before this change, or on a file system without user attributes), or whose
bytes do not match it, is verified with BLAKE2b, which decides. A mismatch
with a good file rewrites the attribute (a damaged attribute never quarantines
a good block); a BLAKE2b failure is corruption as before. A collision of
xxh3-128 on damaged bytes (2^-128 per read) is the only way the fast check can
pass bytes BLAKE2b would refuse; the scrubber (`thorough_reads`) always hashes.

`xxhash` (PyPI) is the one dependency: its xxh3-128 runs at ≈ 37 GB/s per
core here, against ≈ 2 GB/s for ``zlib.crc32`` and 0.5 GB/s for BLAKE2b.

This module only computes, encodes and scopes; the file system calls stay in
`blocknode.storage.block_files` (through the `blocknode.fs` seam).
"""

from __future__ import annotations

import contextvars
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import xxhash

__all__ = [
    "DIGEST_SIZE",
    "UNSUPPORTED_ERRNOS",
    "XATTR_NAME",
    "digest",
    "is_thorough",
    "matches",
    "thorough_reads",
]

XATTR_NAME = "user.blocknode.xxh3"
"""The extended attribute that holds a block file's checksum (the ``user.`` namespace:
writable by the file's owner, no privilege needed)."""

DIGEST_SIZE = 16
"""Bytes of an xxh3-128 digest (the attribute's whole value)."""

UNSUPPORTED_ERRNOS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
"""What a file system without user extended attributes answers (tmpfs on older
kernels, some network and FUSE file systems): the data directory stops trying."""

_THOROUGH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "blocknode_thorough_reads", default=False)


def digest(data: Any) -> bytes:
    """The checksum of `data` (any buffer: bytes, memoryview): its xxh3-128 digest."""
    return xxhash.xxh3_128_digest(data)


def matches(data: Any, recorded: bytes | None) -> bool:
    """Whether `data` has the `recorded` checksum (False when none is recorded or it is
    not a digest at all)."""
    return recorded is not None and len(recorded) == DIGEST_SIZE and digest(data) == recorded


@contextmanager
def thorough_reads() -> Iterator[None]:
    """Within this block (this task, and the worker threads it starts: Trio copies the
    context into them), block file reads verify with BLAKE2b whatever the checksum
    says. The scrubber reads this way: it is the slow, thorough check."""
    token = _THOROUGH.set(True)
    try:
        yield
    finally:
        _THOROUGH.reset(token)


def is_thorough() -> bool:
    """True inside `thorough_reads`."""
    return _THOROUGH.get()
