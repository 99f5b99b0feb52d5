"""The block: immutable bytes named by their hash, and the one way to check them.

A block's hash is Garage's blake2sum of its bytes (`fastpath.block_hash`).
Bytes become a block in exactly one place, `verify` (or `hashed`, when this
process computes the hash itself): the size is checked against the block size
limit first (cheap, and it bounds the hashing work), then the hash. What comes
out is a `VerifiedBlock`: the same bytes, carrying the hash they were verified
against.

A `VerifiedBlock` is a `bytes` subclass, so it travels through the RPC layer
unchanged: a call to this node itself hands the very object to the handler,
which takes it as verified (`accept`) instead of hashing it again. Bytes that
come from the wire are plain `bytes` and are always verified. A batch of
blocks travels the same way as a `VerifiedBatch`.

Forms: a block is stored as a file (`file_bytes` / `from_file_bytes`) or, when
small, inline in LMDB (`inline_bytes` / `from_inline_bytes`). Both forms are
the plain bytes today; this is where compression will live. Reading a stored
form verifies it (a stored copy that fails is `BlockCorrupted`); its size is
not checked against the block size limit, which may have changed since it was
written.

This module imports neither LMDB nor the node: the client uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from blocknode import fastpath
from blocknode.errors import BlockCorrupted, HashMismatch, LocalProtocolError
from blocknode.protocol import THREAD_HASH_MIN

if TYPE_CHECKING:
    from blocknode.context import RunSync

__all__ = [
    "HASH_IN_THREAD_MIN",
    "VerifiedBatch",
    "VerifiedBlock",
    "accept",
    "accept_batch",
    "ahashed",
    "averify",
    "check_size",
    "file_bytes",
    "from_file_bytes",
    "from_inline_bytes",
    "hashed",
    "inline_bytes",
    "join",
    "same_copy",
    "verify",
]

HASH_IN_THREAD_MIN = THREAD_HASH_MIN
"""Blocks larger than this are hashed off the event loop (`averify`, `ahashed`)."""


class VerifiedBlock(bytes):
    """A block's bytes, known in this process to hash to `.hash`.

    Only this module makes them (`verify`, `hashed`, the stored forms).
    """

    hash: bytes

    def __repr__(self) -> str:
        return f"VerifiedBlock({fastpath.hash_to_hex(self.hash)}, {len(self)} bytes)"


def _trusted(data: bytes, hash: bytes) -> VerifiedBlock:
    blk = VerifiedBlock(data)
    blk.hash = hash
    return blk


class VerifiedBatch(bytes):
    """Verified blocks back to back; `.items` lists each one's (hash, length)."""

    items: tuple[tuple[bytes, int], ...]


def check_size(size: int, block_size: int) -> None:
    """`LocalProtocolError` when a block of `size` bytes exceeds `block_size`
    (requests from peers are size-checked by `blocknode.protocol` first)."""
    if size > block_size:
        raise LocalProtocolError(f"block of {size} bytes exceeds block_size {block_size}")


def _mismatch(data: bytes, hash: bytes) -> HashMismatch:
    return HashMismatch(
        f"data does not hash to {fastpath.hash_to_hex(hash)} "
        f"(it hashes to {fastpath.hash_to_hex(fastpath.block_hash(data))})"
    )


def verify(data: bytes, hash: bytes, *, block_size: int | None = None) -> VerifiedBlock:
    """The one verify path: the size against `block_size` (when given), then the hash.

    `LocalProtocolError` when too large, `HashMismatch` when the bytes do not hash to `hash`.
    """
    if block_size is not None:
        check_size(len(data), block_size)
    if not fastpath.verify(data, hash):
        raise _mismatch(data, hash)
    return data if isinstance(data, VerifiedBlock) and data.hash == hash else _trusted(data, hash)


def hashed(data: bytes, *, block_size: int | None = None) -> VerifiedBlock:
    """Bytes this process names: the size check, then the hash computed here."""
    if block_size is not None:
        check_size(len(data), block_size)
    return _trusted(data, fastpath.block_hash(data))


