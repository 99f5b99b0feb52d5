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

__all__ = ["MANIFEST_MAGIC", "decode_manifest", "encode_manifest", "new_ref_id", "parse_hash", "split"]

MANIFEST_MAGIC = b"BLOCKNODE-MANIFEST-1\n"


def new_ref_id() -> str:
    """A fresh random reference id."""
    return "ref-" + uuid.uuid4().hex


def parse_hash(text: str) -> bytes:
    """A 64-hex-char hash string to bytes; `InvalidHash` with a clear message otherwise."""
    return fastpath.hex_to_hash(text.strip().lower())


def encode_manifest(size: int, hashes: list[bytes]) -> bytes:
    """The bytes of a manifest block."""
    return MANIFEST_MAGIC + msgpack.packb({"size": size, "blocks": hashes})


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
