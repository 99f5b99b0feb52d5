"""Manifests: how data larger than one block is named by one hash.

A manifest is ``MANIFEST_MAGIC + msgpack({"size": n, "blocks": [hash, ...]})``,
stored as a block of its own; its hash names the whole. Small data that happens
to begin with the magic is stored behind a one-block manifest too, so a manifest
can never be mistaken for data.
"""

from __future__ import annotations

import uuid

import msgpack

from blocknode import fastpath
from blocknode.errors import RemoteProtocolError

__all__ = [
    "MANIFEST_MAGIC",
    "block_count",
    "decode_manifest",
    "encode_manifest",
    "manifest_size",
    "max_manifest_blocks",
    "new_ref_id",
    "parse_hash",
    "split",
]

MANIFEST_MAGIC = b"BLOCKNODE-MANIFEST-1\n"


def new_ref_id(prefix: str = "ref-") -> str:
    """A fresh random reference id."""
    return prefix + uuid.uuid4().hex


def parse_hash(text: str) -> bytes:
    """A 64-hex-char hash string to bytes; `InvalidHash` with a clear message otherwise."""
    return fastpath.hex_to_hash(text.strip().lower())


def encode_manifest(size: int, hashes: list[bytes]) -> bytes:
    """The bytes of a manifest block."""
    return MANIFEST_MAGIC + msgpack.packb({"size": size, "blocks": hashes})


def _uint_len(n: int) -> int:
    # msgpack's encoding of a non-negative int
    return 1 if n < 0x80 else 2 if n < 0x100 else 3 if n < 0x10000 else 5 if n < 2**32 else 9


def manifest_size(size: int, count: int) -> int:
    """``len(encode_manifest(size, hashes))`` for `count` hashes, without building it.

    The magic, a 2-entry map: "size" and its int, "blocks" and an array of
    `count` 32-byte bin values (2 bytes of header each).
    """
    array_head = 1 if count < 16 else 3 if count < 0x10000 else 5
    return len(MANIFEST_MAGIC) + 1 + 5 + _uint_len(size) + 7 + array_head + 34 * count


def max_manifest_blocks(block_size: int, size: int = 2**64 - 1) -> int:
    """The most blocks one manifest of `block_size` bytes can list (for data of `size` bytes;
    by default the worst case, for data whose size is not known yet)."""
    count = max(0, (block_size - manifest_size(size, 0)) // 34)
    while count and manifest_size(size, count) > block_size:
        count -= 1
    return count


def block_count(size: int, block_size: int) -> int:
    """How many blocks `split` makes of `size` bytes."""
    return max(1, -(-size // block_size))


def decode_manifest(data: bytes) -> tuple[int, list[bytes]] | None:
    """(size, block hashes) when `data` is a manifest, else None."""
    if not data.startswith(MANIFEST_MAGIC):
        return None
    try:
        m = msgpack.unpackb(data[len(MANIFEST_MAGIC):], raw=False)
        size, blocks = m["size"], m["blocks"]
        if not isinstance(size, int) or not all(isinstance(b, bytes) and len(b) == 32 for b in blocks):
            raise ValueError
    except Exception as exc:  # noqa: BLE001 - any malformation is one error
        raise RemoteProtocolError(f"malformed manifest block: {exc}") from None
    return size, list(blocks)




def split(data: bytes, block_size: int) -> list[bytes]:
    """`data` cut into blocks of `block_size` bytes (one empty block for empty data)."""
    return [data[i:i + block_size] for i in range(0, len(data), block_size)] or [b""]