async def averify(data: bytes, hash: bytes, *, block_size: int | None,
                  run_sync: RunSync) -> VerifiedBlock:
    """`verify`, hashing a large block through `run_sync` (off the event loop)."""
    if block_size is not None:
        check_size(len(data), block_size)
    if len(data) > HASH_IN_THREAD_MIN:
        return await run_sync(verify, data, hash)
    return verify(data, hash)


async def ahashed(data: bytes, *, block_size: int | None, run_sync: RunSync) -> VerifiedBlock:
    """`hashed`, hashing a large block through `run_sync` (off the event loop)."""
    if block_size is not None:
        check_size(len(data), block_size)
    if len(data) > HASH_IN_THREAD_MIN:
        return await run_sync(hashed, data)
    return hashed(data)


async def accept(data: bytes, hash: bytes, *, block_size: int,
                 run_sync: RunSync) -> VerifiedBlock:
    """Bytes offered for block `hash`: a `VerifiedBlock` of that hash (handed over in
    this process) is taken as it is; anything else goes through `averify`."""
    if isinstance(data, VerifiedBlock) and data.hash == hash:
        check_size(len(data), block_size)
        return data
    return await averify(data, hash, block_size=block_size, run_sync=run_sync)


def join(blocks: Sequence[VerifiedBlock]) -> VerifiedBatch:
    """Verified blocks back to back, as one payload."""
    batch = VerifiedBatch(b"".join(blocks))
    batch.items = tuple((b.hash, len(b)) for b in blocks)
    return batch


async def accept_batch(payload: bytes | None, chunks: Sequence[tuple[bytes, bytes]], *,
                       block_size: int, run_sync: RunSync) -> list[VerifiedBlock]:
    """The (hash, bytes) chunks of a batch payload as verified blocks.

    When `payload` is the `VerifiedBatch` this process made of exactly these
    blocks, they are taken as they are; otherwise each is verified (through
    `run_sync` when the batch is large).
    """
    for _, data in chunks:
        check_size(len(data), block_size)
    if isinstance(payload, VerifiedBatch) and payload.items == tuple(
            (h, len(d)) for h, d in chunks):
        return [_trusted(d, h) for h, d in chunks]

    def verify_all() -> list[VerifiedBlock]:
        return [verify(d, h) for h, d in chunks]

    if sum(len(d) for _, d in chunks) > HASH_IN_THREAD_MIN:
        return await run_sync(verify_all)
    return verify_all()


# ---------------------------------------------------------------- stored forms

def file_bytes(blk: VerifiedBlock) -> bytes:
    """The bytes of a block file."""
    return blk


def inline_bytes(blk: VerifiedBlock) -> bytes:
    """The bytes stored for an inline block."""
    return blk


def _from_stored(raw: bytes, hash: bytes) -> VerifiedBlock:
    if not fastpath.verify(raw, hash):
        raise BlockCorrupted(fastpath.hash_to_hex(hash))
    return _trusted(raw, hash)


def from_file_bytes(raw: bytes, hash: bytes) -> VerifiedBlock:
    """The block a file holds; `BlockCorrupted` when it does not verify."""
    return _from_stored(raw, hash)


def from_inline_bytes(raw: bytes, hash: bytes) -> VerifiedBlock:
    """The block an inline entry holds; `BlockCorrupted` when it does not verify."""
    return _from_stored(raw, hash)


def same_copy(stored: bytes, form: bytes) -> bool:
    """Whether a stored copy is intact: its bytes equal `form`, the stored form
    (`file_bytes` / `inline_bytes`) of the verified block being put. Size first,
    then content.

    The block being put is verified, so a copy with equal bytes verifies too:
    comparing them checks the copy against the hash at the cost of a memory
    compare instead of a second hash of the same bytes.
    """
    return len(stored) == len(form) and stored == form
