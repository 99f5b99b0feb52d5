"""File objects block by block, for the non-Trio clients: putting a readable one
(`put_reader`) and writing blocks to a writable one (`write_all`).

The file is read one block at a time in a worker thread while earlier blocks
are uploaded, so memory stays at a few blocks whatever its size; the hash is the
same as for the same bytes given at once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO

import trio

from blocknode.client.api import Client


def read_block(f: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the input (a pipe may return less per read)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = f.read(size - got)
        if not part:
            break
        parts.append(bytes(part))
        got += len(part)
    return b"".join(parts)


def write_all(write: Callable[[Any], object], chunk: bytes) -> None:
    """``write(chunk)`` until all of it is written: a raw file (``buffering=0``) may
    write less than it is given and say how much; None counts as all of it."""
    view = memoryview(chunk)
    while True:
        n = write(view)
        if not isinstance(n, int) or n >= len(view):
            return
        if n <= 0:
            raise OSError(f"write to the file object wrote nothing ({n!r}) of {len(view)} bytes")
        view = view[n:]


def _known_size(f: BinaryIO) -> int | None:
    try:
        st = os.fstat(f.fileno())
        return st.st_size - f.tell() if stat.S_ISREG(st.st_mode) else None
    except (OSError, ValueError, AttributeError):
        return None


async def put_reader(client: Client, f: BinaryIO, ref: str | None = None) -> str:
    """Store everything `f.read()` yields under `ref` (default: a fresh one); its hash hex."""
    size = client.block_size
    known = _known_size(f)

    async def read() -> bytes:
        return await trio.to_thread.run_sync(read_block, f, size, abandon_on_cancel=True)

    first = await read()
    if len(first) < size:
        return await client.put(first, ref)
    second = await read()
    if not second:
        return await client.put(first, ref)
    head = [first, second]
    del first, second

    async def chunks() -> AsyncIterator[bytes]:
        while head:
            yield head.pop(0)
        while chunk := await read():
            yield chunk

    return await client.put_chunks(chunks(), ref=ref, size=known)
