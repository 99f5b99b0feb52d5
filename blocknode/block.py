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

Compression (zstd). A block is always named by the hash of its plaintext. Its
*form* is decided once, by the node that coordinates the put (`compress`, at
that node's `compression_level`): the zstd frame when it saves more than 10 %
(`COMPRESS_MIN_SAVING`), else the plain bytes. A compressed block carries its
frame as `.zst`; the frame is what is stored (`stored_form`) and what travels
between replicas (`wire_form`, with a ``z`` flag on the message), so nothing
is compressed twice; every receiver still decompresses and hashes it
(`accept` / `verify_compressed`). Decompressing bytes from the wire never goes
past `block_size` (a frame that declares or produces more is refused, before
any allocation past the limit: a decompression bomb costs nothing); a stored
frame (our own disk) is bounded by `stored_cap(block_size)`.

Forms on disk and in LMDB: a block is stored as a file or, when small, inline
in LMDB, in its stored form; the storage layer keeps the compressed flag next
to it (a ``.zst`` file name, a separate LMDB table), never inside the bytes, so
plain values written before compression existed read as they always did.
Reading a stored form verifies it (`from_stored`; a stored copy that fails is
`BlockCorrupted`); its size is not checked against the block size limit, which
may have changed since it was written. A block file whose bytes match the checksum
recorded when they were written (`blocknode.storage.checksum`) is taken without a
second BLAKE2b (`from_checked`); a file without one, or that does not match it, is
verified by `from_stored`.

Work on large blocks (hashing, compressing, decompressing more than
`HASH_IN_THREAD_MIN` bytes) runs through `run_sync`, off the event loop; small
blocks are handled inline (a thread hop would cost more).

This module imports neither LMDB nor the node: the client uses it too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import zstandard

from blocknode import fastpath
from blocknode.errors import BlockCorrupted, HashMismatch, LocalProtocolError
from blocknode.protocol import THREAD_HASH_MIN

if TYPE_CHECKING:
    from blocknode.context import RunSync

__all__ = [
    "COMPRESS_MIN_SAVING",
    "HASH_IN_THREAD_MIN",
    "STORED_CAP_MIN",
    "CompressedForm",
    "VerifiedBatch",
    "VerifiedBlock",
    "accept",
    "accept_batch",
    "acompress",
    "ahashed",
    "averify",
    "check_block",
    "check_size",
    "compress",
    "file_bytes",
    "from_checked",
    "from_file_bytes",
    "from_inline_bytes",
    "from_stored",
    "hash_of",
    "hashed",
    "inline_bytes",
    "is_compressed",
    "join",
    "same_copy",
    "stored_cap",
    "stored_form",
    "verify",
    "verify_compressed",
    "wire_form",
    "zstd_form",
]

HASH_IN_THREAD_MIN = THREAD_HASH_MIN
"""Blocks larger than this are hashed, compressed and decompressed off the event loop."""

COMPRESS_MIN_SAVING = 0.10
"""A block is stored compressed only when its zstd frame is smaller by more than this share."""

STORED_CAP_MIN = 64 * 1024 * 1024
"""A stored frame (our own disk) may decompress to `max(block_size, STORED_CAP_MIN)`:
lowering `block_size` never makes a stored block unreadable, and a corrupt frame
header still cannot make a read allocate without bound."""


class VerifiedBlock(bytes):
    """A block's bytes (the plaintext), known in this process to hash to `.hash`.

    `.zst` is its zstd frame when the block is stored and sent compressed
    (None: plain). Only this module makes them (`verify`, `hashed`, the stored
    and wire forms).
    """

    hash: bytes
    zst: bytes | None = None

    def __repr__(self) -> str:
        form = f", zstd {len(self.zst)} bytes" if self.zst is not None else ""
        return f"VerifiedBlock({fastpath.hash_to_hex(self.hash)}, {len(self)} bytes{form})"


class CompressedForm(bytes):
    """A compressed block's zstd frame as it travels (`wire_form`); `.block` is the
    verified block, so this process's own handler takes it without decompressing."""

    block: VerifiedBlock


def _trusted(data: bytes, hash: bytes, zst: bytes | None = None) -> VerifiedBlock:
    blk = VerifiedBlock(data)
    blk.hash = hash
    if zst is not None:
        blk.zst = zst
    return blk


class VerifiedBatch(bytes):
    """Blocks' wire forms back to back; `.items` lists each one's (hash, length,
    compressed) and `.blocks` the verified blocks themselves."""

    items: tuple[tuple[bytes, int, bool], ...]
    blocks: tuple[VerifiedBlock, ...]


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


def check_hash(data: bytes | bytearray | memoryview, hash: bytes) -> None:
    """`HashMismatch` unless `data` (any buffer) hashes to `hash`; nothing is copied."""
    if not fastpath.verify(data, hash):
        raise _mismatch(bytes(data), hash)


def check_block(data: bytes | bytearray | memoryview, hash: bytes, *,
                block_size: int | None = None) -> None:
    """`verify` without making a `VerifiedBlock`: the size against `block_size` (when
    given), then the hash; nothing is copied. For a client, which checks a block once,
    end to end, and hands the very bytes it received to its caller.

    `LocalProtocolError` when too large, `HashMismatch` when the bytes do not hash to `hash`.
    """
    if block_size is not None:
        check_size(len(data), block_size)
    check_hash(data, hash)


def hash_of(data: bytes | bytearray | memoryview, *, block_size: int | None = None) -> bytes:
    """The hash of bytes this process names (`hashed` without the `VerifiedBlock` copy):
    the size check, then the hash."""
    if block_size is not None:
        check_size(len(data), block_size)
    return fastpath.block_hash(data)


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


async def ahashed(data: bytes, *, block_size: int | None, run_sync: RunSync,
                  level: int | None = None) -> VerifiedBlock:
    """`hashed` (then `compress` at `level`), through `run_sync` for a large block."""
    if block_size is not None:
        check_size(len(data), block_size)

    def work() -> VerifiedBlock:
        return compress(hashed(data), level)

    if len(data) > HASH_IN_THREAD_MIN:
        return await run_sync(work)
    return work()


# ---------------------------------------------------------------- compression

_local = threading.local()  # zstd contexts are not thread safe: one set per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


class _BadFrame(Exception):
    pass


def _decompress(raw: bytes, cap: int) -> bytes:
    """The plaintext of one zstd frame, never more than `cap` bytes.

    A frame that declares more than `cap` is refused before anything is
    allocated; one that declares no size is decompressed with an output limit
    of `cap`; one that lies about its size fails (zstd checks it). Trailing
    bytes after the frame are refused too (a stored form is exactly one frame).
    """
    try:
        declared = zstandard.frame_content_size(raw)
    except zstandard.ZstdError as exc:
        raise _BadFrame(f"not a zstd frame ({exc})") from None
    if declared > cap:
        raise _BadFrame(f"the frame declares {declared} bytes, more than the limit of {cap}")
    try:
        out = _decompressor().decompress(raw, max_output_size=cap if declared < 0 else 0,
                                         allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise _BadFrame(f"invalid zstd frame or more than {cap} bytes ({exc})") from None
    if len(out) > cap:  # defensive: the checks above already bound it
        raise _BadFrame(f"the frame decompresses past the limit of {cap}")
    return out


def _plain_size_hint(raw: bytes, cap: int) -> int:
    # How big the plaintext is likely to be (to decide on a thread hop): the declared size.
    try:
        declared = zstandard.frame_content_size(raw)
    except zstandard.ZstdError:
        return len(raw)
    return cap if declared < 0 else min(declared, cap)


COMPRESS_PROBE_MIN = 256 * 1024
"""Blocks at least this large are probed before being compressed whole (`compress`)."""

COMPRESS_PROBE_PART = 32 * 1024
"""The probe compresses this many bytes from the start and as many from the middle."""


def _worth_compressing(data: bytes, level: int) -> bool:
    # Incompressible data (media, archives, encrypted) is the common large block: zstd
    # over a whole 1 MiB of it costs about half a BLAKE2b pass for nothing. A probe of
    # two 32 KiB pieces costs ~3 % of that; a block whose pieces save less than half of
    # COMPRESS_MIN_SAVING is stored plain without compressing the rest.
    n, k = len(data), COMPRESS_PROBE_PART
    with memoryview(data) as view:
        sample = bytes(view[:k]) + bytes(view[n // 2:n // 2 + k])
    z = _compressor(level).compress(sample)
    return len(z) < len(sample) * (1 - COMPRESS_MIN_SAVING / 2)


def zstd_form(data: bytes, level: int | None) -> bytes | None:
    """The zstd frame of a block's bytes at `level` when it is worth storing (saves
    more than `COMPRESS_MIN_SAVING`; a block of `COMPRESS_PROBE_MIN` bytes or more is
    compressed only if a probe of two pieces of it saves at least half that share),
    else None (None too when `level` is None or the block is empty)."""
    if level is None or not data:
        return None
    if len(data) >= COMPRESS_PROBE_MIN and not _worth_compressing(data, level):
        return None
    z = _compressor(level).compress(data)
    return z if len(z) < len(data) * (1 - COMPRESS_MIN_SAVING) else None


def compress(blk: VerifiedBlock, level: int | None) -> VerifiedBlock:
    """Decide `blk`'s form at zstd `level` (None: plain): sets `blk.zst` to its
    `zstd_form`. A block already compressed (its frame came from a peer) is left as
    it is. Returns `blk`."""
    if blk.zst is None:
        z = zstd_form(blk, level)
        if z is not None:
            blk.zst = z
    return blk


async def acompress(blk: VerifiedBlock, level: int | None, *, run_sync: RunSync) -> VerifiedBlock:
    """`compress`, through `run_sync` for a large block."""
    if level is None or blk.zst is not None:
        return blk
    if len(blk) > HASH_IN_THREAD_MIN:
        return await run_sync(compress, blk, level)
    return compress(blk, level)


def is_compressed(blk: VerifiedBlock) -> bool:
    """Whether `blk` is stored and sent as a zstd frame."""
    return blk.zst is not None


def verify_compressed(raw: bytes, hash: bytes, *, block_size: int) -> VerifiedBlock:
    """A block from its zstd frame (from the wire): decompressed, never past
    `block_size`, then verified. `HashMismatch` when the frame is invalid, too
    large once decompressed (a decompression bomb), or the plaintext does not
    hash to `hash`."""
    try:
        plain = _decompress(raw, block_size)
    except _BadFrame as exc:
        raise HashMismatch(f"compressed data for {fastpath.hash_to_hex(hash)} refused: {exc}") from None
    if not fastpath.verify(plain, hash):
        raise _mismatch(plain, hash)
    return _trusted(plain, hash, bytes(raw))


async def _averify_compressed(raw: bytes, hash: bytes, *, block_size: int,
                              run_sync: RunSync) -> VerifiedBlock:
    if _plain_size_hint(raw, block_size) > HASH_IN_THREAD_MIN:
        return await run_sync(lambda: verify_compressed(raw, hash, block_size=block_size))
    return verify_compressed(raw, hash, block_size=block_size)


async def accept(data: bytes, hash: bytes, *, block_size: int, run_sync: RunSync,
                 compressed: bool = False) -> VerifiedBlock:
    """Bytes offered for block `hash` (`compressed`: its zstd frame, the ``z`` flag
    of the message): the block this process handed over (a `VerifiedBlock` or a
    `CompressedForm` of that hash) is taken as it is; anything else is verified
    (`averify`, or decompressed within `block_size` and verified)."""
    if compressed:
        if isinstance(data, CompressedForm) and data.block.hash == hash:
            check_size(len(data.block), block_size)
            return data.block
        check_size(len(data), block_size)
        return await _averify_compressed(data, hash, block_size=block_size, run_sync=run_sync)
    if isinstance(data, VerifiedBlock) and data.hash == hash:
        check_size(len(data), block_size)
        return data
    return await averify(data, hash, block_size=block_size, run_sync=run_sync)


def wire_form(blk: VerifiedBlock) -> tuple[bytes, bool]:
    """What a message carries for `blk`, and its ``z`` flag: the zstd frame of a
    compressed block (a `CompressedForm`), else the block itself."""
    if blk.zst is None:
        return blk, False
    form = CompressedForm(blk.zst)
    form.block = blk
    return form, True


def join(blocks: Sequence[VerifiedBlock]) -> VerifiedBatch:
    """Blocks' wire forms back to back, as one payload."""
    forms = [wire_form(b) for b in blocks]
    batch = VerifiedBatch(b"".join(f for f, _ in forms))
    batch.items = tuple((b.hash, len(f), z) for b, (f, z) in zip(blocks, forms, strict=True))
    batch.blocks = tuple(blocks)
    return batch


async def accept_batch(payload: bytes | None, chunks: Sequence[tuple[bytes, bytes]], *,
                       block_size: int, run_sync: RunSync,
                       compressed: Sequence[bool] | None = None) -> list[VerifiedBlock]:
    """The (hash, bytes) chunks of a batch payload as verified blocks (`compressed`:
    which chunks are zstd frames; None: none).

    When `payload` is the `VerifiedBatch` this process made of exactly these
    blocks, they are taken as they are; otherwise each is verified (through
    `run_sync` when the batch is large), a compressed one decompressed within
    `block_size` first.
    """
    flags = list(compressed) if compressed is not None else [False] * len(chunks)
    if len(flags) != len(chunks):
        raise LocalProtocolError("accept_batch: one compressed flag per chunk")
    for _, data in chunks:
        check_size(len(data), block_size)
    if isinstance(payload, VerifiedBatch) and payload.items == tuple(
            (h, len(d), z) for (h, d), z in zip(chunks, flags, strict=True)):
        for b in payload.blocks:
            check_size(len(b), block_size)
        return list(payload.blocks)

    def verify_all() -> list[VerifiedBlock]:
        return [verify_compressed(d, h, block_size=block_size) if z else verify(d, h)
                for (h, d), z in zip(chunks, flags, strict=True)]

    work = sum(_plain_size_hint(d, block_size) if z else len(d)
               for (_, d), z in zip(chunks, flags, strict=True))
    if work > HASH_IN_THREAD_MIN:
        return await run_sync(verify_all)
    return verify_all()


# ---------------------------------------------------------------- stored forms

def stored_form(blk: VerifiedBlock) -> tuple[bytes, bool]:
    """The bytes stored for a block, and whether they are its zstd frame."""
    return (blk.zst, True) if blk.zst is not None else (blk, False)


def file_bytes(blk: VerifiedBlock) -> bytes:
    """The bytes of a block file (a ``.zst`` file when `is_compressed`)."""
    return stored_form(blk)[0]


def inline_bytes(blk: VerifiedBlock) -> bytes:
    """The bytes stored for an inline block (in the compressed table when `is_compressed`)."""
    return stored_form(blk)[0]


def stored_cap(block_size: int | None) -> int:
    """How far a stored frame may decompress (see `STORED_CAP_MIN`)."""
    return max(block_size or 0, STORED_CAP_MIN)


def from_stored(raw: bytes, hash: bytes, *, compressed: bool = False,
                cap: int = STORED_CAP_MIN) -> VerifiedBlock:
    """The block a stored form holds (`compressed`: a zstd frame, decompressed
    within `cap`); `BlockCorrupted` when it does not decompress or verify."""
    if compressed:
        try:
            plain = _decompress(raw, cap)
        except _BadFrame:
            raise BlockCorrupted(fastpath.hash_to_hex(hash)) from None
        if not fastpath.verify(plain, hash):
            raise BlockCorrupted(fastpath.hash_to_hex(hash))
        return _trusted(plain, hash, raw)
    if not fastpath.verify(raw, hash):
        raise BlockCorrupted(fastpath.hash_to_hex(hash))
    return _trusted(raw, hash)


def from_checked(raw: bytes, hash: bytes, *, compressed: bool = False,
                 cap: int = STORED_CAP_MIN) -> VerifiedBlock:
    """The block a stored form holds, *not hashed*: for bytes the storage layer has
    just matched against a checksum recorded when they were written, after they
    were verified against `hash` (`blocknode.storage.checksum`). A compressed form
    is still decompressed within `cap`; `BlockCorrupted` when that fails.

    Only for a node's own disk: bytes from anywhere else go through `verify`,
    `accept` or `from_stored`."""
    if compressed:
        try:
            plain = _decompress(raw, cap)
        except _BadFrame:
            raise BlockCorrupted(fastpath.hash_to_hex(hash)) from None
        return _trusted(plain, hash, raw)
    return _trusted(raw, hash)


def from_file_bytes(raw: bytes, hash: bytes, *, compressed: bool = False,
                    cap: int = STORED_CAP_MIN) -> VerifiedBlock:
    """The block a file holds; `BlockCorrupted` when it does not verify."""
    return from_stored(raw, hash, compressed=compressed, cap=cap)


def from_inline_bytes(raw: bytes, hash: bytes, *, compressed: bool = False,
                      cap: int = STORED_CAP_MIN) -> VerifiedBlock:
    """The block an inline entry holds; `BlockCorrupted` when it does not verify."""
    return from_stored(raw, hash, compressed=compressed, cap=cap)


def same_copy(stored: bytes, form: bytes | memoryview) -> bool:
    """Whether a stored copy is intact: its bytes equal `form`, the stored form
    (`stored_form`) of the verified block being put. Size first, then content.

    The block being put is verified, so a copy with equal bytes verifies too:
    comparing them checks the copy against the hash at the cost of a memory
    compare instead of a second hash of the same bytes. A copy in another form
    (plain vs compressed, another level) is not "the same": the caller then
    checks it with `from_stored`.
    """
    return len(stored) == len(form) and stored == form
